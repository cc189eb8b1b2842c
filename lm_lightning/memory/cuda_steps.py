"""``estimate`` on a GPU: the CUDA memory of a fit of the token-path LSTM (``LanguageModel`` with ``networks/lstm.py``'s
``LSTMNetwork``, tied or not), by arithmetic alone -- torch-free, no GPU, no probe step.

A fit's first steps are written out tensor by tensor -- what each CUDA kernel allocates and when it is freed, from
torch's sources -- and replayed through the caching allocator's rules (``cuda_allocator.py``): what
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` read after them, and the tensors alive at the allocated
peak, by part. Each function says what it follows (Lightning's ``zero_grad`` between the forward pass and backward,
cuBLAS's workspace per thread, autocast's cached decoder weight, ...); the LSTM, ``networks/lstm.py``'s StackedLSTM layer
by layer, is written out in ``cuda_lstm.py``. docs/gpu.md lists every term.
Assumptions (``cuda_plan.py``'s constants; measured by the CUDA test in ``tests/test_cuda_estimate.py``): validation
windows no larger than training ones (validation is not replayed), one CUDA stream, no ``PYTORCH_CUDA_ALLOC_CONF``.
Not modelled: cuDNN's temporary workspace (freed inside each call), a few small tensors (logged metrics, gradient
clipping's norms, ``GradScaler``'s scale).
"""

from __future__ import annotations

from lm_lightning.memory.cuda_allocator import CachingAllocator
from lm_lightning.memory.cuda_lstm import lstm_backward, lstm_forward, lstm_to_device
from lm_lightning.memory.cuda_plan import CUDA_CONTEXT_BYTES, PRECISIONS, CudaPlan, GpuRun, Part


class Replay:
    """The allocation events of a fit's first steps, replayed as they are written."""

    def __init__(self, run: GpuRun) -> None:
        self.run, self.allocator, self.part, self.phase = run, CachingAllocator(), {}, {}
        self.now = "set-up"  # the phase the next allocations belong to
        self.grads: dict[str, str] = {}  # parameter -> its gradient's allocation
        self.state: list[str] = []
        self.hidden: dict[int, tuple[str, str]] = {}  # stream group -> its carried (h, c)
        self.once: set[str] = set()  # the allocations a process makes once (cuBLAS's workspaces)
        self.peak_parts: dict[str, str] = {}  # name -> part, of the blocks alive at the allocated peak

    def snapshot(self) -> None:
        """The parts as they are now (a gradient allocated as a temporary becomes ``.grad`` later)."""
        self.peak_parts = {name: self.part[name] for name in self.allocator.live}

    def a(self, part: str, name: str, nbytes: int) -> str:
        self.part[name], self.phase[name] = part, self.now
        before = self.allocator.peak_allocated
        self.allocator.malloc(name, nbytes)
        if self.allocator.peak_allocated > before:  # this allocation set a new peak
            self.snapshot()
        return name

    def f(self, *names: str) -> None:
        for name in names:
            self.allocator.free(name)

    def first(self, part: str, name: str, nbytes: int) -> None:
        if name not in self.once:
            self.once.add(name)
            self.a(part, name, nbytes)

    def grad(self, param: str, name: str) -> None:
        """AccumulateGrad: the first gradient becomes ``.grad``; a later one (the tied weight's second, an accumulated
        micro-batch's) is added to it in place and freed."""
        if param in self.grads:
            self.f(name)
        else:
            self.grads[param] = name
            self.part[name] = Part.GRADS


def _to_device(r: Replay) -> None:
    """Lightning's ``model_to_device``: each parameter copied (children first), the LSTM's then flattened into the
    buffers cuDNN reads (``cuda_lstm.py``)."""
    run, w = r.run, PRECISIONS[r.run.precision][0]
    r.a(Part.PARAMS, "embedding.weight", run.vocab_size * run.embedding_dim * w)
    lstm_to_device(r)
    if not run.tie_weights:
        r.a(Part.PARAMS, "decoder.weight", run.vocab_size * run.hidden_dim * w)
    r.a(Part.PARAMS, "decoder.bias", run.vocab_size * w)
    if run.world_size > 1:
        r.a(Part.DDP, "ddp buckets", sum(n for _, n in run.parameters()) * w)


