"""``python -m lm_lightning estimate``: the peak memory of a fit before running it, and what makes it fit a budget.

Same flags and config files as ``fit``. How each part is predicted:

* **parameters, gradients, optimizer state**: counted on the run's own model and optimizer (one optimizer step on
  zero gradients, on a copy of the parameters, creates the state), pruning's copies and masks included. Exact.
* **what a training step allocates** (activations kept for backward, the loss and logits temporaries, backward's own
  buffers): measured on a probe -- two training steps of the run's model, precision and strategies on random ids, of
  half the micro-batch and the whole one -- with the allocator's count of bytes in use sampled after every tensor
  operation (glibc's ``mallinfo2``, see ``memory/monitor.py``). What each phase (forward, backward,
  optimizer step) holds grows linearly with the streams, so the two probes give a line per phase for the budget search
  to read at smaller micro-batches. (Probes of 1 and 2 streams would be cheaper but mislead: at a few streams the
  backward peak is set by parameter-sized buffers, at 32 by the activations; measured on the default model.)
* **the process baseline**: this process's resident memory after Python, torch, Lightning and the data are loaded,
  less the model's parameters, plus what ``fit`` itself adds (its loop, logger and progress bar; measured here).

The probe runs the run's precision and every memory strategy in its callbacks, each put in its costliest state by
its own ``probe()`` (the contract of ``callbacks/strategy.py``: fake quantization on from the first step, pruning's
masks and copies present, a fork's strategy whatever it says), with the micro-batch as the streams of a step.
``--budget SIZE`` then searches the cheapest settings that fit, turning the three levers it knows (``LEVERS``: least
recomputation, largest micro-batch at the same effective batch, the chunked loss) and prints the ``fit`` line that
uses them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from lm_lightning.callbacks.accumulation import MicroBatchAccumulation
from lm_lightning.callbacks.chunked_loss import DEFAULT_CHUNK_SIZE
from lm_lightning.callbacks.strategy import memory_strategies
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import allocated_bytes, human_bytes, rss_bytes, storage_bytes
from lm_lightning.memory.parts import fixed_bytes, largest_part
from lm_lightning.memory.probe import LEVERS, Phases, Probe, Settings
from lm_lightning.networks.contract import output_layer

# What `fit` holds beyond this process at the same point: what its first steps, first validation and first logged
# text load and keep (oneDNN's primitive cache, TensorBoard's summary modules, the validation windows, the sanity
# check). Calibrated on the default recipe at 64 and 256 units (a fit's peak RSS minus the rest of the prediction);
# tests/test_estimate.py holds predictions within 15% of measured peaks.
FIT_OVERHEAD_BYTES = 56 * 2**20


def process_baseline(model: Any) -> int:
    """What fit will hold besides the model's own memory: this process now (Python, torch, Lightning, the data and the
    model's parameters), less the parameters, plus ``FIT_OVERHEAD_BYTES``."""
    return rss_bytes() - storage_bytes(model.parameters()) + FIT_OVERHEAD_BYTES

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``2GiB``, ``1.5 GB``, ``800M``, ``123456`` -> bytes (K/M/G/T are powers of 1024 with or without the i)."""
    match = SIZE.match(str(text))
    if match is None:
        raise LMInputError(f"--budget {text!r} is not a size: give a number with a unit, such as 2GiB, 1.5GB or 800MiB.")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** ("KMGT".find(unit) + 1)) if unit else int(number)


@dataclass
class Estimate:
    settings: Settings
    baseline: int
    params: int
    grads: int
    optimizer: int
    activations: int
    temporaries: int
    precision: str
    optimizer_name: str
    pruning: int = 0  # what strategies keep beside the weights (torch's pruning: a mask and a masked copy of each)
    strategies: str = "none"  # the memory strategies the probe ran, by their labels

    @property
    def peak(self) -> int:
        return self.baseline + self.params + self.pruning + self.grads + self.optimizer + self.activations + self.temporaries

    def table(self, bptt: int) -> str:
        rows = [
            ("process baseline (Python, torch, Lightning, data)", self.baseline),
            ("parameters", self.params),
            *([("kept by strategies beside the weights (pruning masks, ...)", self.pruning)] if self.pruning else []),
            ("gradients", self.grads),
            (f"optimizer state ({self.optimizer_name})", self.optimizer),
            (f"saved activations ({self.settings.micro_batch_size} streams x {bptt} steps)", self.activations),
            ("loss/logits and backward temporaries", self.temporaries),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {human_bytes(value):>10}" for name, value in rows]
        header = f"Predicted peak memory: {human_bytes(self.peak)} (process RSS, precision {self.precision})"
        return "\n".join([header, *lines, f"  with the memory strategies: {self.strategies}"])


def _at(one: Phases, two: Phases, field: str, streams: int) -> int:
    """The line through the two probes' ``field``, at ``streams``."""
    a, b = getattr(one, field), getattr(two, field)
    slope = (b - a) / (two.streams - one.streams) if two.streams != one.streams else 0.0
    value = b + (streams - two.streams) * slope
    if streams < one.streams:  # below the probes the line can reach 0: never less than the smaller probe, scaled
        value = max(value, a * streams / one.streams)
    return max(0, round(value))


