"""The next token of each stream in numpy, as ``generation.sample`` picks it in torch: temperature 0 is greedy,
``top_k`` keeps the k likeliest tokens (ties with the k-th kept too), the rest is a draw from the softmax.

The draw is numpy's (``numpy.random.default_rng(seed)``), so a seed gives the same text on every run of an ONNX
export, not the same text as the torch path's generator gives.

The bounds of every generation (``generate`` on either export, the Python API, ``predict``) are checked here, in one
set of sentences: fixed caps that ``--help`` states, and the memory the sampled text and one step's logits need
against what this process can still take. Nothing here imports torch (``deploy/`` never does).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

from lm_lightning.errors import LMInputError
from lm_lightning.memory.available import available_bytes, human_bytes

# One run's caps. The recurrent state carries any length, so these bound the time, not the model: at the few thousand
# tokens per second of one CPU thread, MAX_NEW_TOKENS is under a minute for a small model; MAX_SAMPLES streams step
# together, so a step costs that many times one stream's.
MAX_NEW_TOKENS = 100_000
MAX_SAMPLES = 10_000
# Below the lowest temperature sampling is greedy in effect (and torch's float32 division by it overflows near 1e-38);
# above the highest it is uniform noise in effect (logits 20 apart end up 0.2 apart). 0 itself is greedy decoding.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0

# What generating holds, measured on an ONNX export (tests/test_generation_bounds.py keeps it an upper bound): per
# token of a row until the text is returned, its id in the step's array and the joined one (int64 each), a Python int
# in the row lists and its share of the decoded text; per step, the arrays' own headers; per logit of a step, float32
# out of the graph and next_tokens' three float64 copies.
TOKEN_BYTES = 64
STEP_BYTES = 512
LOGIT_BYTES = 4 + 3 * 8
# Smaller requests are never refused (a validation's text sample, a few prompts): they cannot be what exhausts the
# memory, and a momentary low reading of it must not stop a fit at its next validation.
ALWAYS_FITS = 64 << 20


@dataclass(frozen=True)
class Flags:
    """How a caller names the settings in its sentences: ``generate``'s flags, ``predict``'s."""

    max_new_tokens: str = "--max-new-tokens"
    temperature: str = "--temperature"
    top_k: str = "--top-k"
    num_samples: str = "--num-samples"
    every_token: str = "0"  # the top-k value that samples from all tokens


GENERATE_FLAGS = Flags()
PREDICT_FLAGS = Flags("--model.max_new_tokens", "--model.temperature", "--model.top_k", "--data.num_prompts", "null")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_new_tokens(value: object, flag: str) -> None:
    """A number of tokens to generate: 0 to MAX_NEW_TOKENS (``--model.sample_length`` too)."""
    if not _is_int(value):
        raise LMInputError(f"{flag} must be an integer, got {value!r}: give a number of tokens such as 50.")
    if value < 0:
        raise LMInputError(f"{flag} must be >= 0, got {value}: give a number of tokens (0 generates none).")
    if value > MAX_NEW_TOKENS:
        raise LMInputError(
            f"{flag} {value:,} is more than the {MAX_NEW_TOKENS:,} tokens one run generates: give {MAX_NEW_TOKENS:,} or fewer "
            "(a longer text: continue it from its end in another run)."
        )


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: Optional[int], num_samples: Optional[int], flags: Flags = GENERATE_FLAGS
) -> None:
    """Every bound that holds before a model is loaded, in the sentences of ``flags`` (``num_samples`` None: not
    the caller's to check). ``export/commands.py``'s ``ExportedModel`` and the ONNX runtime both call it."""
    check_new_tokens(max_new_tokens, flags.max_new_tokens)
    t = flags.temperature
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise LMInputError(f"{t} must be a number, got {temperature!r}: give 0 for greedy decoding or e.g. 0.8.")
    if not temperature >= 0:  # also refuses NaN
        raise LMInputError(f"{t} must be >= 0, got {temperature}: give 0 for greedy decoding or e.g. 0.8.")
    if temperature > MAX_TEMPERATURE:  # also refuses inf
        raise LMInputError(
            f"{t} must be at most {MAX_TEMPERATURE:g}, got {temperature}: hotter samples uniformly in effect; give e.g. 0.8 (0 is greedy)."
        )
    if 0 < temperature < MIN_TEMPERATURE:
        raise LMInputError(
            f"{t} must be 0 or at least {MIN_TEMPERATURE:g}, got {temperature}: colder is greedy in effect; give 0 for greedy decoding."
        )
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise LMInputError(
            f"{flags.top_k} must be a positive integer, got {top_k}: give e.g. 50, or {flags.every_token} to sample from all tokens."
        )
    if num_samples is None:
        return
    if not _is_int(num_samples) or num_samples < 1:
        raise LMInputError(f"{flags.num_samples} must be a positive integer, got {num_samples}.")
    if num_samples > MAX_SAMPLES:
        raise LMInputError(
            f"{flags.num_samples} {num_samples:,} is more than the {MAX_SAMPLES:,} samples one run generates: give {MAX_SAMPLES:,} or fewer."
        )


def sampling_bytes(rows: int, tokens: int, width: int, streams: Optional[int] = None) -> int:
    """The peak of generating ``rows`` texts of ``tokens`` tokens each (prompt included), ``streams`` of them at a time
    (default: all), over ``width`` logits a step (the vocabulary, or k where the graph's top-k runs)."""
    streams = rows if streams is None else streams
    return rows * tokens * TOKEN_BYTES + tokens * STEP_BYTES + streams * width * LOGIT_BYTES


def check_memory(rows: int, tokens: int, width: int, flags: Flags = GENERATE_FLAGS, streams: Optional[int] = None) -> None:
    """Refuse, before the first step, a generation whose buffers need more memory than this process can still take
    (unchecked where the system does not say: macOS, Windows)."""
    needed = sampling_bytes(rows, tokens, width, streams)
    if needed <= ALWAYS_FITS:
        return
    free = available_bytes()
    if free is None or needed <= free:
        return
    per_row = (free - sampling_bytes(rows, 0, width, streams)) // (rows * TOKEN_BYTES + STEP_BYTES)
    fit = f"give fewer samples, or at most about {per_row:,} tokens each" if per_row > 0 else "give fewer samples"
    raise LMInputError(
        f"{rows:,} samples ({flags.num_samples}) of {tokens:,} tokens (the prompt and {flags.max_new_tokens}) need about "
        f"{human_bytes(needed)} of memory, more than the {human_bytes(free)} this process can still take: {fit}."
    )


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
