"""``networks/lstm.py``'s :class:`StackedLSTM` on CUDA, as allocation events of ``cuda_steps.py``'s replay: its weights
moved into one cuDNN buffer per layer, then, per window, one cuDNN call per layer (``torch.lstm`` -> ``_cudnn_rnn``, one
layer, dropout 0.0) with ``F.dropout`` between the layers while training, and the backward of each, node by node.

Read from PyTorch's ``aten/src/ATen/native/cudnn/RNN.cpp`` (``_cudnn_rnn``, ``_cudnn_rnn_backward``),
``aten/src/ATen/cudnn/AutocastRNN.cpp`` and ``aten/src/ATen/native/cuda/Dropout.cu``. Two layouts decide the copies:
cuDNN returns its output as a batch-first view of time-major memory (``output.transpose_(0, 1)``), and ``F.dropout``'s
mask and output take their input's strides (``empty_like``); so only layer 0, fed the contiguous batch-first embedding,
has its input copied time-major, and later layers read theirs as they lie. In backward, ``F.dropout``'s gradient is
contiguous batch-first (``empty_like(grad, grad.suggest_memory_format())``), as is the decoder's: a layer whose output's
gradient comes that way copies it time-major; one fed the next layer's input gradient (time-major) does not.
No call allocates cuDNN's dropout state: ``get_dropout_state`` (RNN.cpp) creates it only for ``train && dropout_p > 0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lm_lightning.memory.cuda_plan import CUDNN_RESERVE_VALUES, PRECISIONS, Part

if TYPE_CHECKING:  # only the type: cuda_steps.py imports this module
    from lm_lightning.memory.cuda_steps import Replay


def lstm_to_device(r: Replay) -> None:
    """``model.to("cuda")`` for the LSTM: each parameter copied, then ``RNNBase.flatten_parameters`` copies them into one
    buffer for the stack (the moved copies freed), then ``StackedLSTM.flatten_parameters`` into one buffer per layer;
    the stack's buffer is freed when the last layer's weights leave it. One layer: the stack's buffer is the layer's."""
    run, w = r.run, PRECISIONS[r.run.precision][0]
    copies = [r.a(Part.PARAMS, f"lstm.{name} (moved)", n * w) for name, n in run.lstm_tensors()]
    stack = r.a(Part.PARAMS, "lstm (flat, all layers)", sum(n for _, n in run.lstm_tensors()) * w)
    r.f(*copies)
    if run.num_layers > 1:
        for i, tensors in enumerate(run.lstm_layers()):
            r.a(Part.PARAMS, f"lstm layer {i} (flat)", sum(n for _, n in tensors) * w)
        r.f(stack)


def lstm_forward(r: Replay, k: str, s: dict[str, str], src: str) -> str:
    """One window through the stack; ``src``: layer 0's input (the embedding's output, dropped). Records in ``s`` what
    backward reads and returns the last layer's output. ``k`` prefixes this window's names."""
    run = r.run
    a, mixed = PRECISIONS[run.precision][1:]
    E, H, L, B, n = run.embedding_dim, run.hidden_dim, run.num_layers, run.streams, run.streams * run.bptt
    dropped = run.dropout > 0  # F.dropout between the layers only while training with dropout
    x, h, c = src, [], []
    for i, tensors in enumerate(run.lstm_layers()):
        if mixed:  # AutocastRNN.cpp: this layer's weights copied into a float16 buffer of its own, then the input cast
            s[f"wbuf{i}"] = r.a(Part.COPIES, k + f"lstm layer {i} weights (float16)", sum(v for _, v in tensors) * 2)
            if i == 0:  # later layers' inputs are cuDNN's float16 output already: cached_cast leaves them
                x = r.a(Part.SAVED, k + "lstm input (float16)", n * E * 2)
        s[f"in{i}"] = x
        copy = r.a(Part.TEMPS, k + "lstm input (time-major copy)", n * E * a) if i == 0 else ""
        s[f"y{i}"] = r.a(Part.SAVED, k + f"lstm layer {i} output", n * H * a)
        h.append(r.a(Part.CARRY, k + f"h layer {i}", B * H * a))
        c.append(r.a(Part.CARRY, k + f"c layer {i}", B * H * a))
        s[f"reserve{i}"] = r.a(Part.RESERVE, k + f"cudnn reserve layer {i}", CUDNN_RESERVE_VALUES * n * H * a)
        r.f(*([copy] if copy else []))
        x = s[f"y{i}"]
        if i < L - 1 and dropped:  # native_dropout: the 1-byte mask (saved), then the output (the next layer's input)
            s[f"mask{i}"] = r.a(Part.BETWEEN, k + f"dropout mask (layer {i} output)", n * H)
            x = r.a(Part.BETWEEN, k + f"dropout (layer {i} output)", n * H * a)
    if L > 1:  # torch.cat of the layers' states; one layer: nn.LSTM's own call returns them as they are
        s["hy"], s["cy"] = r.a(Part.CARRY, k + "h", L * B * H * a), r.a(Part.CARRY, k + "c", L * B * H * a)
        r.f(*h, *c)
    else:
        s["hy"], s["cy"] = h[0], c[0]
    if mixed:
        r.f(src)  # the float32 input was only cast, and forward's argument holds it until the stack returns
    return s[f"y{L - 1}"]


def lstm_backward(r: Replay, k: str, s: dict[str, str], gin: str, group: int) -> str:
    """Backward through the stack, last layer first; ``gin``: the gradient of its output (contiguous, batch-first).
    Each node's input gradients and saved tensors are freed when it ends. Returns the gradient of layer 0's input."""
    run = r.run
    a, mixed = PRECISIONS[run.precision][1:]
    E, H, L, B, n = run.embedding_dim, run.hidden_dim, run.num_layers, run.streams, run.streams * run.bptt
    dropped = run.dropout > 0
    for i, tensors in reversed(list(enumerate(run.lstm_layers()))):
        values = sum(v for _, v in tensors)
        # _cudnn_rnn_backward: zeros for this layer's hy and cy (only torch.cat or the detached carry read them),
        # time-major copies of the input (layer 0's) and of the output's gradient (when it comes batch-first), dx,
        # dhx and dcx; then the weights' gradient and the input copied again.
        zeros = [r.a(Part.TEMPS, k + f"grad {x}y layer {i} (zeros)", B * H * a) for x in "hc"]
        copies = [r.a(Part.TEMPS, k + "lstm input (time-major, backward)", n * E * a)] if i == 0 else []
        if i == L - 1 or dropped:
            copies.append(r.a(Part.TEMPS, k + f"grad lstm layer {i} output (time-major)", n * H * a))
        dx = r.a(Part.TEMPS, k + f"grad lstm layer {i} input", n * (E if i == 0 else H) * a)
        dh = [r.a(Part.TEMPS, k + f"grad {x}0 layer {i}", B * H * a) for x in "hc"]
        r.f(*copies)
        dw = r.a(Part.TEMPS, k + f"grad lstm layer {i} weights (flat)", values * a)
        if i == 0:
            r.f(r.a(Part.TEMPS, k + "lstm input (time-major, weights)", n * E * a))
        r.f(gin, *zeros)
        # The node's saved tensors: its output, reserve, float16 weights, and its input unless that is the previous
        # layer's output (no dropout between), which that layer's node still holds; the carried (h, c), sliced by
        # every layer, goes with layer 0.
        saved = [s[f"y{i}"], s[f"reserve{i}"], *([s[f"wbuf{i}"]] if mixed else [])]
        saved += [s[f"in{i}"]] if i == 0 or dropped else []
        r.f(*saved, *(r.hidden[group] if i == 0 else ()), *dh)
        if mixed:  # autograd's CopySlices carry the float16 buffer's gradient to each float32 weight of the layer
            base = [r.a(Part.TEMPS, k + f"grad lstm layer {i} weights (CopySlices {j})", values * 2) for j in range(2)]
            for name, size in tensors:
                r.grad(f"lstm.{name}", r.a(Part.TEMPS, k + f"grad lstm.{name}", size * 4))
            r.f(*base, dw)
        else:  # cuDNN's flat gradient of the layer: its weights' gradients are views of it
            r.grad(f"lstm layer {i} (flat)", dw)
        gin = dx
        if i > 0 and dropped:  # F.dropout's backward between layer i - 1 and layer i
            g = r.a(Part.TEMPS, k + f"grad dropout (layer {i - 1} output)", n * H * a)
            r.f(gin, s[f"mask{i - 1}"])
            gin = g
    r.hidden[group] = (s["hy"], s["cy"])  # the state this window ended with is carried to the next
    return gin
