"""What ``estimate --budget SIZE --fastest`` prints: the candidates' table, the fastest ``fit`` line that fits and the
runner-up, each with its predicted peak and tokens/s. The search itself is ``memory/fastest.py``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lm_lightning.callbacks.allocator import ReturnFreedMemory
from lm_lightning.callbacks.fast_allocator import FastAllocator
from lm_lightning.memory.estimate import fit_line, predict_settings
from lm_lightning.memory.fastest import (
    ALLOCATOR_NAMES,
    ALLOCATORS,
    APPROXIMATE,
    BUSY,
    HEADROOM,
    PEAK_BATCHES,
    Candidate,
    fastest,
    fits,
    run_candidate,
)
from lm_lightning.memory.machine import OtherWork
from lm_lightning.memory.measure import human_bytes
from lm_lightning.memory.probe import Probe


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
    """``estimate --budget SIZE --fastest [--allow-approximate]``: every candidate measured (``memory/fastest.py``),
    then the candidates' table, the fastest line that fits and the runner-up."""
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
        room = HEADROOM[candidate.allocator]
        kept = "" if candidate.allocator == "return" else "the heap keeps freed memory, so fits of one line peak differently: "
        print(
            f"  predicted: peak {human_bytes(candidate.peak)}, {candidate.typical:,.0f} tokens/s ({kept}fits with {room:.0%} "
            f"headroom, up to {human_bytes(int(candidate.peak * (1 + room)))})"
        )
    return fitting[0]


def kept_heap_line(model: Any, trainer: Any, data: Any, baseline: int) -> str:
    """With ``FastAllocator`` the peak is not the bytes in use the table adds up: the run measured as a candidate."""
    current = predict_settings(trainer, data)
    probe = Probe(model, trainer, data.vocab_size, data.hparams.bptt, eval_streams=data.hparams.eval_batch_size)
    measured = run_candidate(probe, Candidate(current, "fast", torch.get_num_threads()), data.hparams.batch_size, baseline, batches=PEAK_BATCHES)
    return (
        f"With FastAllocator the heap keeps what each step frees: predicted peak {human_bytes(measured.peak)} (the "
        f"resident set over probe batches with it), {measured.tokens_per_second:,.0f} tokens/s."
    )
