"""``estimate --budget SIZE --fastest``: of the settings that fit SIZE, the one that trains fastest, from timed probe
steps of each candidate, not from a table.

The candidates turn levers that leave the math as it is: glibc's allocator (as configured, freed memory returned at
once, or kept for the next step: ``ReturnFreedMemory`` / ``FastAllocator``), the chunked loss, the micro-batch of
gradient accumulation and the number of threads. Each candidate runs one validation window, one warm-up batch and
three timed batches of a copy of the run's model on random ids, in this process, with its allocator set as its callback would set it; its
peak is read as the process's peak resident set over those batches (the kernel's ``VmHWM``, reset before each
candidate through ``/proc/self/clear_refs``), so what the allocator keeps is in the prediction, not only the bytes in
use. The answer is printed as a runnable ``fit`` line with its predicted peak and tokens/s, the runner-up beside it.
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
from lm_lightning.memory.estimate import fit_line, predict_settings
from lm_lightning.memory.machine import OtherWork, read_hwm, reset_hwm
from lm_lightning.memory.measure import human_bytes, rss_bytes
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
# The headroom a candidate needs under the budget, by allocator: a fit's resident peak came out up to 12% above its
# probe's where the heap keeps freed buffers (glibc's own, FastAllocator: at 33k words one line peaked at 713-777 MiB
# in three fits, 681-700 predicted), and within 3% where they are returned (docs/estimate.md).
HEADROOM = {"glibc": 0.15, "fast": 0.15, "return": 0.03}
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
    does not decide). Within ``TIE`` of the fastest, the lowest peak wins. Returns (measured, fitting ones best first)."""
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
    return measured, order(measured, budget)


def order(measured: list[Candidate], budget: int) -> list[Candidate]:
    """The candidates that fit ``budget``, fastest first, except that a near tie (within ``TIE``) goes to the lower
    peak: the timing cannot tell them apart, the memory can."""
    fitting = _ranked(measured, budget)
    if not fitting:
        return []
    tied = [c for c in fitting if c.tokens_per_second >= (1 - TIE) * fitting[0].tokens_per_second]
    first = min(tied, key=lambda c: c.peak)
    return [first, *(c for c in fitting if c is not first)]


def configured_allocator(trainer: Any) -> Optional[str]:
    """The allocator a run's callbacks already set (a preset's): the search keeps it rather than stack an opposite."""
    for callback in trainer.callbacks:
        if isinstance(callback, FastAllocator):
            return "fast"
        if isinstance(callback, ReturnFreedMemory):
            return "return"
    return None


def command(fit_line: str, candidate: Candidate, configured: Optional[str], default_threads: int) -> str:
    """The runnable line: the allocator's callback appended, the thread count in front when it is not the default."""
    line = fit_line
    if candidate.allocator != "glibc" and candidate.allocator != configured:
        line = f"{line} {ALLOCATORS[candidate.allocator]}"
    if candidate.change:
        line = f"{line} {APPROXIMATE[candidate.change][1]}"
    if candidate.threads != default_threads:
        line = f"OMP_NUM_THREADS={candidate.threads} {line}"
    return line


def table(measured: list[Candidate], budget: int) -> str:
    rows = ["  allocator                          loss chunks  micro-batch  threads      peak   tokens/s  fits  model"]
    for c in measured:
        s = c.settings
        rows.append(
            f"  {ALLOCATOR_NAMES[c.allocator]:<34} {s.loss_chunk_size or '-':>11}  {s.micro_batch_size:>11}  {c.threads:>7}  "
            f"{human_bytes(c.peak):>9}  {c.tokens_per_second:>9,.0f}  {'yes' if fits(c, budget) else 'no ':<4}  "
            f"{'changed: ' + APPROXIMATE[c.change][0] if c.change else 'as configured'}"
        )
    return "\n".join(rows)


def fastest_command(model: Any, trainer: Any, data: Any, fit_args: list[str], budget: int, baseline: int, approximate: bool = False) -> Optional[Candidate]:
    """``estimate --budget SIZE --fastest [--allow-approximate]``: the candidates' table, then the fastest line that
    fits and the runner-up."""
    current = predict_settings(trainer, data)
    probe = Probe(model, trainer, data.vocab_size, data.hparams.bptt, eval_streams=data.hparams.eval_batch_size)
    configured = configured_allocator(trainer)
    default_threads = torch.get_num_threads()
    with OtherWork() as other:
        measured, fitting = fastest(probe, current, data.hparams.batch_size, baseline, budget, configured, approximate)
    kinds = "the same math, and changes to the model (labelled)" if approximate else "the same math"
    print(f"\nCandidates with {kinds} (timed probe steps here; peak = the process's resident set over them):\n{table(measured, budget)}")
    if other.share > BUSY:
        print(
            f"\nNote: other processes took {other.share:.0%} of this machine's CPUs while the candidates were timed, so "
            "their speeds (not their peaks) say as much about that work as about the settings: run estimate again when "
            "the machine is quieter."
        )
    if not fitting:
        print(f"\nBudget {human_bytes(budget)}: none of them fits with its allocator's headroom ({HEADROOM['fast']:.0%}; {HEADROOM['return']:.0%} with freed memory returned).")
        return None
    for title, candidate in zip(("the fastest run that fits", "runner-up"), fitting[:2]):
        line = command(fit_line(fit_args, current, candidate.settings), candidate, configured, default_threads)
        note = f" (changes the model: {APPROXIMATE[candidate.change][0]}; its perplexity is not the configured model's)" if candidate.change else ""
        print(f"\nBudget {human_bytes(budget)}, {title}{note}:\n  {line}")
        print(f"  predicted: peak {human_bytes(candidate.peak)}, {candidate.typical:,.0f} tokens/s (fits with {HEADROOM[candidate.allocator]:.0%} headroom)")
    return fitting[0]


def kept_heap_line(model: Any, trainer: Any, data: Any, baseline: int) -> str:
    """With ``FastAllocator`` the peak is not the bytes in use the table adds up: the run measured as a candidate."""
    current = predict_settings(trainer, data)
    probe = Probe(model, trainer, data.vocab_size, data.hparams.bptt, eval_streams=data.hparams.eval_batch_size)
    measured = run_candidate(probe, Candidate(current, "fast", torch.get_num_threads()), data.hparams.batch_size, baseline)
    return (
        f"With FastAllocator the heap keeps what each step frees: predicted peak {human_bytes(measured.peak)} (the "
        f"resident set over probe batches with it), {measured.tokens_per_second:,.0f} tokens/s."
    )
