"""Mixed and half precision from one flag, ``--trainer.precision``, checked and reported by :class:`PrecisionGuard`.

Lightning's precision plugins do the work (autocast, loss scaling, casting the module); nothing here replaces them.
What they lack, and this callback adds:

* **A start-up error for ``16-true`` with an Adam-style optimizer.** ``16-true`` keeps weights *and* optimizer state
  in float16, whose smallest subnormal is ~6e-8: Adam's default ``eps=1e-8`` rounds to 0, so ``exp_avg / (sqrt(v) +
  eps)`` divides by zero wherever ``v`` underflows and the weights fill with NaN (an eps of 1e-4 or more survives; the
  docs/memory.md has the measurements). The check covers every optimizer with a numeric ``eps`` below 1e-4 (Adam, AdamW,
  NAdam, RAdam, Adamax, RMSprop, Adagrad, ...).
* **A start-up error for ``bf16-mixed`` with a recurrent module on CUDA** where autocast would run it in float16.
  PyTorch's autocast wrapper of cuDNN's RNN (``_cudnn_rnn_cast_reflatten`` in ``aten/src/ATen/cudnn/AutocastRNN.cpp``)
  casts the input, the state and the weights with ``cached_cast(at::kHalf, ...)``: float16 whatever dtype autocast
  was asked for, unlike the ``lower_precision_fp`` ops of ``autocast_mode.cpp`` (matmuls, ``lstm_cell``), which take
  the autocast dtype. So the LSTM and the state it carries would run in float16 with no ``GradScaler`` (bf16-mixed
  has none), where small gradients underflow to zero. Newer cuDNN (9.13+) runs bfloat16 RNNs, and a later torch may
  cast to the autocast dtype: so the guard asks the GPU (a two-unit RNN under autocast) instead of assuming.
* **A report of what actually runs**: the plugin, the parameter dtype, and the dtype each parametrised module
  *outputs* during the first training step (forward hooks, removed after that step), logged with ``logging`` and as
  TensorBoard text ``precision/summary``. Under ``16-mixed`` on GPU the loss scale is logged as ``precision/loss_scale``.

What Lightning does with each flag:

* ``bf16-mixed``: ``torch.autocast(device, bfloat16)`` around the forward pass; parameters, gradients and optimizer
  state stay float32. On CPU autocast covers ``nn.LSTM`` (oneDNN runs it with bfloat16 inputs, weights, output and
  state, so the state carried to the next window is bfloat16 too); the embedding lookup stays float32, the decoder
  matmul runs in bfloat16, and the loss is float32 because ``evaluation.nll`` upcasts the logits.
* ``bf16-true`` / ``16-true``: the whole module is cast (weights, gradients, optimizer state, activations); with no
  float32 master copy, an update below half a unit in the last place of its weight is rounded away.
* ``16-mixed``: float16 autocast plus a ``GradScaler`` on GPU. On CPU Lightning does not run float16: it warns and
  runs ``bf16-mixed`` (bfloat16 autocast, no scaler), and ``trainer.precision`` then reads ``bf16-mixed``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils._pytree import tree_leaves

from lm_lightning.errors import LMInputError

log = logging.getLogger(__name__)

# float16's smallest normal number is 6.1e-5; an eps at or above 1e-4 survives being added in float16.
MIN_EPS_16_TRUE = 1e-4


def bf16_lstm_supported() -> bool:
    """Whether oneDNN runs ``nn.LSTM`` under bfloat16 autocast on this CPU: on CPUs without AVX-512 BF16 it may have no
    such kernel and fails with "could not create a primitive descriptor for the LSTM forward propagation primitive"."""
    lstm = torch.nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


def rnn_autocast_dtype(rnn_class: type, device: torch.device, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype a two-unit ``rnn_class`` (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) outputs on ``device`` under
    ``torch.autocast(dtype)``, or None where it cannot run at all (no such kernel)."""
    rnn = rnn_class(2, 2, batch_first=True).to(device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
            output, _ = rnn(torch.zeros(1, 1, 2, device=device))
    except RuntimeError:
        return None
    return output.dtype


def check_cuda_rnn_autocast(pl_module: nn.Module, precision: str, device: torch.device) -> None:
    """``bf16-mixed`` on CUDA refused, in one sentence, for a recurrent module that autocast would run in another dtype."""
    if precision != "bf16-mixed" or device.type != "cuda":
        return
    for name, module in pl_module.named_modules():
        plain = next((c for c in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(module, c)), None)
        if plain is None:
            continue
        ran = rnn_autocast_dtype(plain, device, torch.bfloat16)
        fix = "use --trainer.precision 16-mixed (float16 with loss scaling) or 32-true."
        if ran is None:
            raise LMInputError(
                f"--trainer.precision bf16-mixed cannot run {name} ({type(module).__name__}) on this GPU, which has no "
                f"kernel for it under bfloat16 autocast: {fix}"
            )
        if ran != torch.bfloat16:
            raise LMInputError(
                f"--trainer.precision bf16-mixed would run {name} ({type(module).__name__}) in {_dtype_name(ran)} on this "
                "GPU: PyTorch's cuDNN RNN under autocast casts to float16 whatever dtype autocast asks for, and bf16-mixed "
                f"has no GradScaler to keep float16 gradients from underflowing: {fix}"
            )
        return  # one answer per run: every RNN module goes through the same autocast wrapper


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    return next((t for t in tree_leaves(output) if isinstance(t, torch.Tensor)), None)


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "-"


class PrecisionGuard(Callback):
    """Reject precision settings that cannot train, and report which dtypes each part of the model really runs in.

    Use it with Lightning's own flag: ``--trainer.precision bf16-mixed --trainer.callbacks+=
    lm_lightning.callbacks.precision.PrecisionGuard`` (or stack ``-c configs/memory/bf16.yaml``).

    Args:
        log_loss_scale: Under ``16-mixed`` with a ``GradScaler``, log ``precision/loss_scale`` every
            ``trainer.log_every_n_steps`` steps (reading the scale waits for the GPU, so it is not read every step).
    """

    def __init__(self, log_loss_scale: bool = True) -> None:
        self.log_loss_scale = log_loss_scale
        self.report: dict[str, Any] = {}
        self._outputs: dict[str, Optional[torch.dtype]] = {}
        self._handles: list[Any] = []
        self._mkldnn_enabled: Optional[bool] = None  # oneDNN's flag before this run turned it off, to restore it

    # --- validation ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        precision, device = str(trainer.precision), trainer.strategy.root_device
        if precision.startswith("bf16") and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            log.warning(
                f"{torch.cuda.get_device_name(device)} has no native bfloat16: {precision} will be emulated and slow; "
                "--trainer.precision 16-mixed is the fast choice on this GPU."
            )
        if stage == "fit":  # evaluation computes no gradients: float16 there loses nothing a GradScaler would keep
            check_cuda_rnn_autocast(pl_module, precision, device)
        if precision == "bf16-mixed" and device.type == "cpu":
            log.info(
                "precision bf16-mixed on CPU (Lightning also runs a `16-mixed` request this way on CPU: it warns and "
                "switches to bf16-mixed, without a GradScaler)."
            )
            if torch.backends.mkldnn.enabled and not bf16_lstm_supported():
                # PyTorch's own LSTM kernels run under autocast everywhere: gate matmuls in bfloat16, state in float32.
                self._mkldnn_enabled, torch.backends.mkldnn.enabled = True, False
                log.warning(
                    "This CPU's oneDNN has no bfloat16 LSTM kernel (it needs AVX-512 BF16), so oneDNN is off for this run: "
                    "the LSTM runs on PyTorch's own kernels, gate matmuls in bfloat16 and state in float32, slower than float32."
                )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if str(trainer.precision) == "16-true":
            for optimizer in trainer.optimizers:
                eps = min((g["eps"] for g in optimizer.param_groups if isinstance(g.get("eps"), (int, float))), default=None)
                if eps is not None and eps < MIN_EPS_16_TRUE:
                    stored = torch.tensor(eps, dtype=torch.float16).item()
                    raise LMInputError(
                        f"--trainer.precision 16-true keeps {type(optimizer).__name__}'s state in float16, which stores its "
                        f"eps={eps:g} as {stored:.3g}, so the update exp_avg / (sqrt(exp_avg_sq) + eps) blows up: pass "
                        f"--model.optimizer.eps {MIN_EPS_16_TRUE:g} (or larger), or use --trainer.precision bf16-mixed "
                        "(or 16-mixed on GPU), which keeps float32 weights and optimizer state."
                    )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the sanity check: output dtypes are read on the first training step, then the hooks go.
        self._outputs = {}
        for name, module in pl_module.named_modules():
            if next(module.parameters(recurse=False), None) is not None:
                self._handles.append(module.register_forward_hook(self._make_hook(name or type(module).__name__)))

    def _make_hook(self, name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if name not in self._outputs:  # a module called twice in one step reports its first call
                tensor = _first_tensor(output)
                self._outputs[name] = tensor.dtype if tensor is not None else None

        return hook

    # --- reporting ----------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._handles:
            self._remove_hooks()
            loss = _first_tensor(outputs)
            self.report = self._build_report(trainer, pl_module, loss.dtype if loss is not None else None)
            self._log_report(trainer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if (
            self.log_loss_scale
            and scaler is not None
            and trainer.log_every_n_steps
            and trainer.global_step % trainer.log_every_n_steps == 0
        ):
            for logger in trainer.loggers:
                logger.log_metrics({"precision/loss_scale": float(scaler.get_scale())}, step=trainer.global_step)

    def _build_report(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss_dtype: Optional[torch.dtype]
    ) -> dict[str, Any]:
        plugin = trainer.precision_plugin
        autocast = None
        if hasattr(plugin, "autocast_context_manager"):
            context = plugin.autocast_context_manager()
            autocast = f"{context.device} {_dtype_name(context.fast_dtype)}"
        params = {
            name: _dtype_name(next(m.parameters(recurse=False)).dtype)
            for name, m in pl_module.named_modules()
            if next(m.parameters(recurse=False), None) is not None
        }
        return {
            "precision": str(trainer.precision),
            "plugin": type(plugin).__name__,
            "autocast": autocast,
            "grad_scaler": getattr(plugin, "scaler", None) is not None,
            "device": str(trainer.strategy.root_device),
            "modules": {
                name: {"params": params.get(name, "-"), "output": _dtype_name(dtype)} for name, dtype in self._outputs.items()
            },
            "loss": _dtype_name(loss_dtype),
        }

    @rank_zero_only
    def _log_report(self, trainer: L.Trainer) -> None:
        r = self.report
        lines = [
            f"precision **{r['precision']}** on {r['device']}: plugin {r['plugin']}, autocast {r['autocast'] or 'off'}, "
            f"GradScaler {'on' if r['grad_scaler'] else 'off'}, loss {r['loss']}",
            "",
            "| module | parameters | output (first training step) |",
            "|---|---|---|",
            *(f"| {name} | {m['params']} | {m['output']} |" for name, m in r["modules"].items()),
        ]
        text = "\n".join(lines)
        log.info(text.replace("**", ""))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("precision/summary", text, trainer.global_step)

    # --- clean-up -----------------------------------------------------------------------------------------
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._remove_hooks()
        if self._mkldnn_enabled is not None:
            torch.backends.mkldnn.enabled, self._mkldnn_enabled = self._mkldnn_enabled, None