# --- the command ---------------------------------------------------------------------------------------------------
def _pop_budget(args: list[str]) -> tuple[list[str], Optional[int]]:
    rest, budget, it = [], None, iter(args)
    for arg in it:
        if arg == "--budget":
            value = next(it, None)
            if value is None:
                raise LMInputError("--budget needs a size: give e.g. --budget 2GiB.")
        elif arg.startswith("--budget="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        budget = parse_size(value)
        if budget <= 0:  # before anything is built or probed: no run fits in no memory
            raise LMInputError(f"--budget {value} is not a positive size: give the memory a fit may take, such as 2GiB or 800MiB.")
    return rest, budget


def _divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def search(probe: Probe, current: Settings, batch_size: int, bptt: int, baseline: int, precision: str, budget: int):
    """The first settings that fit, in order of cost: least recomputation, then the largest micro-batch, then the
    configured loss before the chunked one. Returns (fitting estimate or None, the smallest estimate seen)."""
    chunks = list(dict.fromkeys([current.loss_chunk_size, current.loss_chunk_size or DEFAULT_CHUNK_SIZE]))
    recomputes = list(dict.fromkeys([current.recompute_segments, max(current.recompute_segments, round(bptt**0.5))]))
    try:  # the chunked loss needs the output-layer hook, and refuses a decoder another strategy replaced
        output_layer(probe.template.network, "ChunkedLoss")
    except LMInputError:
        chunks = [current.loss_chunk_size]
    cache: dict[tuple[int, int], tuple] = {}
    smallest: Optional[Estimate] = None
    for recompute in recomputes:
        for micro in _divisors_descending(batch_size):
            for chunk in chunks:
                key = (chunk, recompute)
                if key not in cache:
                    cache[key] = probe.measure(Settings(current.micro_batch_size, chunk, recompute))
                estimate = _from_measurement(cache[key], Settings(micro, chunk, recompute), baseline, precision, probe)
                if smallest is None or estimate.peak < smallest.peak:
                    smallest = estimate
                if estimate.peak <= budget:
                    return estimate, smallest
    return None, smallest


def _from_measurement(measured: tuple, settings: Settings, baseline: int, precision: str, probe: Probe) -> Estimate:
    steady, one, two, optimizer_name = measured
    n = settings.micro_batch_size
    kept = _at(one, two, "kept", n)
    peak = max(_at(one, two, phase, n) for phase in ("forward", "backward", "optimizer"))
    return Estimate(
        settings, baseline, steady["params"], steady["grads"], steady["optimizer"], kept, max(0, peak - kept),
        precision, optimizer_name, pruning=steady["pruning"],
        strategies=" + ".join(s.label() for s in probe.strategies_for(settings) if s.label()) or "none",
    )  # fmt: skip


def fit_line(args: list[str], current: Settings, chosen: Settings) -> str:
    """The ``fit`` command with the chosen levers. A strategy given twice is kept once, the later one (the CLI), so
    each lever given here replaces the run's own (an accumulation schedule of later epochs included)."""
    extra: list[str] = []
    if chosen.micro_batch_size != current.micro_batch_size:
        extra += ["--trainer.callbacks+=MicroBatchAccumulation", "--trainer.callbacks.micro_batch_size", str(chosen.micro_batch_size)]
    if chosen.loss_chunk_size != current.loss_chunk_size:
        extra += ["--trainer.callbacks+=ChunkedLoss", "--trainer.callbacks.chunk_size", str(chosen.loss_chunk_size)]
    if chosen.recompute_segments != current.recompute_segments:
        extra += ["--trainer.callbacks+=Recomputation", "--trainer.callbacks.segments", str(chosen.recompute_segments)]
    return " ".join(["python -m lm_lightning fit", *args, *extra])


def predict_settings(trainer: Any, data: Any) -> Settings:
    """The levers as the run sets them (the largest micro-batch of an accumulation schedule: it sets the peak)."""
    accumulation = next((c for c in trainer.callbacks if isinstance(c, MicroBatchAccumulation)), None)
    micro = max(accumulation.sizes.values()) if accumulation is not None else data.hparams.batch_size
    levers = {s.name: s for s in memory_strategies(trainer) if isinstance(s, tuple(LEVERS.values()))}
    chunk = levers["chunked_loss"].chunk_size if "chunked_loss" in levers else 0
    return Settings(micro, chunk, levers["recompute"].segments if "recompute" in levers else 0)


def predict(model: Any, trainer: Any, data: Any, baseline: int) -> tuple[Estimate, Probe, Settings]:
    """The estimate for the run as configured (``model``, ``trainer`` with its callbacks, the token ``data``)."""
    current = predict_settings(trainer, data)
    probe = Probe(model, trainer, data.vocab_size, data.hparams.bptt)
    with torch.random.fork_rng(devices=[]):  # the probe's dropout masks must not move the run's
        estimate = _from_measurement(probe.measure(current), current, baseline, str(trainer.precision), probe)
    return estimate, probe, current


def speed_line(probe: Probe, current: Settings) -> str:
    """Training speed from timed probe steps, and against the network without the memory strategies' layers and hooks
    (the adaptive softmax's factor, recomputation's cost) where the run has any."""
    speed = probe.tokens_per_second(current)
    line = f"Predicted speed: {speed:,.0f} training tokens/s (timed probe steps here, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})"
    if any(s.label() for s in probe.strategies):
        plain = probe.tokens_per_second(current, plain=True)
        if plain == plain:  # not NaN: the network could be built without them
            line += f", {speed / plain:.2f}x the same run without its memory strategies ({plain:,.0f})"
    return line


def predict_in_fit(trainer: Any, model: Any) -> Optional[Estimate]:
    """The estimate at the start of ``fit`` (``MemoryMonitor``), where it applies: token path, CPU, glibc."""
    data = getattr(trainer, "datamodule", None)
    if model.device.type != "cpu" or allocated_bytes(model.device) is None or not hasattr(getattr(data, "hparams", None), "bptt"):
        return None
    if not callable(getattr(model, "_loss", None)) or not getattr(model, "token_inputs", False):
        return None
    # At fit start the loop and logger exist, but most of FIT_OVERHEAD_BYTES comes with the first steps and validation.
    return predict(model, trainer, data, process_baseline(model))[0]


USAGE = (
    "usage: python -m lm_lightning estimate [-c CONFIG ...] [fit's --model.*, --data.*, --trainer.* flags] [--budget SIZE [--fastest [--allow-approximate]]]\n\n"
    "Predicts the peak memory of `fit` with the same arguments, part by part, without training.\n"
    "  --budget SIZE   also find the cheapest settings that fit SIZE (e.g. 2GiB, 1.5GB, 800MiB) and print the fit line\n"
    "  --fastest       with --budget: time the settings that fit with the same math, print the fastest fit line and the runner-up\n"
    "  --allow-approximate  with --fastest: also time changes to the model (adaptive softmax; bf16 where the CPU has it), labelled\n"
    "For a run on a GPU (--trainer.accelerator gpu) it predicts the GPU's allocated and reserved memory by arithmetic (docs/gpu.md); --fastest is CPU-only.\n"
    "Every other option is fit's: python -m lm_lightning fit --help"
)


def split_arguments(args: list[str]) -> tuple[list[str], Optional[int]]:
    """``estimate``'s arguments -> (``fit``'s arguments, the budget in bytes or None); checks that this system can."""
    if allocated_bytes(torch.device("cpu")) is None:
        raise LMInputError("estimate needs glibc's allocator statistics (Linux): on this system read MemoryMonitor's figures after a short fit.")
    return _pop_budget(args)


def estimate_command(model: Any, trainer: Any, data: Any, fit_args: list[str], budget: Optional[int]) -> Estimate:
    """``python -m lm_lightning estimate [fit's flags and -c files] [--budget SIZE]``, on the objects the CLI built from
    ``fit_args`` (cli.py parses them; this module never builds a CLI)."""
    if not hasattr(model, "_loss") or not getattr(model, "token_inputs", False):
        raise LMInputError("estimate covers the token path (LanguageModel): for the bag path, read MemoryMonitor's figures after a short fit.")
    baseline = process_baseline(model)
    estimate, probe, current = predict(model, trainer, data, baseline)
    batch_size, bptt = data.hparams.batch_size, data.hparams.bptt
    print(estimate.table(bptt))
    print(speed_line(probe, current))
    if probe.optimizer_note:
        print(probe.optimizer_note)
    if os.environ.get("MALLOC_MMAP_MAX_") == "0" or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        print(
            "Note: MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ keep freed memory in the process, so its RSS grows past "
            "this prediction of the bytes in use."
        )
    if budget is not None and budget < fixed_bytes(estimate):
        # Below what no lever changes, nothing fits whatever the search tries: say so without its probes.
        print(
            f"\nBudget {human_bytes(budget)}: nothing fits. What no setting of the search changes (the process baseline, "
            f"parameters, gradients, optimizer state) already takes {human_bytes(fixed_bytes(estimate))} before a training "
            f"step, and {largest_part(estimate, fixed=True)}"
        )
        return estimate
    if budget is not None:
        found, smallest = search(probe, current, batch_size, bptt, baseline, str(trainer.precision), budget)
        if found is None:
            print(
                f"\nBudget {human_bytes(budget)}: nothing fits. The smallest reachable peak is {human_bytes(smallest.peak)} "
                f"(micro-batch {smallest.settings.micro_batch_size}, loss chunks {smallest.settings.loss_chunk_size}, "
                f"recompute segments {smallest.settings.recompute_segments}), and {largest_part(smallest)}"
            )
        elif found.settings == current:
            print(f"\nBudget {human_bytes(budget)}: fits as configured ({human_bytes(found.peak)}).")
        else:
            print(f"\nBudget {human_bytes(budget)}: fits with {human_bytes(found.peak)} predicted:")
            print(fit_line(fit_args, current, found.settings))
        if not any(type(c).__name__ == "ReturnFreedMemory" for c in trainer.callbacks):
            print(
                "Predicted from the bytes in use; glibc's heap keeps freed buffers on top of them, more so at large "
                "vocabularies (-c configs/memory/lean.yaml returns them): leave some headroom."
            )
        return found or smallest
    return estimate
