"""The next token of each stream in numpy, as ``generation.sample`` picks it in torch: temperature 0 is greedy,
``top_k`` keeps the k likeliest tokens (ties with the k-th kept too), the rest is a draw from the softmax.

The draw is numpy's (``numpy.random.default_rng(seed)``), so a seed gives the same text on every run of an ONNX
export, not the same text as the torch path's generator gives.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lm_lightning.errors import LMInputError


def check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int], num_samples: int) -> None:
    """The checks of ``export/commands.py``'s ``check_sampling``, sentence for sentence (``tests/test_deploy.py``
    holds the two equal)."""
    if not max_new_tokens >= 0:
        raise LMInputError(f"--max-new-tokens must be 0 or more, got {max_new_tokens}.")
    if not temperature >= 0:  # also refuses NaN
        raise LMInputError(f"--temperature must be >= 0, got {temperature}: give 0 for greedy decoding or e.g. 0.8.")
    if top_k is not None and top_k < 1:
        raise LMInputError(f"--top-k must be a positive integer, got {top_k}: give e.g. 50, or 0 to sample from all tokens.")
    if num_samples < 1:
        raise LMInputError(f"--num-samples must be a positive integer, got {num_samples}.")


def next_tokens(logits: np.ndarray, temperature: float, top_k: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """One token id per row of ``logits`` (streams, vocab), shape (streams, 1)."""
    if temperature == 0:
        return logits.argmax(-1)[:, None]
    scaled = logits.astype(np.float64) / temperature  # float64: the softmax of a low temperature stays finite
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    weights = np.exp(scaled - scaled.max(-1, keepdims=True))
    cumulative = weights.cumsum(-1)
    # The first token whose cumulative weight passes a uniform draw: never one of weight 0 (those add nothing).
    draw = rng.random((len(weights), 1)) * cumulative[:, -1:]
    return np.minimum((cumulative <= draw).sum(-1), weights.shape[-1] - 1)[:, None]
