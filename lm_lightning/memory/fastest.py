"""``estimate --budget SIZE --fastest``: of the settings that fit SIZE, the one that trains fastest, from timed probe
steps of each candidate, not from a table.

The candidates turn levers that leave the math as it is: glibc's allocator (as configured, freed memory returned at
once, or kept for the next step: ``ReturnFreedMemory`` / ``FastAllocator``), the chunked loss, the micro-batch of
gradient accumulation and the number of threads. Each candidate runs one validation window, one warm-up batch and
three timed batches of a copy of the run's model on random ids, in this process, with its allocator set as its
callback would set it; the two to be printed are measured again over ten. Its peak is the process's peak resident
set over those batches (the kernel's ``VmHWM``, reset before each candidate through ``/proc/self/clear_refs``), so
what the allocator keeps is in the prediction, not only the bytes in use. ``memory/fastest_report.py`` prints the answer: a runnable ``fit`` line with its predicted peak
and tokens/s, the runner-up beside it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lm_lightning.callbacks.adaptive_input import AdaptiveInput
from lm_lightning.callbacks.adaptive_softmax import AdaptiveSoftmax
from lm_lightning.callbacks.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MAX_MMAP_THRESHOLD, ReturnFreedMemory, _glibc
from lm_lightning.callbacks.chunked_loss import DEFAULT_CHUNK_SIZE
from lm_lightning.callbacks.fast_allocator import FastAllocator
from lm_lightning.callbacks.precision import bf16_lstm_supported
from lm_lightning.errors import LMInputError
from lm_lightning.memory.machine import read_hwm, reset_hwm
from lm_lightning.memory.measure import rss_bytes
from lm_lightning.memory.probe import Probe, Settings, _probe_batch
from lm_lightning.networks.contract import output_layer

# The allocator settings a candidate can take, and the flag that sets each in a fit (appended: after the run's own).
ALLOCATORS = {"glibc": "", "return": "--trainer.callbacks+=ReturnFreedMemory", "fast": "--trainer.callbacks+=FastAllocator"}
ALLOCATOR_NAMES = {"glibc": "glibc's own", "return": "freed memory returned", "fast": "fast allocator (freed memory kept)"}
# Changes to the model, timed only with --allow-approximate: name -> (label, the flags that make it in a fit).
APPROXIMATE = {
    "adaptive": ("adaptive softmax + input", "--trainer.callbacks+=AdaptiveSoftmax --trainer.callbacks+=AdaptiveInput"),
    "bf16": ("bf16-mixed", "--trainer.precision bf16-mixed"),
}
# Candidates timed within this fraction of the fastest are not told apart (a shared machine's batch times vary more):
# of those, the one with the lowest peak is recommended.
TIE = 0.03
# The headroom a candidate needs under the budget, by allocator. Where the heap keeps freed buffers (glibc's own,
# FastAllocator) identical fits peak differently: one line at 33k words peaked at 714-827 MiB in 24 fits (median 747;
# pinning threads, arenas, hash seed, ASLR and the garbage collector did not make it repeat), 678-703 predicted; where
# they are returned, within 3% (docs/estimate.md).
HEADROOM = {"glibc": 0.15, "fast": 0.15, "return": 0.03}
# A heap that keeps freed memory grows over the first steps as buffers that outlive a step split its free space: the
# candidates printed are measured again over this many steps, that run's peak alone printed (at 33k words 3 steps
# read 646-692 MiB, 10 read 678-703; fits of the line 714-827 with a median of 747: docs/estimate.md).
PEAK_BATCHES = 10
# Other work taking more than this share of the machine's CPUs while candidates are timed makes the ranking unreliable.
BUSY = 0.15


@dataclass(frozen=True)
class Candidate:
    settings: Settings
    allocator: str
    threads: int
    change: str = ""  # "" (the same math) or a key of APPROXIMATE
    peak: int = 0  # predicted peak RSS of the fit (bytes)
    tokens_per_second: float = 0.0  # the fastest timed batch (what ranks candidates)
    typical: float = 0.0  # the median timed batch (what a fit's tokens/s reading is predicted to be)


@contextmanager
def _allocator(kind: str) -> Iterator[None]:
    """glibc set as the candidate's callback sets it in fit, free heap handed back first so the candidate starts clean;
    afterwards the values glibc's own rule settles on (it cannot go back to adapting)."""
    libc = _glibc()
    gc.collect()  # the previous candidate's model copy (a LightningModule holds reference cycles) out first
    if kind == "return":
        ReturnFreedMemory().setup(None, None, "fit")
    elif kind == "fast":
        FastAllocator().setup(None, None, "fit")
    libc.malloc_trim(0)
    try:
        yield
    finally:
        if kind != "glibc":
            libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * MAX_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def _change(probe: Probe, change: str) -> tuple[list[Any], Any, bool]:
    """What an approximate candidate adds to the probe's copy: strategies, a precision plugin, oneDNN on or off."""
    if change == "adaptive":
        return [AdaptiveSoftmax(), AdaptiveInput()], None, probe.onednn
    if change == "bf16":
        return [], MixedPrecision("bf16-mixed", "cpu"), torch.backends.mkldnn.enabled
    return [], None, probe.onednn


