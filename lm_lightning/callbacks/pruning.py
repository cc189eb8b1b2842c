"""Gradual magnitude pruning of the embedding, LSTM and decoder weights, on Lightning's ``ModelPruning``.

Zhu & Gupta (2017), "To prune, or not to prune" (arXiv:1710.01878): zero the smallest-magnitude weights a little at
a time while training goes on, so the network recovers between steps. The cubic schedule
``s(t) = s_f * (1 - (1 - t)^3)`` prunes fast early, while many weights are redundant, and slowly near the target.

``ModelPruning`` and ``torch.nn.utils.prune`` do the masking (a ``<name>_mask`` buffer and a forward pre-hook that
sets ``<name> = <name>_orig * <name>_mask``), the global / per-layer split and the checkpoint clean-up. Added here:

* The LSTM's ``weight_ih_l{k}`` / ``weight_hh_l{k}`` named explicitly (ModelPruning looks for attributes called
  ``weight`` and silently skips ``nn.LSTM``); a tied embedding/decoder matrix pruned once, the decoder given its mask.
* A schedule in *cumulative* sparsity turned into exact counts per step (torch's ``amount`` is a fraction of the
  weights still unpruned, so repeated fractions drift off target).
* Pruning at the *start* of an epoch, so that epoch's validation and checkpoints see the sparsity it trained at.
* Checkpoints holding the pruned weights (loadable without this callback) and the masks (callback state), put
  back on resume so pruned weights stay exactly zero. No lottery-ticket reset (on by default in ModelPruning).
* Masked weights kept as graph leaves between steps: torch's pre-hook leaves a non-leaf tensor on the module (and in
  ``nn.LSTM._flat_weights``), which ``copy.deepcopy`` refuses.
* Only plain typed arguments: ModelPruning's string ``pruning_fn`` does not survive LightningCLI's config.yaml.
* Sparsity per tensor in TensorBoard (``pruning/sparsity/<name>``, ``pruning/sparsity``). The export step
  (``callbacks/export.py``) then stores the pruned tensors sparsely, quantized too when the run asks for it.

Memory: while training, torch holds each pruned tensor three times (``_orig``, a mask of the same dtype, the masked
copy). Pruning shrinks the exported file and inference, not training.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
import torch.nn.utils.prune as torch_prune
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lm_lightning.callbacks.strategy import MemoryStrategy
from lm_lightning.errors import LMInputError
from lm_lightning.networks.weights import prunable_weights, pruned_count

SCHEDULES = ("constant", "linear", "cubic")


class MagnitudePruning(ModelPruning, MemoryStrategy):
    """Unstructured magnitude (L1) pruning to a target sparsity on a gradual schedule.

    Args:
        sparsity: Fraction of the pruned weights that end up exactly zero, in [0, 1).
        schedule: ``cubic`` (Zhu & Gupta 2017), ``linear``, or ``constant`` (all at once at ``start_epoch``).
        start_epoch: First epoch trained with pruned weights (pruning happens at the start of an epoch). Default: 1,
            so the network trains dense for an epoch first, as Zhu & Gupta start from a trained network (pruning
            at initialization cost far more perplexity in our runs); 0 when training lasts a single epoch, or when it
            starts from trained weights (``fit --weights_from``: a finishing phase has nothing to learn dense first).
        end_epoch: First epoch trained at the full ``sparsity``; must be below ``max_epochs``. Default: the last epoch.
        scope: ``layer``: each tensor pruned to ``sparsity`` on its own, as Zhu & Gupta do. ``global``: one magnitude
            threshold over all of them (See et al. 2016, "class-blind"); tensors then differ in sparsity, and one
            with small weights (the embedding at initialization) can be zeroed entirely.
        parameters: Names of the weights to prune within the network, e.g. ``[lstm.weight_hh_l0]``; default: every
            embedding, LSTM and decoder weight matrix. A tied embedding/decoder matrix is pruned once.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: str = "cubic",
        start_epoch: Optional[int] = None,
        end_epoch: Optional[int] = None,
        scope: str = "layer",
        parameters: Optional[list[str]] = None,
    ) -> None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise LMInputError(
                f"MagnitudePruning sparsity must be a fraction in [0, 1), got {sparsity!r}: e.g. 0.8 zeroes 80% of the weights."
            )
        if schedule not in SCHEDULES:
            raise LMInputError(f"MagnitudePruning schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
        if scope not in ("global", "layer"):
            raise LMInputError(f"MagnitudePruning scope must be 'global' or 'layer', got {scope!r}.")
        if (start_epoch is not None and start_epoch < 0) or (end_epoch is not None and end_epoch < 0):
            raise LMInputError(
                f"MagnitudePruning start_epoch and end_epoch must be >= 0 (epochs count from 0), got {start_epoch} and "
                f"{end_epoch}."
            )
        if end_epoch is not None and start_epoch is not None and end_epoch < start_epoch:
            raise LMInputError(
                f"MagnitudePruning end_epoch ({end_epoch}) comes before start_epoch ({start_epoch}): give end_epoch >= "
                "start_epoch."
            )
        # "l1_unstructured" is turned into torch's L1Unstructured here, never stored in the config (see module doc).
        super().__init__(
            "l1_unstructured",
            use_global_unstructured=scope == "global",
            amount=sparsity,
            make_pruning_permanent=True,  # checkpoints and the trained model hold plain weights with zeros
            use_lottery_ticket_hypothesis=False,  # its reset to the initial weights is not what gradual pruning does
            verbose=0,  # sparsity goes to the logger instead
        )
        self.sparsity, self.schedule, self.scope = float(sparsity), schedule, scope
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.parameter_names = list(parameters) if parameters is not None else None
        # The epochs, or their defaults once max_epochs is known (setup).
        self._start_epoch = start_epoch if start_epoch is not None or end_epoch is None else min(1, end_epoch)
        self._end_epoch = end_epoch
        self._targets: dict[str, tuple[nn.Module, str]] = {}
        self._mirrors: dict[str, tuple[nn.Module, str, str]] = {}  # name -> (module, attr, target name)
        self._restored_masks: dict[str, torch.Tensor] = {}  # from a checkpoint, applied at train start

    name = "pruning"
    trains_for_export = True
    from_trained = False  # set by `fit --weights_from` (start_from_trained): the default start_epoch is then 0

    def start_from_trained(self) -> None:
        self.from_trained = True

    def probe(self, system: L.LightningModule) -> None:
        # estimate measures the costliest state: the mask and the masked copy torch's pruning keeps beside each weight.
        for module, attr in prunable_weights(system.network)[0].values():
            torch_prune.identity(module, attr)

    def hparams(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "schedule": self.schedule, "scope": self.scope,
                "start_epoch": self._start_epoch, "end_epoch": self._end_epoch}  # fmt: skip

    def label(self) -> str:
        return f"pruning {self.sparsity:.0%}"

    # --- schedule -------------------------------------------------------------------------------------
    def sparsity_at(self, epoch: int) -> float:
        """Target fraction of zeros while training ``epoch`` (the schedule; needs ``end_epoch`` or ``setup``)."""
        start, end = self._start_epoch, self._end_epoch
        if start is None or end is None:
            raise RuntimeError("sparsity_at needs end_epoch: give it, or call it after setup (which defaults it).")
        if epoch < start:
            return 0.0
        if self.schedule == "constant":
            return self.sparsity
        # Step k of n reaches progress k/n, so the last step (end_epoch) reaches the target exactly.
        progress = min(1.0, (epoch - start + 1) / (end - start + 1))
        if self.schedule == "linear":
            return self.sparsity * progress
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    # --- set-up ---------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.resolve_epochs(trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else None)
        network = getattr(pl_module, "network", pl_module)
        targets, mirrors = prunable_weights(network)
        if not targets:
            raise LMInputError(f"MagnitudePruning found no embedding, linear or RNN weights in {type(network).__name__}.")
        if self.parameter_names is not None:
            unknown = [n for n in self.parameter_names if n not in targets and n not in mirrors]
            if unknown:
                raise LMInputError(
                    f"MagnitudePruning parameters {unknown} are not weights of the network; choose among "
                    f"{sorted(targets) + sorted(mirrors)}."
                )
            chosen = {mirrors[n][2] if n in mirrors else n for n in self.parameter_names}
            targets = {n: t for n, t in targets.items() if n in chosen}
        self._targets = targets
        self._mirrors = {n: m for n, m in mirrors.items() if m[2] in targets}
        self._parameters_to_prune = list(targets.values())
        super().setup(trainer, pl_module, stage)  # ModelPruning checks the list against the module

    def resolve_epochs(self, max_epochs: Optional[int]) -> tuple[int, int]:
        """``(start_epoch, end_epoch)`` for a run of ``max_epochs`` (``None``: unlimited), defaults filled in."""
        if max_epochs is None and self.end_epoch is None:
            raise LMInputError(
                "MagnitudePruning needs end_epoch when trainer.max_epochs is unlimited: give --trainer.max_epochs or end_epoch."
            )
        for name, epoch in (("start_epoch", self.start_epoch), ("end_epoch", self.end_epoch)):
            if max_epochs is not None and epoch is not None and epoch >= max_epochs:
                raise LMInputError(
                    f"MagnitudePruning {name} ({epoch}) must be below max_epochs ({max_epochs}): epochs count from 0, and "
                    "pruning happens at the start of an epoch."
                )
        end = self.end_epoch if self.end_epoch is not None else max(max_epochs - 1, self.start_epoch or 0)
        start = self.start_epoch if self.start_epoch is not None else (0 if self.from_trained else min(1, end))
        self._start_epoch, self._end_epoch = start, end
        return start, end

    # --- pruning --------------------------------------------------------------------------------------
    def _apply_global_pruning(self, amount: float) -> None:
        # ``amount`` is the cumulative target; torch wants the number of weights still to prune.
        total = sum(getattr(m, a).numel() for m, a in self._parameters_to_prune)
        missing = round(amount * total) - sum(pruned_count(m, a) for m, a in self._parameters_to_prune)
        if missing > 0:
            super()._apply_global_pruning(missing)

    def _apply_local_pruning(self, amount: float) -> None:
        for module, attr in self._parameters_to_prune:
            missing = round(amount * getattr(module, attr).numel()) - pruned_count(module, attr)
            if missing > 0:
                self.pruning_fn(module, name=attr, amount=missing)

    def apply_pruning(self, amount: float) -> None:
        """Prune until a fraction ``amount`` of the weights is zero (cumulative, not a fraction of what is left)."""
        with torch.no_grad():  # the new masked weights are then graph leaves (deep-copyable)
            self._refresh()  # magnitudes as of the last optimizer step, not of the last forward
            super().apply_pruning(amount)
            self._follow_targets()

    def _run_pruning(self, current_epoch: int) -> None:
        target = self.sparsity_at(current_epoch)
        if target > 0:
            self.apply_pruning(target)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run_pruning(trainer.current_epoch)
        for name, value in self.sparsity_by_tensor().items():
            pl_module.log(f"pruning/{name}", value, on_step=False, on_epoch=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # ModelPruning prunes here; this class at the start of the epoch (see the module docstring)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # torch's pre-hook left ``orig * mask`` with its autograd history on the module; a detached view costs
        # nothing and lets other callbacks (EMA, SWA) deep-copy the model between steps.
        for module, attr in self._pruned():
            setattr(module, attr, getattr(module, attr).detach())

    def _pruned(self) -> list[tuple[nn.Module, str]]:
        pairs = list(self._targets.values()) + [(m, a) for m, a, _ in self._mirrors.values()]
        return [(m, a) for m, a in pairs if hasattr(m, f"{a}_mask")]

    def _refresh(self) -> None:
        for module, attr in self._pruned():
            setattr(module, attr, getattr(module, f"{attr}_orig") * getattr(module, f"{attr}_mask"))

    def _follow_targets(self) -> None:
        """Give each tied copy its target's mask (the same tensor) and drop the masks torch keeps per step."""
        for module, attr, target in self._mirrors.values():
            target_module, target_attr = self._targets[target]
            mask = getattr(target_module, f"{target_attr}_mask", None)
            if mask is None:
                continue
            if not hasattr(module, f"{attr}_mask"):
                torch_prune.identity(module, attr)
            setattr(module, f"{attr}_mask", mask)
            setattr(module, attr, getattr(module, f"{attr}_orig") * mask)
        # global_unstructured's CustomFromMask hooks each keep a view of the whole flattened mask of their step:
        # a leak of one mask per epoch. Only the ``_mask`` buffers are read again (apply_mask, remove).
        for module, _ in self._pruned():
            for hook in module._forward_pre_hooks.values():
                for method in getattr(hook, "_pruning_methods", (hook,)):
                    if isinstance(method, torch_prune.CustomFromMask):
                        method.mask = None

    def sparsity_by_tensor(self) -> dict[str, float]:
        """Fraction of exact zeros in each pruned tensor (``sparsity/<name>``) and over all of them (``sparsity``)."""
        stats, zeros, total = {}, 0, 0
        for name, (module, attr) in self._targets.items():
            weight = getattr(module, attr)
            n_zero = int((weight == 0).sum())
            stats[f"sparsity/{name}"] = n_zero / weight.numel()
            zeros, total = zeros + n_zero, total + weight.numel()
        stats["sparsity"] = zeros / total if total else 0.0
        return stats

    # --- checkpoints: pruned weights in the state dict (ModelPruning), masks in the callback state ------
    def state_dict(self) -> dict[str, Any]:
        masks = {
            n: getattr(m, f"{a}_mask").to(torch.bool).cpu() for n, (m, a) in self._targets.items() if hasattr(m, f"{a}_mask")
        }
        return {"masks": masks, "sparsity": self.sparsity_by_tensor()} if masks else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_masks = state_dict.get("masks", {})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Masks go back on the restored weights (zeros where pruned) so the optimizer cannot revive a pruned weight.
        # Only now: pruning renames a parameter (weight -> weight_orig) and moves it to the end of its module's
        # list, and the optimizer, built and restored before this hook, matches its saved state by position.
        masks, self._restored_masks = self._restored_masks, {}
        with torch.no_grad():
            for name, mask in masks.items():
                if name not in self._targets:
                    raise LMInputError(
                        f"The checkpoint has a pruning mask for {name!r}, which this run does not prune: resume with the "
                        "same MagnitudePruning parameters."
                    )
                module, attr = self._targets[name]
                weight = getattr(module, attr)
                if hasattr(module, f"{attr}_mask"):
                    torch_prune.remove(module, attr)
                torch_prune.custom_from_mask(module, attr, mask.to(device=weight.device, dtype=weight.dtype))
            self._follow_targets()

    # --- export ---------------------------------------------------------------------------------------
    def export_metadata(self) -> dict[str, Any]:
        return {
            "target": self.sparsity,
            "scope": self.scope,
            "schedule": self.schedule,
            **(self.sparsity_by_tensor() if self._targets else {}),
        }
