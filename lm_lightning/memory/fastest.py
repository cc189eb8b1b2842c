"""``estimate --budget SIZE --fastest``: of the settings that fit SIZE, the one that trains fastest, from timed probe
steps of each candidate, not from a table.

The candidates turn levers that leave the math as it is: glibc's allocator (as configured, freed memory returned at
once, or kept for the next step: ``ReturnFreedMemory`` / ``FastAllocator``), the chunked loss, the micro-batch of
gradient accumulation and the number of threads. Each candidate runs one warm-up batch and three timed batches of a
copy of the run's model on random ids, in this process, with its allocator set as its callback would set it; its
peak is read as the process's peak resident set over those batches (the kernel's ``VmHWM``, reset before each
candidate through ``/proc/self/clear_refs``), so what the allocator keeps is in the prediction, not only the bytes in
use. The answer is printed as a runnable ``fit`` line with its predicted peak and tokens/s, the runner-up beside it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from lm_lightning.callbacks.allocator import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, MAX_MMAP_THRESHOLD, ReturnFreedMemory, _glibc
from lm_lightning.callbacks.chunked_loss import DEFAULT_CHUNK_SIZE
from lm_lightning.callbacks.fast_allocator import FastAllocator
from lm_lightning.errors import LMInputError
from lm_lightning.memory.estimate import fit_line, predict_settings
from lm_lightning.memory.measure import human_bytes, rss_bytes
from lm_lightning.memory.probe import Probe, Settings, _probe_batch
from lm_lightning.networks.contract import output_layer

# The allocator settings a candidate can take, and the flag that sets each in a fit (appended: after the run's own).
ALLOCATORS = {"glibc": "", "return": "--trainer.callbacks+=ReturnFreedMemory", "fast": "--trainer.callbacks+=FastAllocator"}
ALLOCATOR_NAMES = {"glibc": "glibc's own", "return": "freed memory returned", "fast": "fast allocator (freed memory kept)"}


@dataclass(frozen=True)
class Candidate:
    settings: Settings
    allocator: str
    threads: int
    peak: int = 0  # predicted peak RSS of the fit (bytes)
    tokens_per_second: float = 0.0


def _read_hwm() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    """The kernel's peak resident set back to the resident set now (Linux 4.0+: "5" to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


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


def run_candidate(probe: Probe, candidate: Candidate, batch_size: int, baseline: int, batches: int = 3) -> Candidate:
    """Time ``batches`` optimizer steps of ``batch_size`` streams in micro-batches (after one to warm up) and read the
    peak resident set over them: the candidate with its predicted fit peak (``baseline`` + what the steps added)."""
    threads = torch.get_num_threads()
    micro = candidate.settings.micro_batch_size
    with _allocator(candidate.allocator), torch.random.fork_rng(devices=[]):
        torch.set_num_threads(candidate.threads)
        try:
            start_rss = rss_bytes()
            _reset_hwm()
            model, optimizer = probe.build(candidate.settings)
            times = []
            with torch.backends.mkldnn.flags(enabled=probe.onednn):
                for seed in range(batches + 1):
                    begin = time.perf_counter()
                    for part in range(batch_size // micro):
                        batch = _probe_batch(micro, probe.bptt, probe.vocab_size, torch.Generator().manual_seed(seed * 997 + part))
                        model._hidden.clear()
                        with probe.trainer.precision_plugin.forward_context():
                            loss = model._loss(batch, "train")
                        loss.backward()
                        del loss
                    if probe.trainer.gradient_clip_val:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), probe.trainer.gradient_clip_val)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    times.append(time.perf_counter() - begin)
            peak = baseline + _read_hwm() - start_rss
            del model, optimizer
            gc.collect()
        finally:
            torch.set_num_threads(threads)
    # The fastest batch, not the median: on a shared machine other work only ever slows a batch down.
    speed = batch_size * probe.bptt / min(times[1:])
    return replace(candidate, peak=peak, tokens_per_second=speed)


