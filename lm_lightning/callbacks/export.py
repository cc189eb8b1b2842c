"""The export step: at the end of fit, one export of the trained network, as the run's strategies call for it.

Strategies only change training; this step writes what they trained for. With ``QuantizationAwareFinishing`` on, the
export has its bits (the weights were trained for exactly that rounding); with ``MagnitudePruning`` on, the pruned
zeros are stored sparsely (``export.py`` keeps whichever layout is smaller); with both, one export is sparse *and*
integer. Without a strategy, ``--export.bits 8`` (or 4) is post-training quantization and ``--export.enabled true``
a float32 export. The export is then loaded back and scored on the test split (``export/test_ppl``), so the reported
perplexity is that of the file, not of the model in memory.

The CLI always has this step (``--export.*``); ``python -m lm_lightning export`` runs it on a saved checkpoint.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.utils.prune as torch_prune
from lightning.pytorch.callbacks import Callback
from torch import nn

from lm_lightning.callbacks.quantization import QuantizationAwareFinishing, disable_fake_quantization
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import perplexity
from lm_lightning.export import export_model, load_exported, network_tensors, record_evaluation
from lm_lightning.networks import NETWORKS
from lm_lightning.quantization import block_width, check_quantization

log = logging.getLogger(__name__)


def plain_copy(network: nn.Module) -> nn.Module:
    """A copy of ``network`` with pruning made permanent (plain weights with zeros) and fake quantization off;
    the live network is left as it is."""
    for module in network.modules():  # torch's pruning pre-hook leaves a non-leaf ``weight``, which deepcopy refuses
        for name, tensor in list(vars(module).items()):
            if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                setattr(module, name, tensor.detach())
    plain = copy.deepcopy(network)
    for module in plain.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                hook.remove(module)  # weight_orig becomes weight = orig * mask (the same Parameter: ties survive)
                del module._forward_pre_hooks[key]
    disable_fake_quantization(plain)
    return plain


class Export(Callback):
    """Export the trained network at the end of fit, load it back and report its size and test perplexity.

    Args:
        enabled: Export at the end of fit. Unset: when the run trains for an export (``MagnitudePruning`` or
            ``QuantizationAwareFinishing`` is on) or ``bits`` is given.
        bits: 8 (int8 per output row) or 4 (int4 groups). Unset: the bits ``QuantizationAwareFinishing`` trained
            for, else float32.
        group_size: Inputs sharing one int4 scale. Unset: QAT's, else 32.
        folder: Where the export goes; default ``<log_dir>/export``.
        evaluate: Score the loaded export on the test split (``--trainer.limit_test_batches`` applies).
    """

    def __init__(
        self,
        enabled: Optional[bool] = None,
        bits: Optional[int] = None,
        group_size: Optional[int] = None,
        folder: Optional[str] = None,
        evaluate: bool = True,
    ) -> None:
        check_quantization(bits, group_size or 32)
        self.enabled, self.bits, self.group_size, self.folder, self.evaluate = enabled, bits, group_size, folder, evaluate
        self.report: Optional[dict] = None  # export report + "test_ppl", after fit

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if sum(isinstance(c, Export) for c in trainer.callbacks) > 1:
            raise LMInputError("Export is in trainer.callbacks twice: keep one (the CLI adds it; set it with --export.*).")
        qat = next((c for c in trainer.callbacks if isinstance(c, QuantizationAwareFinishing)), None)
        if qat is not None and self.bits is not None and self.bits != qat.bits:
            raise LMInputError(
                f"--export.bits {self.bits} differs from the int{qat.bits} that QuantizationAwareFinishing trains for: "
                "drop --export.bits (the export follows QAT) or change the QAT bits."
            )
        self._bits = self.bits if self.bits is not None else (qat.bits if qat is not None else None)
        self._group_size = self.group_size or (qat.group_size if qat is not None else 32)
        self._enabled = (
            self.enabled
            if self.enabled is not None
            else (self.bits is not None or any(getattr(c, "trains_for_export", False) for c in trainer.callbacks))
        )
        if self._enabled and self._bits is not None:  # fail now, not after training, if the export cannot be written
            for name, tensor in network_tensors(pl_module.network)[0].items():
                if tensor.is_floating_point() and tensor.dim() == 2:
                    block_width(tensor.shape, self._bits, self._group_size, name)
        self.report = None

    hparam_name = "export"

    def hparams(self) -> dict[str, Any]:
        """The export's format in the run's HPARAMS row (after setup)."""
        if not getattr(self, "_enabled", False):
            return {"format": "none"}
        return {"format": f"int{self._bits}" if self._bits else "float32", "group_size": self._group_size if self._bits == 4 else "none"}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or not trainer.is_global_zero:
            return
        folder = (Path(self.folder) if self.folder else Path(trainer.log_dir or trainer.default_root_dir) / "export").absolute()
        metadata: dict[str, Any] = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        metadata.update({type(c).__name__: c.export_metadata() for c in trainer.callbacks if hasattr(c, "export_metadata")})
        self.report = export_network(
            pl_module.network,
            folder,
            self._bits,
            self._group_size,
            trainer.datamodule,
            metadata,
            test_batches=test_batch_limit(trainer, trainer.datamodule) if self.evaluate else 0,
        )
        metrics = {"export/bytes": float(self.report["bytes"]), "hp/export_mib": self.report["bytes"] / 2**20}
        if self.report["test_ppl"] is not None:
            metrics["export/test_ppl"] = metrics["hp/export_test_ppl"] = self.report["test_ppl"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        print(describe(self.report))


def export_network(
    network: nn.Module,
    folder: Path,
    bits: Optional[int],
    group_size: int,
    datamodule: Any = None,
    metadata: Optional[dict] = None,
    test_batches: Optional[int] = None,
) -> dict:
    """Export a plain copy of ``network`` with the datamodule's vocabulary, then score the loaded export on the test
    split (``test_batches``: at most that many windows; 0 skips it). Returns ``export_model``'s report + ``test_ppl``."""
    plain = plain_copy(network)
    metadata = dict(metadata or {})
    if hasattr(datamodule, "export_settings"):  # how to read text: `generate` and `score` need no datamodule then
        metadata["text"] = datamodule.export_settings()
    report = export_model(plain, folder, bits, group_size, getattr(datamodule, "vocab", None), metadata)
    report["test_ppl"] = None
    if test_batches != 0 and hasattr(datamodule, "test_dataloader"):
        # Measured on the export as it is loaded for use (integer weights resident), and written into its manifest:
        # `score` on the same text reproduces this figure.
        loaded = load_exported(folder) if type(plain).__name__ in NETWORKS else load_exported(folder, network=plain)
        datamodule.setup("test")
        device = next(network.parameters()).device
        report["test_ppl"] = perplexity(loaded.to(device), datamodule.test_dataloader(), test_batches)
        record_evaluation(folder, {"test_ppl": report["test_ppl"], "test_batches": test_batches})
        report["bytes"] = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())  # the manifest grew
    return report


def describe(report: dict) -> str:
    kind = f"int{report['bits']}" if report["bits"] else "float32"
    ppl = f"{report['test_ppl']:.2f}" if report["test_ppl"] is not None else "not measured"
    share = report["bytes"] / report["float32_bytes"]
    size = f"{report['bytes']:,} bytes ({share:.0%} of float32 weights)"
    return f"Exported the {kind} model to {report['folder']}: {size}, test perplexity {ppl}"


def test_batch_limit(trainer: L.Trainer, datamodule: Any) -> Optional[int]:
    """``--trainer.limit_test_batches`` as a window count (``None``: all); 0 means no test evaluation is wanted."""
    limit = trainer.limit_test_batches
    if isinstance(limit, int):
        return limit
    if limit >= 1.0:
        return None
    datamodule.setup("test")
    return int(len(datamodule.test_dataloader()) * limit)