def _forward(r: Replay, k: str, group: int) -> dict[str, str]:
    """One window (or micro-batch) forward; returns the names backward reads. ``k`` prefixes this window's names."""
    run = r.run
    w, a, mixed = PRECISIONS[run.precision]
    V, E, H, n = run.vocab_size, run.embedding_dim, run.hidden_dim, run.streams * run.bptt
    state = run.num_layers * run.streams * H * a
    if group not in r.hidden:  # the state a stream group carries between windows
        r.hidden[group] = (r.a(Part.CARRY, f"h{group}", state), r.a(Part.CARRY, f"c{group}", state))
    s = {"ids": r.a(Part.CARRY, k + "inputs", n * 8), "targets": r.a(Part.CARRY, k + "targets", n * 8)}
    r.now = "forward"
    src = r.a(Part.SAVED if not mixed and not run.dropout else Part.TEMPS, k + "embedding", n * E * w)
    if run.dropout:
        s["mask_e"] = r.a(Part.SAVED, k + "dropout mask (embedding)", n * E)  # one byte per value on CUDA
        out = r.a(Part.SAVED if not mixed else Part.TEMPS, k + "dropout (embedding)", n * E * w)
        r.f(src)
        src = out
    out = lstm_forward(r, k, s, src)
    if run.dropout:
        s["mask_o"], out = r.a(Part.SAVED, k + "dropout mask (lstm)", n * H), r.a(Part.TEMPS, k + "dropout (lstm)", n * H * a)
    if run.loss_chunk_size:
        _chunked_forward(r, k, s, n)
        if run.dropout:
            r.f(out)  # the features the loss head read
    else:
        if mixed:  # autocast's cast of the decoder's weight (cached, saved by the matmul) and bias (cached only)
            s["w16"] = r.a(Part.COPIES, k + "decoder weight (half)", V * H * 2)
            s["b16"] = r.a(Part.COPIES, k + "decoder bias (half)", V * 2)
        s["dec_in"] = r.a(Part.SAVED, k + "decoder input (contiguous)", n * H * a)
        logits = r.a(Part.LOGITS, k + "logits", n * V * a)
        r.first(Part.CUBLAS, "cublas workspace (forward)", run.cublas_workspace)
        if run.dropout:
            r.f(out)  # the network's output: freed when its forward returns (the loss reads the logits)
        upcast = r.a(Part.LOGITS, k + "logits (float32)", n * V * 4) if a != 4 else None
        s["lsm"] = r.a(Part.LOGITS, k + "log-softmax", n * V * 4)
        s["total_weight"] = r.a(Part.TEMPS, k + "nll total weight", 4)
        r.f(*([upcast] if upcast else []), logits)
    s["loss"] = r.a(Part.TEMPS, k + "loss", 4)
    if mixed and "b16" in s:
        r.f(s.pop("b16"))  # autocast's cache is cleared when training_step's autocast region ends
    return s


def _chunked_forward(r: Replay, k: str, s: dict[str, str], n: int) -> None:
    """``callbacks/chunked_loss.py``: float32 features, ``F.linear_cross_entropy`` with one chunk's logits at a time,
    the gradients of features, weight and bias computed now and kept for backward (torch 2.13's implementation)."""
    run = r.run
    w, a, mixed = PRECISIONS[run.precision]
    V, H, chunk = run.vocab_size, run.hidden_dim, min(run.loss_chunk_size, n)
    x = r.a(Part.TEMPS, k + "features (contiguous)", n * H * a)
    if a != 4:
        x, copy = r.a(Part.TEMPS, k + "features (float32)", n * H * 4), x
        r.f(copy)
    casts = []
    if mixed:  # decoder_weights() calls the decoder on no tokens: autocast caches its half weight until the region ends
        casts = [r.a(Part.COPIES, k + "decoder weight (half)", V * H * 2), r.a(Part.COPIES, k + "decoder bias (half)", V * 2)]
    elif w != 4:
        casts = [r.a(Part.TEMPS, k + "decoder weight (float32)", V * H * 4), r.a(Part.TEMPS, k + "decoder bias (float32)", V * 4)]
    for key, size in (("gx", n * H * 4), ("gw", V * H * 4), ("gb", V * 4)):  # features', weight's, bias's gradients
        s[key] = r.a(Part.LOGITS, k + f"chunked loss {key}", size)
    buffers = [r.a(Part.TEMPS, k + "chunked loss output", 4), r.a(Part.LOGITS, k + "logits (one chunk)", chunk * V * 4)]
    buffers.append(r.a(Part.TEMPS, k + "chunk scratch", chunk * 4))
    r.first(Part.CUBLAS, "cublas workspace (forward)", run.cublas_workspace)
    r.f(*buffers, x, *casts)  # the chunk buffers when the op returns; the casts when the forward pass ends