def candidates(probe: Probe, current: Settings, batch_size: int, configured_allocator: Optional[str]) -> list[Candidate]:
    """The same-math candidates: the run's allocator or the three, the configured loss or the chunked one, the
    micro-batch as configured and halved twice (the same effective batch), on all of this process's threads."""
    chunks = list(dict.fromkeys([current.loss_chunk_size, current.loss_chunk_size or DEFAULT_CHUNK_SIZE]))
    try:
        output_layer(probe.template.network, "ChunkedLoss")
    except LMInputError:  # a decoder another strategy replaced (the adaptive softmax) has no chunked loss
        chunks = [current.loss_chunk_size]
    micros = [m for m in (batch_size, batch_size // 2, batch_size // 4) if m >= 1 and batch_size % m == 0 and m <= current.micro_batch_size]
    allocators = [configured_allocator] if configured_allocator else list(ALLOCATORS)
    threads = torch.get_num_threads()
    return [
        Candidate(Settings(micro, chunk, current.recompute_segments), allocator, threads)
        for allocator in allocators for chunk in chunks for micro in dict.fromkeys(micros or [current.micro_batch_size])
    ]  # fmt: skip


def fastest(probe: Probe, current: Settings, batch_size: int, baseline: int, budget: int, configured_allocator: Optional[str]):
    """Every candidate measured; then the best fitting one again on one thread (small models lose more to waiting
    threads than they gain). Returns (measured candidates, fitting ones fastest first)."""
    todo = candidates(probe, current, batch_size, configured_allocator)
    run_candidate(probe, todo[0], batch_size, baseline, batches=1)  # the first batches of a process are slow: not timed
    measured = [run_candidate(probe, c, batch_size, baseline) for c in todo]
    fitting = sorted((c for c in measured if c.peak <= budget), key=lambda c: -c.tokens_per_second)
    if fitting and fitting[0].threads > 1:
        one = run_candidate(probe, replace(fitting[0], threads=1), batch_size, baseline)
        measured.append(one)
        if one.peak <= budget:
            fitting = sorted([*fitting, one], key=lambda c: -c.tokens_per_second)
    return measured, fitting


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
    if candidate.threads != default_threads:
        line = f"OMP_NUM_THREADS={candidate.threads} {line}"
    return line


def table(measured: list[Candidate], budget: int) -> str:
    rows = ["  allocator                          loss chunks  micro-batch  threads      peak   tokens/s  fits"]
    for c in measured:
        s = c.settings
        rows.append(
            f"  {ALLOCATOR_NAMES[c.allocator]:<34} {s.loss_chunk_size or '-':>11}  {s.micro_batch_size:>11}  {c.threads:>7}  "
            f"{human_bytes(c.peak):>9}  {c.tokens_per_second:>9,.0f}  {'yes' if c.peak <= budget else 'no'}"
        )
    return "\n".join(rows)


def fastest_command(model: Any, trainer: Any, data: Any, fit_args: list[str], budget: int, baseline: int) -> Optional[Candidate]:
    """``estimate --budget SIZE --fastest``: the candidates' table, then the fastest line that fits and the runner-up."""
    current = predict_settings(trainer, data)
    probe = Probe(model, trainer, data.vocab_size, data.hparams.bptt)
    configured = configured_allocator(trainer)
    default_threads = torch.get_num_threads()
    measured, fitting = fastest(probe, current, data.hparams.batch_size, baseline, budget, configured)
    print(f"\nCandidates with the same math (timed probe steps here; peak = the process's resident set over them):\n{table(measured, budget)}")
    if not fitting:
        print(f"\nBudget {human_bytes(budget)}: none of them fits; the cheapest settings above are the ones to try.")
        return None
    for title, candidate in zip(("the fastest run that fits", "runner-up"), fitting[:2]):
        line = command(fit_line(fit_args, current, candidate.settings), candidate, configured, default_threads)
        print(f"\nBudget {human_bytes(budget)}, {title}:\n  {line}")
        print(f"  predicted: peak {human_bytes(candidate.peak)}, {candidate.tokens_per_second:,.0f} tokens/s")
    return fitting[0]


def kept_heap_line(model: Any, trainer: Any, data: Any, baseline: int) -> str:
    """With ``FastAllocator`` the process keeps every freed buffer, so its peak is not the peak of the bytes in use that
    the table above adds up: the run's own settings, measured as a candidate (the resident set over probe batches)."""
    current = predict_settings(trainer, data)
    probe = Probe(model, trainer, data.vocab_size, data.hparams.bptt)
    measured = run_candidate(probe, Candidate(current, "fast", torch.get_num_threads()), data.hparams.batch_size, baseline)
    return (
        f"With FastAllocator the heap keeps what each step frees: predicted peak {human_bytes(measured.peak)} (the "
        f"resident set over probe batches with it), {measured.tokens_per_second:,.0f} tokens/s."
    )