def _validation_window(model: Any, precision: Any, probe: Probe) -> None:
    model.eval()
    with torch.no_grad(), precision.forward_context():
        model._loss(_probe_batch(probe.eval_streams, probe.bptt, probe.vocab_size, torch.Generator().manual_seed(7)), "val")
    model._hidden.clear()
    model.train()


def _optimizer_step(model: Any, optimizer: Any, precision: Any, probe: Probe, batch_size: int, micro: int, seed: int) -> None:
    """One optimizer step of ``batch_size`` streams in micro-batches of ``micro``, each from a zero hidden state."""
    for part in range(batch_size // micro):
        batch = _probe_batch(micro, probe.bptt, probe.vocab_size, torch.Generator().manual_seed(seed * 997 + part))
        model._hidden.clear()
        with precision.forward_context():
            loss = model._loss(batch, "train")
        loss.backward()
        del loss
    if probe.trainer.gradient_clip_val:
        torch.nn.utils.clip_grad_norm_(model.parameters(), probe.trainer.gradient_clip_val)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_candidate(probe: Probe, candidate: Candidate, batch_size: int, baseline: int, batches: int = 3) -> Candidate:
    """Time ``batches`` optimizer steps of ``batch_size`` streams in micro-batches (after one to warm up), after one
    validation window of ``probe.eval_streams`` streams as a fit's sanity check runs, and read the peak resident set over
    them: the candidate with its predicted fit peak (``baseline`` + what the steps added)."""
    threads = torch.get_num_threads()
    micro = candidate.settings.micro_batch_size
    extra, precision, onednn = _change(probe, candidate.change)
    precision = precision or probe.trainer.precision_plugin
    with _allocator(candidate.allocator), torch.random.fork_rng(devices=[]):
        torch.set_num_threads(candidate.threads)
        try:
            start_rss = rss_bytes()
            reset_hwm()
            model, optimizer = probe.build(candidate.settings, extra, precision)
            times = []
            with torch.backends.mkldnn.flags(enabled=onednn):
                if probe.eval_streams:  # Lightning's sanity check, then each validation: their buffers pass through the heap too
                    _validation_window(model, precision, probe)
                for seed in range(batches + 1):
                    begin = time.perf_counter()
                    _optimizer_step(model, optimizer, precision, probe, batch_size, micro, seed)
                    times.append(time.perf_counter() - begin)
            peak = baseline + read_hwm() - start_rss
            del model, optimizer
            gc.collect()
        finally:
            torch.set_num_threads(threads)
    # Ranked by the fastest batch, not the median: on a shared machine other work only ever slows a batch down. A
    # candidate timed again keeps its best figures and its highest peak.
    speed, typical = (batch_size * probe.bptt / f(times[1:]) for f in (min, statistics.median))
    if candidate.tokens_per_second:
        peak, speed, typical = max(peak, candidate.peak), max(speed, candidate.tokens_per_second), max(typical, candidate.typical)
    return replace(candidate, peak=peak, tokens_per_second=speed, typical=typical)


def _micro_batches(batch_size: int, largest: int) -> list[int]:  # the same effective batch, halved and quartered
    return list(dict.fromkeys(m for m in (batch_size, batch_size // 2, batch_size // 4) if 1 <= m <= largest and batch_size % m == 0))


def candidates(probe: Probe, current: Settings, batch_size: int, configured_allocator: Optional[str]) -> list[Candidate]:
    """The same-math candidates: the run's allocator or the three, the configured loss or the chunked one, the
    micro-batch as configured and halved twice (the same effective batch), on all of this process's threads."""
    chunks = list(dict.fromkeys([current.loss_chunk_size, current.loss_chunk_size or DEFAULT_CHUNK_SIZE]))
    try:
        output_layer(probe.template.network, "ChunkedLoss")
    except LMInputError:  # a decoder another strategy replaced (the adaptive softmax) has no chunked loss
        chunks = [current.loss_chunk_size]
    micros = _micro_batches(batch_size, current.micro_batch_size)
    allocators = [configured_allocator] if configured_allocator else list(ALLOCATORS)
    threads = torch.get_num_threads()
    return [
        Candidate(Settings(micro, chunk, current.recompute_segments), allocator, threads)
        for allocator in allocators for chunk in chunks for micro in micros or [current.micro_batch_size]
    ]  # fmt: skip


def approximate_candidates(probe: Probe, best: Candidate, batch_size: int) -> list[Candidate]:
    """--allow-approximate: the changes to the model on the best same-math candidate's allocator and threads, at its
    micro-batch and the smaller ones (the adaptive softmax computes its loss its own way: no chunked loss)."""
    micros = _micro_batches(batch_size, best.settings.micro_batch_size)
    try:
        output_layer(probe.template.network, "AdaptiveSoftmax")
        changes = [] if any(s.name == "adaptive_softmax" for s in probe.strategies) else ["adaptive"]
    except LMInputError:  # a network without the contract's decoder has no adaptive softmax
        changes = []
    if "bf16" not in str(probe.trainer.precision) and bf16_lstm_supported():  # no bfloat16 LSTM kernel: fit refuses it
        changes.append("bf16")
    return [
        Candidate(replace(best.settings, micro_batch_size=micro, loss_chunk_size=0 if change == "adaptive" else best.settings.loss_chunk_size), best.allocator, best.threads, change)
        for change in changes for micro in micros
    ]  # fmt: skip


def fits(candidate: Candidate, budget: int) -> bool:
    return candidate.peak * (1 + HEADROOM[candidate.allocator]) <= budget


def _ranked(measured: list[Candidate], budget: int) -> list[Candidate]:
    return sorted((c for c in measured if fits(c, budget)), key=lambda c: -c.tokens_per_second)


def _contenders(fitting: list[Candidate]) -> list[Candidate]:
    """The fitting candidates the first round cannot tell from the fastest (within 10%): they are timed again."""
    return [c for c in fitting if c.tokens_per_second >= 0.9 * fitting[0].tokens_per_second]


def fastest(probe: Probe, current: Settings, batch_size: int, baseline: int, budget: int, configured_allocator: Optional[str], approximate: bool = False):
    """Every candidate measured; then the best fitting one again on one thread (small models lose more to waiting
    threads than they gain), and the contenders once more in reverse order (so a burst of other work on the machine
    does not decide); the two to be printed over ``PEAK_BATCHES`` steps. Within ``TIE`` of the fastest, the lowest peak
    wins. Returns (measured, fitting ones best first)."""
    todo = candidates(probe, current, batch_size, configured_allocator)
    run_candidate(probe, todo[0], batch_size, baseline, batches=1)  # the first batches of a process are slow: not timed
    measured = [run_candidate(probe, c, batch_size, baseline) for c in todo]
    fitting = _ranked(measured, budget)
    if fitting and fitting[0].threads > 1:
        measured.append(run_candidate(probe, replace(fitting[0], threads=1, peak=0, tokens_per_second=0.0, typical=0.0), batch_size, baseline))
    if fitting and approximate:
        measured += [run_candidate(probe, c, batch_size, baseline) for c in approximate_candidates(probe, _ranked(measured, budget)[0], batch_size)]
    again = {id(c) for c in _contenders(_ranked(measured, budget))} if fitting else set()
    measured = [run_candidate(probe, c, batch_size, baseline) if id(c) in again else c for c in reversed(measured)][::-1]
    measured = _confirmed(probe, measured, budget, batch_size, baseline)
    return measured, order(measured, budget)


def _confirmed(probe: Probe, measured: list[Candidate], budget: int, batch_size: int, baseline: int) -> list[Candidate]:
    """The two candidates to be printed measured once more over ``PEAK_BATCHES`` steps (in place), until the two
    that rank first have both been. Their peak is that longer run's alone, not the highest of every run (on a shared
    heap an earlier run can read high), and it may push one out of the budget."""
    done: set[int] = set()
    while todo := [c for c in order(measured, budget)[:2] if id(c) not in done]:
        for c in todo:
            again = run_candidate(probe, replace(c, peak=0), batch_size, baseline, batches=PEAK_BATCHES)
            measured[measured.index(c)] = again
            done.add(id(again))
    return measured


def order(measured: list[Candidate], budget: int) -> list[Candidate]:
    """The candidates that fit ``budget``, fastest first, except that a near tie (within ``TIE``) goes to the lower
    peak: the timing cannot tell them apart, the memory can."""
    fitting = _ranked(measured, budget)
    if not fitting:
        return []
    tied = [c for c in fitting if c.tokens_per_second >= (1 - TIE) * fitting[0].tokens_per_second]
    first = min(tied, key=lambda c: c.peak)
    return [first, *(c for c in fitting if c is not first)]
