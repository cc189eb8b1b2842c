"""What an estimate's parts say when a budget is out of reach: the parts no setting of ``estimate``'s search changes,
the largest part, and what to change for it (each change alters the training, not only its memory)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lm_lightning.memory.measure import human_bytes

if TYPE_CHECKING:
    from lm_lightning.memory.estimate import Estimate

# What to change when a part that the search does not turn dominates (each changes the training, not only memory).
HINTS = {
    "optimizer state": " An optimizer with less state changes the training but not the model: SGD keeps none, SGD with "
    "momentum one buffer per weight, torchao.optim.AdamW8bit about a quarter of AdamW's for weights whose sizes are "
    "multiples of its block_size (--model.optimizer ...).",
    "parameters": " A smaller vocabulary (--data.max_vocab_size) or tied weights (--model.network.init_args.tie_weights true) shrink the largest matrices.",
    "gradients": " Tied weights (--model.network.init_args.tie_weights true) or sparse embedding gradients (untied: "
    "-c configs/memory/sparse_gradients.yaml) shrink them.",
    "the process baseline": " That is Python, torch, Lightning and the data, loaded before any model: a budget must be "
    "larger than it.",
}


def fixed_bytes(estimate: Estimate) -> int:
    """What every setting the search turns leaves as it is: the process, the weights, their gradients and optimizer
    state (the levers change only what a step allocates)."""
    return estimate.baseline + estimate.params + estimate.pruning + estimate.grads + estimate.optimizer


def largest_part(estimate: Estimate, fixed: bool = False) -> str:
    """The part of ``estimate``'s peak to shrink first, in words, with what to change where the search cannot
    (``fixed``: of the parts no setting of the search changes, which alone are past the budget)."""
    parts = {"the process baseline": estimate.baseline, "parameters": estimate.params + estimate.pruning, "gradients": estimate.grads,
             "optimizer state": estimate.optimizer}  # fmt: skip
    if not fixed:
        parts.update({"saved activations": estimate.activations, "temporaries": estimate.temporaries})
    largest = max(parts, key=parts.get)
    return f"its largest part is {largest} ({human_bytes(parts[largest])})." + HINTS.get(largest, "")
