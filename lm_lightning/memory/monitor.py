"""Where the training memory goes: parameters, gradients, optimizer state, activations, peak.

Lightning's ``DeviceStatsMonitor`` logs device-wide statistics (CUDA allocator counters, or CPU and RAM utilisation)
and ``ThroughputMonitor`` logs speed; neither says *what* the memory is. :class:`MemoryMonitor` adds that breakdown,
on CPU as well as GPU, and a one-screen summary at the end of ``fit``. Tokens/s are not logged again here: the CLI always adds
:class:`~lm_lightning.callbacks.throughput.TokenThroughput` (Lightning's ``ThroughputMonitor``, logged as
``train/tokens_per_sec``); the summary quotes its last reading when there is one.

Activations are measured with ``torch.autograd.graph.saved_tensors_hooks`` (the mechanism behind
``torch.autograd.graph.save_on_cpu``), so they need no allocator statistics and work on CPU. A view keeps its whole
storage alive, so bytes are counted per distinct storage, at the storage's full size, once. What those hooks cannot
see -- the gradients a chunked loss computes in its forward pass, the inputs a checkpointed (recomputed) segment keeps
-- is in ``memory/retained_bytes``: the allocator's bytes in use after the forward pass minus before it (the CUDA
caching allocator's count, or glibc's ``mallinfo2`` on Linux CPUs).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils._pytree import tree_leaves

from lm_lightning.callbacks.throughput import TOKENS_PER_SEC
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import (
    CUDA_COUNTERS,
    SavedTensorBytes,
    allocated_bytes,
    cuda_memory,
    human_bytes,
    peak_bytes,
    storage_bytes,
)


class MemoryMonitor(Callback):
    """Log the memory of training every N batches and print a summary table when ``fit`` ends.

    TensorBoard scalars (bytes, at ``trainer.global_step``):

    * ``memory/params_bytes``: distinct parameter storages (tied weights once), in their training dtype.
    * ``memory/grads_bytes``: ``.grad`` storages after backward (before the next ``zero_grad``).
    * ``memory/optimizer_bytes``: every tensor in every optimizer's ``state`` (Adam: ``exp_avg``, ``exp_avg_sq`` and
      the 4-byte float32 ``step`` tensor per parameter); non-tensor state is not memory that grows with the model.
    * ``memory/activations_bytes``: storages autograd saved for backward during the training step's forward
      (``on_train_batch_start`` to ``on_before_backward``), excluding the storages of parameters, buffers and the
      batch, which exist with or without autograd. This includes the carried LSTM state, oneDNN's RNN workspace and,
      under ``bf16-mixed``, the bfloat16 copies autocast makes of the weights (new tensors kept for backward).
    * ``memory/retained_bytes``: what the forward pass left allocated for backward, counted by the allocator (see
      :func:`allocated_bytes`; not logged where there is no count): the saved activations plus what saved-tensor hooks
      cannot see (a chunked loss's early gradients, a recomputed segment's inputs, autograd's own nodes), less what
      the step freed meanwhile (the previous window's hidden state).
    * ``memory/peak_bytes``: ``torch.cuda.max_memory_allocated`` on GPU (reset when fit starts); on CPU the process's
      peak resident set size (``ru_maxrss``), which includes Python, torch and the data and cannot be reset.

    On a CUDA run, also each rank's caching-allocator counters in MiB (``measure.cuda_memory``):
    ``memory/rank{R}/cuda_allocated_mib``, ``cuda_reserved_mib``, ``cuda_peak_allocated_mib``, ``cuda_peak_reserved_mib``
    (peaks since fit started) and ``cuda_fragmentation_mib`` (reserved - allocated). The rank is in the tag, and every
    rank's values are gathered to rank 0 (one small ``all_gather`` per measured batch), because only rank 0's logger
    writes: a rank's own ``self.log`` would be dropped, and a mean or max over ranks would hide the rank that holds more
    (the one that logs, samples text and checkpoints). ``hp/peak_memory_mib`` is then the peak reserved memory.

    The saved-tensor hooks are installed only on measured batches and removed before backward, at the batch end,
    or when a step raises (``on_exception``), whichever comes first. Their cost is one Python call per saved tensor
    (32 per step for the default model, whose training step measured 303 ms with and without them).

    With ``estimate`` the peak is predicted when ``fit`` starts, printed, logged as ``memory/predicted_peak_bytes`` and
    as the text ``memory/estimate``, and the summary puts it beside the measured peak: on CPU (token path, glibc) by a
    few probe steps on a copy of the model (``memory/estimate.py``); on a GPU by arithmetic (``memory/cuda_estimate.py``:
    the LSTM network), its reserved memory as the peak and ``memory/predicted_allocated_bytes`` beside it -- or one line
    saying why there is no prediction.

    Args:
        log_every_n_steps: Measure and log every this many training batches (the first batch included).
        summary: Print the summary table at the end of ``fit``.
        estimate: Predict the peak at the start of ``fit`` (as ``python -m lm_lightning estimate`` does).
    """

    def __init__(self, log_every_n_steps: int = 10, summary: bool = True, estimate: bool = True) -> None:
        if log_every_n_steps < 1:
            raise LMInputError(f"MemoryMonitor log_every_n_steps must be a positive integer, got {log_every_n_steps}.")
        self.log_every_n_steps = log_every_n_steps
        self.summary = summary
        self.estimate = estimate
        self.predicted: Optional[Any] = None  # estimate.py's Estimate on CPU, cuda_plan.py's CudaPlan on a GPU
        self.history: list[dict[str, float]] = []
        self._saved: Optional[SavedTensorBytes] = None
        self._activations: Optional[int] = None
        self._allocated: Optional[int] = None  # before the measured forward pass, then what it retained
        self._device = torch.device("cpu")
        self._batches = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history, self._batches, self.predicted = [], 0, None
        if self._cuda(pl_module):  # the peaks of this fit (the prediction allocates nothing on the device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        table = self._predict(trainer, pl_module) if self.estimate else ""
        if self.predicted is not None:
            if trainer.is_global_zero:
                print(table)
            metrics = {"memory/predicted_peak_bytes": float(self.predicted.peak)}
            if self._cuda(pl_module):
                metrics["memory/predicted_allocated_bytes"] = float(self.predicted.allocated)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                if hasattr(getattr(logger, "experiment", None), "add_text"):
                    logger.experiment.add_text("memory/estimate", f"```\n{table}\n```", trainer.global_step)

    @staticmethod
    def _cuda(pl_module: L.LightningModule) -> bool:
        return pl_module.device.type == "cuda"

    def _predict(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """Sets ``self.predicted`` (an ``Estimate``, a ``CudaPlan`` or None) and returns its table."""
        # Imported when used: estimate's imports load lm_lightning.callbacks, whose __init__ imports this module, so
        # a module-level import fails whenever estimate is imported first.
        if self._cuda(pl_module):
            from lm_lightning.memory.cuda_estimate import predict_in_fit as predict_on_gpu

            self.predicted, reason = predict_on_gpu(trainer, pl_module)
            if self.predicted is None:
                rank_zero_info(f"MemoryMonitor: {reason}")
            return self.predicted.table() if self.predicted is not None else ""
        from lm_lightning.memory.estimate import predict_in_fit

        self.predicted = predict_in_fit(trainer, pl_module)
        return self.predicted.table(trainer.datamodule.hparams.bptt) if self.predicted is not None else ""

    def _cuda_metrics(self, trainer: L.Trainer, device: torch.device) -> dict[str, float]:
        """Every rank's CUDA counters in MiB, tagged with its rank (gathered: see the class docstring)."""
        counts = cuda_memory(device)
        mine = torch.tensor([counts[key] / 2**20 for key in CUDA_COUNTERS], dtype=torch.float64, device=device)
        ranks = trainer.strategy.all_gather(mine).reshape(-1, len(CUDA_COUNTERS)).tolist()
        return {f"memory/rank{r}/cuda_{key}_mib": mib for r, row in enumerate(ranks) for key, mib in zip(CUDA_COUNTERS, row)}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._activations = None
        if self._batches % self.log_every_n_steps == 0:
            exclude = [*pl_module.parameters(), *pl_module.buffers(), *tree_leaves(batch)]
            self._device, self._allocated = pl_module.device, allocated_bytes(pl_module.device)
            self._saved = SavedTensorBytes(exclude).__enter__()
        self._batches += 1

    def _stop_counting(self) -> None:
        if self._saved is not None and self._saved.active:
            self._saved.__exit__(None, None, None)
            self._activations = self._saved.bytes
            if self._allocated is not None:
                self._allocated = allocated_bytes(self._device) - self._allocated

    def on_before_zero_grad(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._stop_counting()  # Lightning frees the previous step's gradients between the forward pass and backward

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._stop_counting()  # what backward itself allocates is not "saved for backward"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._stop_counting()
        if self._saved is None:
            return
        self._saved = None
        params = list(pl_module.parameters())
        metrics = {
            "memory/params_bytes": storage_bytes(params),
            "memory/grads_bytes": storage_bytes(p.grad for p in params),
            "memory/optimizer_bytes": storage_bytes(
                t for opt in trainer.optimizers for t in tree_leaves(list(opt.state.values()))
            ),
            "memory/activations_bytes": self._activations or 0,
            **({"memory/retained_bytes": self._allocated} if self._allocated is not None else {}),
            "memory/peak_bytes": peak_bytes(pl_module.device),
            **(self._cuda_metrics(trainer, pl_module.device) if self._cuda(pl_module) else {}),
        }
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=trainer.global_step)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_counting()
        self._saved = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_counting()
        self._saved = None

    @property
    def peak_bytes(self) -> Optional[int]:
        """The highest ``memory/peak_bytes`` measured (CUDA allocated, or process RSS), None before any batch."""
        return max((h["memory/peak_bytes"] for h in self.history), default=None)

    # --- summary ------------------------------------------------------------------------------------------
    def summary_table(self, trainer: L.Trainer) -> str:
        if not self.history:
            return "Memory: no training batch was measured."
        last = self.history[-1]
        peak = max(h["memory/peak_bytes"] for h in self.history)
        device = trainer.strategy.root_device
        rows = [
            ("parameters", human_bytes(last["memory/params_bytes"])),
            ("gradients", human_bytes(last["memory/grads_bytes"])),
            ("optimizer state", human_bytes(last["memory/optimizer_bytes"])),
            ("activations per step (max)", human_bytes(max(h["memory/activations_bytes"] for h in self.history))),
        ]
        if "memory/retained_bytes" in last:
            retained = max(h["memory/retained_bytes"] for h in self.history)
            rows.append(("kept by the forward pass (max)", human_bytes(retained)))
        rows.append(("peak CUDA allocated" if device.type == "cuda" else "peak process RSS", human_bytes(peak)))
        mine = f"memory/rank{trainer.global_rank}/cuda_peak_reserved_mib"  # logged on a CUDA run
        reserved = max((h.get(mine, 0) * 2**20 for h in self.history), default=0)
        if reserved:
            rows.append(("peak CUDA reserved", human_bytes(reserved)))
        if self.predicted is not None:  # on a GPU, the prediction's reserved memory against the measured one
            measured = reserved or peak
            error = (self.predicted.peak - measured) / measured
            rows.append(("predicted at fit start", f"{human_bytes(self.predicted.peak)} ({error:+.0%})"))
        tokens_per_sec = trainer.logged_metrics.get(TOKENS_PER_SEC)
        if tokens_per_sec is not None:
            rows.append(("tokens/s (TokenThroughput)", f"{float(tokens_per_sec):,.0f}"))
        title = f"Memory: {len(self.history)} measured batch(es), precision {trainer.precision}, {device}"
        width = max(len(name) for name, _ in rows)
        return "\n".join([title, *(f"  {name:<{width}}  {value:>12}" for name, value in rows)])

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.summary:
            print(self.summary_table(trainer))