def _backward(r: Replay, k: str, s: dict[str, str], group: int) -> None:
    """Backward of one window, node by node; each node's inputs and saved tensors are freed when it ends."""
    run = r.run
    w, a, mixed = PRECISIONS[run.precision]
    V, E, H, n = run.vocab_size, run.embedding_dim, run.hidden_dim, run.streams * run.bptt
    decoder = "embedding.weight" if run.tie_weights else "decoder.weight"
    r.now = "backward"
    if run.loss_chunk_size:  # the kept gradients, scaled in place by the loss's gradient, flow on
        gin = s["gx"]
        if a != 4:
            gin = r.a(Part.TEMPS, k + "grad features (half)", n * H * a)
            r.f(s["gx"])
        for param, grad, size in ((decoder, s["gw"], V * H), ("decoder.bias", s["gb"], V)):
            if w != 4:  # *-true: the float32 cast of the weight casts its gradient back
                grad, cast = r.a(Part.TEMPS, k + f"grad {param} (half)", size * w), grad
                r.f(cast)
            r.grad(param, grad)
    else:
        g1 = r.a(Part.LOGITS, k + "grad of the log-softmax (nll backward)", n * V * 4)
        grad = r.a(Part.LOGITS, k + "grad of the logits (float32)", n * V * 4)
        r.f(g1, s["lsm"], s["total_weight"])
        if a != 4:
            grad, upcast = r.a(Part.LOGITS, k + "grad of the logits (half)", n * V * a), grad
            r.f(upcast)
        bias = r.a(Part.TEMPS, k + "grad decoder bias", V * a)
        if mixed:
            bias, half = r.a(Part.TEMPS, k + "grad decoder bias (float32)", V * 4), bias
            r.f(half)
        r.grad("decoder.bias", bias)
        gin = r.a(Part.TEMPS, k + "grad decoder input", n * H * a)
        r.first(Part.CUBLAS, "cublas workspace (backward)", run.cublas_workspace)
        weight = r.a(Part.TEMPS, k + "grad decoder weight", V * H * a)
        r.f(grad)
        if mixed:
            weight, half = r.a(Part.TEMPS, k + "grad decoder weight (float32)", V * H * 4), weight
            r.f(half, s["w16"])
        r.grad(decoder, weight)
        r.f(s["dec_in"])
    if run.dropout:
        g = r.a(Part.TEMPS, k + "grad lstm output (dropout)", n * H * a)
        r.f(gin, s["mask_o"])
        gin = g
    dx = lstm_backward(r, k, s, gin, group)
    if mixed:
        dx, half = r.a(Part.TEMPS, k + "grad lstm input (float32)", n * E * 4), dx
        r.f(half)
    if run.dropout:
        g = r.a(Part.TEMPS, k + "grad embedding output (dropout)", n * E * w)
        r.f(dx, s["mask_e"])
        dx = g
    # embedding_dense_backward: sorted ids and per-segment partial sums (float32), then the dense gradient
    scratch = r.a(Part.TEMPS, k + "embedding backward scratch", n * E * 4 + 4 * n * 8)
    embedding = r.a(Part.TEMPS, k + "grad embedding", V * E * w)
    r.f(scratch, dx)
    r.grad("embedding.weight", embedding)


def _optimizer_step(r: Replay, first: bool) -> None:
    """The state created at the first step (``zeros_like`` of each parameter, or SGD's ``clone`` of its gradient),
    then the foreach update's temporaries, freed when it returns."""
    run, w = r.run, PRECISIONS[r.run.precision][0]
    r.now = "optimizer step"
    if first:
        r.state = [
            r.a(Part.STATE, f"{name} state {i}", size * w) for name, size in run.parameters() for i in range(run.optimizer_states)
        ]
    temps = []
    for i in range(run.step_temporaries):
        for name, size in run.parameters():
            temps.append(r.a(Part.STEP, f"{name} temporary {i}", size * w))
            if not run.foreach:
                r.f(temps.pop())
    r.f(*temps)


def replay(run: GpuRun, steps: int = 3) -> Replay:
    """The model moved to the device, then ``steps`` optimizer steps (the first creates the optimizer state; the
    second and third reuse what the allocator cached), the peaks counted from the fit's start as MemoryMonitor does."""
    r = Replay(run)
    _to_device(r)
    r.allocator.reset_peak()
    r.snapshot()
    for step in range(steps):
        for window in range(run.windows_per_step):
            for group in range(run.batch_size // run.streams):
                k = f"step {step + 1}, window {window + 1}, streams {group * run.streams}+: "
                s = _forward(r, k, group)
                if window == 0 and group == 0:  # Lightning's zero_grad(set_to_none=True), before the first backward
                    r.f(*r.grads.values())
                    r.grads.clear()
                _backward(r, k, s, group)
                batch = [s["ids"], s["targets"], s["loss"]]  # the loop keeps the last batch and loss until the step ends
                r.f(*([] if window == run.windows_per_step - 1 and group == run.batch_size // run.streams - 1 else batch))
        _optimizer_step(r, first=step == 0)
        r.f(*batch)
    return r


def plan(run: GpuRun, steps: int = 3) -> CudaPlan:
    """The prediction for ``run``: the replay's peaks and the blocks alive at the allocated peak, by part."""
    r = replay(run, steps)
    parts = dict.fromkeys(Part.ORDER, 0)
    for name, size in r.allocator.live_at_peak.items():
        parts[r.peak_parts[name]] += size
    name = r.allocator.peak_name
    peak_at = f"{r.phase[name]}: {name.split(': ', 1)[-1]}" if name else "set-up"
    # At the end of a step only what no lever changes is left, besides the ids and carried state (a few KiB).
    fixed = sum(b.size for n, b in r.allocator.live.items() if r.part[n] != Part.CARRY)
    return CudaPlan(run, parts, r.allocator.peak_allocated, r.allocator.reserved, peak_at, fixed + CUDA_CONTEXT_BYTES)
