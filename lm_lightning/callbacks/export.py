"""The export step: at the end of fit, one export of the trained network, as the run's strategies call for it.

Strategies only change training; this step writes what they trained for, asking them through the memory-strategy
contract (``callbacks/strategy.py``): a strategy that trained for integer rounding gives the export its bits, one that
pruned leaves zeros that the writer stores sparsely (``export/writer.py`` keeps whichever layout is smaller); with
both, one export is sparse *and* integer. Without a strategy, ``--export.bits 8`` (or 4) is post-training
quantization and ``--export.enabled true`` a float32 export. ``--export.format onnx`` writes an ONNX graph for ONNX
Runtime (``export/onnx_writer.py``: what deployment runs) instead of safetensors (the PyTorch side: reload to finish or
fine-tune). The export is then loaded back and scored on the test split (``export/test_ppl``), so the reported
perplexity is that of the file, not of the model in memory.

The CLI always has this step (``--export.*``); ``python -m lm_lightning export`` runs it on a saved checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from lm_lightning.callbacks.strategy import memory_strategies
from lm_lightning.errors import LMInputError
from lm_lightning.export.format import network_tensors
from lm_lightning.export.onnx_writer import check_exportable
from lm_lightning.export.quantization import block_width, check_quantization
from lm_lightning.export.settings import EXPORT_FORMATS, resolve_format, strategy_metadata, trains_for_export
from lm_lightning.export.writer import describe, export_network, test_batch_limit


class Export(Callback):
    """Export the trained network at the end of fit, load it back and report its size and test perplexity.

    Args:
        enabled: Export at the end of fit. Unset: when a strategy of the run trains for an export (pruning,
            quantization-aware training) or ``bits`` is given.
        bits: 8 (int8 per output row) or 4 (int4 groups). Unset: the bits a strategy trained for, else float32.
        group_size: Inputs sharing one int4 scale. Unset: the strategy's, else 32.
        folder: Where the export goes; default ``<log_dir>/export`` (``<log_dir>/export-onnx`` for ONNX).
        evaluate: Score the loaded export on the test split (``--trainer.limit_test_batches`` applies).
        format: ``safetensors`` (the PyTorch side: reload to finish or fine-tune) or ``onnx`` (a graph ONNX Runtime
            runs without torch: ``generate`` and ``score`` in a process a fifth the size).
    """

    def __init__(
        self,
        enabled: Optional[bool] = None,
        bits: Optional[int] = None,
        group_size: Optional[int] = None,
        folder: Optional[str] = None,
        evaluate: bool = True,
        format: Literal["safetensors", "onnx"] = "safetensors",
    ) -> None:
        check_quantization(bits, group_size or 32)
        if format not in EXPORT_FORMATS:
            raise LMInputError(f"--export.format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}.")
        self.enabled, self.bits, self.group_size, self.folder, self.evaluate = enabled, bits, group_size, folder, evaluate
        self.format = format
        self.report: Optional[dict] = None  # export report + "test_ppl", after fit

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if sum(isinstance(c, Export) for c in trainer.callbacks) > 1:
            raise LMInputError("Export is in trainer.callbacks twice: keep one (the CLI adds it; set it with --export.*).")
        strategies = memory_strategies(trainer)
        self._bits, self._group_size = resolve_format(self.bits, self.group_size, strategies)
        self._enabled = self.enabled if self.enabled is not None else (self.bits is not None or trains_for_export(strategies))
        if self._enabled and self.format == "onnx":  # fail now, not after training, if the export cannot be written
            check_exportable(pl_module.network)
        if self._enabled and self._bits is not None:
            for name, tensor in network_tensors(pl_module.network)[0].items():
                if tensor.is_floating_point() and tensor.dim() == 2:
                    block_width(tensor.shape, self._bits, self._group_size, name)
        self.report = None

    hparam_name = "export"

    def hparams(self) -> dict[str, Any]:
        """The export's format in the run's HPARAMS row (after setup)."""
        if not getattr(self, "_enabled", False):
            return {"format": "none"}
        weights = f"int{self._bits}" if self._bits else "float32"
        return {"format": weights, "file": self.format, "group_size": self._group_size if self._bits == 4 else "none"}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        default = "export-onnx" if self.format == "onnx" else "export"  # both formats of one run can sit side by side
        folder = (Path(self.folder) if self.folder else Path(trainer.log_dir or trainer.default_root_dir) / default).absolute()
        metadata: dict[str, Any] = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        metadata["strategies"] = strategy_metadata(memory_strategies(trainer))
        self.report = export_network(
            pl_module.network,
            folder,
            self._bits,
            self._group_size,
            trainer.datamodule,
            metadata,
            test_batches=test_batch_limit(trainer, trainer.datamodule) if self.evaluate else 0,
            network_init_args=_network_init_args(pl_module),
            format=self.format,
        )
        metrics = {"export/bytes": float(self.report["bytes"]), "hp/export_mib": self.report["bytes"] / 2**20}
        if self.report["test_ppl"] is not None:
            metrics["export/test_ppl"] = metrics["hp/export_test_ppl"] = self.report["test_ppl"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        print(describe(self.report))


def _network_init_args(pl_module: L.LightningModule) -> Optional[dict]:
    """The network's constructor arguments when the CLI injected it (``hparams["network"]`` is then
    ``{"class_path": ..., "init_args": {...}}``); None lets the writer read the network's own ``config``."""
    spec = getattr(pl_module, "hparams", {}).get("network")
    return spec.get("init_args") if isinstance(spec, dict) and isinstance(spec.get("init_args"), dict) else None
