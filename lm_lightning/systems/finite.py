"""The training loss checked for NaN and infinity before the optimizer step uses it, in one sentence.

Reading a flag from the device waits for everything queued there: on CPU nothing is queued, so each micro-batch's loss
is read at once, before its backward pass; on a GPU that read made the host wait at every micro-batch. There the flags
stay on the device, as tensors, and are read together once per optimizer step (``StreamSystem.on_before_optimizer_step``,
after the backward passes, before the weights change), which keeps the promise that matters: the weights, and any
checkpoint written later, are those of the last good step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from lm_lightning.errors import LMInputError


def reading_waits(device: torch.device) -> bool:
    """Whether reading a tensor on ``device`` makes the host wait for the device (every device but the CPU)."""
    return device.type != "cpu"


class _Loss(NamedTuple):
    not_finite: torch.Tensor  # a bool on the loss's device, not read yet
    loss: torch.Tensor
    batch_idx: int
    step: int
    epoch: int


class UncheckedLosses:
    """The training losses since the last check, read together by :meth:`check`."""

    def __init__(self) -> None:
        self.losses: list[_Loss] = []

    def add(self, loss: torch.Tensor, batch_idx: int, step: int, epoch: int) -> None:
        loss = loss.detach()
        self.losses.append(_Loss(~torch.isfinite(loss), loss, batch_idx, step, epoch))

    def check(self, trainer: Any) -> None:
        """One sentence if a loss since the last check was not finite, here or on another rank. Under DDP all ranks
        decide together: a rank that stopped alone would leave the others waiting in the gradient all-reduce (every
        rank checks at the same micro-batches: the same device type, the same accumulation)."""
        losses, self.losses = self.losses, []
        if not losses:
            return
        flags = torch.stack([item.not_finite for item in losses]).tolist()  # the one wait for the device
        first = next((item for item, flag in zip(losses, flags) if flag), None)
        anywhere = trainer.strategy.reduce_boolean_decision(first is not None, all=False) if trainer.world_size > 1 else first is not None
        if not anywhere:
            return
        item = first or losses[-1]
        value = float(item.loss) if first is not None else "not finite on another rank"
        raise LMInputError(
            f"The training loss is {value} at step {item.step} (epoch {item.epoch}, batch {item.batch_idx}): "
            "lower the learning rate (--model.optimizer.init_args.lr) or clip harder (--trainer.gradient_clip_val); "
            "checkpoints written before this step are kept."
        )
