"""``estimate --budget SIZE --fastest`` (memory/fastest.py): its recommended line, run, stays within the budget, at a
20k-word vocabulary, for a tight budget and a roomy one. In subprocesses: the search sets glibc's allocator in its
own process."""

from __future__ import annotations

import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_corpus

from lm_lightning.memory.measure import _MALLINFO2

ROOT = Path(__file__).resolve().parents[1]
# Wide enough that a step's arithmetic, which the probe times, outweighs Lightning's own work per step, which it does not.
SMALL = ["--model.network.embedding_dim", "128", "--model.network.hidden_dim", "128", "--model.network.num_layers", "1"]
SMALL += ["--data.tokenizer", "whitespace", "--data.min_freq", "1", "--data.batch_size", "16", "--data.bptt", "20"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
PREDICTED = re.compile(r"predicted: peak ([\d.]+) (MiB|GiB), ([\d,]+) tokens/s")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(_MALLINFO2 is None or not Path("/proc/self/clear_refs").exists(), reason="needs glibc and Linux's /proc")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """20,000 distinct words, each seen at least once in train."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(20_000)]
    train = " ".join(words + [rng.choice(words) for _ in range(60_000)])
    lines = "\n".join(train[i : i + 400] for i in range(0, len(train), 400))
    held = "\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(40))
    return write_corpus(tmp_path_factory.mktemp("vocab20k") / "corpus", lines, held, held)


def run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "lm_lightning", *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def mib(number: str, unit: str) -> float:
    return float(number) * (1024 if unit == "GiB" else 1)


@pytest.mark.parametrize("room", ["tight", "roomy"])
def test_the_recommended_line_runs_within_its_budget_at_its_predicted_speed(room, corpus, tmp_path):
    data = ["--data.source", str(corpus), "--data.cache_dir", str(tmp_path / "cache"), *SMALL]
    out = run(["estimate", *data, "--budget", "4GiB", "--fastest"], tmp_path)
    peaks = [mib(n, u) for n, u in re.findall(r" ([\d.]+) (MiB|GiB)\s+[\d,]+\s+yes", out)]
    assert len(peaks) >= 6, out  # three allocators, with and without the chunked loss (and micro-batches)
    assert "changed:" not in out and out.count("as configured") >= len(peaks), out  # the same math only, unless allowed
    # The smallest candidate's peak and 20%: room for the headroom a candidate needs to fit (3% with freed memory
    # returned, 15% where the heap keeps it: memory/fastest.py HEADROOM), so that at least one does.
    budget = 4096 if room == "roomy" else round(min(peaks) * 1.20)
    out = run(["estimate", *data, "--budget", f"{budget}MiB", "--fastest"], tmp_path)
    words = shlex.split(out.split("the fastest run that fits:", 1)[1].splitlines()[1])
    peak_mib, unit, speed = PREDICTED.search(out.split("the fastest run that fits:", 1)[1]).groups()
    env = dict(os.environ)
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:4] == ["python", "-m", "lm_lightning", "fit"]
    steps = ["--trainer.max_steps", "100", "--trainer.val_check_interval", "100", "--trainer.limit_val_batches", "2", "--export.enabled", "false"]
    fit = run([*words[3:], *steps, *QUIET], tmp_path, env)
    line = [row for row in fit.splitlines() if " tok/s" in row][-1]
    measured_peak = float(re.search(r"peak ([\d,]+) MiB", line).group(1).replace(",", ""))
    measured_speed = float(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", ""))
    assert measured_peak <= budget, (budget, line)
    assert abs(measured_peak / mib(peak_mib, unit) - 1) < 0.15, (peak_mib, line)
    # Speed on a shared machine: within half, not 20%. At this small width Lightning's own work per step (which the
    # probe does not time) and other tenants moved a 100-step reading 34% off its prediction in one CI-like run
    # (docs/estimate.md); benchmarks/fastest.py compares the real recipes side by side.
    assert 0.5 < measured_speed / float(speed.replace(",", "")) < 1.5, (speed, line)


def test_fastest_without_a_budget_is_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lm_lightning", "estimate", "--fastest"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --fastest ranks the runs that fit a budget: give it with --budget SIZE, e.g. --budget 2GiB."


def test_allow_approximate_without_fastest_is_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lm_lightning", "estimate", "--budget", "2GiB", "--allow-approximate"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --allow-approximate widens --fastest's search: give it with --budget SIZE --fastest."


def test_changes_to_the_model_are_timed_only_when_allowed_and_labelled(tmp_path):
    """The embedded corpus, one thread: with --allow-approximate the adaptive softmax rows (and bf16's where the CPU runs
    a bfloat16 LSTM) say what they change, and so does a recommendation that is one of them (without it, every row is
    the configured model: the test above)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["estimate", "--budget", "4GiB", "--fastest", "--data.batch_size", "8"]
    wide = run([*args, "--allow-approximate"], tmp_path, env)
    rows = [r for r in wide.splitlines() if re.search(r"MiB\s+[\d,]+\s+(yes|no)", r)]
    assert all(r.rstrip().endswith("as configured") or "changed: " in r for r in rows), wide
    changed = [r for r in wide.splitlines() if "changed: adaptive softmax + input" in r]
    # The best same-math candidate's micro-batch and the smaller ones of 8, 4 and 2 (which is best is a timing).
    assert 1 <= len(changed) <= 3, wide
    assert all(re.search(r"\s-\s", r) for r in changed)  # the adaptive softmax computes its own loss: no chunks
    first = wide.split("the fastest run that fits", 1)[1].splitlines()
    if "AdaptiveSoftmax" in first[1] or "bf16-mixed" in first[1]:
        assert "(changes the model:" in first[0], first[:2]
    else:
        assert first[0] == ":", first[:2]


def _candidate(speed: float, peak: int, micro: int = 20):
    from lm_lightning.memory.fastest import Candidate
    from lm_lightning.memory.probe import Settings

    return Candidate(Settings(micro, 256, 0), "glibc", 1, peak=peak, tokens_per_second=speed, typical=speed)


def test_a_near_tie_goes_to_the_lower_peak_and_a_clear_win_to_the_faster():
    from lm_lightning.memory.fastest import order

    fast, close_smaller, slow_smallest, too_big = _candidate(2000, 700), _candidate(1960, 650, 10), _candidate(1500, 600, 5), _candidate(3000, 900)
    assert order([fast, close_smaller, slow_smallest, too_big], budget=850) == [close_smaller, fast, slow_smallest]
    assert order([fast, slow_smallest], budget=850) == [fast, slow_smallest]
    assert order([too_big], budget=850) == []  # 900 MiB and its 15% headroom


def test_the_printed_two_are_measured_again_and_a_longer_runs_peak_can_push_one_out(monkeypatch):
    """``_confirmed``: the two ranked first run again over PEAK_BATCHES steps; the peak printed is that run's alone
    (lower here than the first pass), and one the longer run pushes over the budget gives way to the next."""
    from dataclasses import replace

    from lm_lightning.memory import fastest

    first, second, third = _candidate(3000, 700), _candidate(2500, 690, 10), _candidate(2000, 600, 5)
    longer_peak = {first.settings: 800, second.settings: 650, third.settings: 610}  # first: 800 MiB x 1.15 > 850
    calls = []

    def longer_run(probe, candidate, batch_size, baseline, batches):
        calls.append((candidate.settings.micro_batch_size, batches, candidate.peak))
        return replace(candidate, peak=longer_peak[candidate.settings])

    monkeypatch.setattr(fastest, "run_candidate", longer_run)
    measured = fastest._confirmed(None, [first, second, third], budget=850, batch_size=20, baseline=0)
    assert [c.peak for c in measured] == [800, 650, 610]
    assert calls == [(20, fastest.PEAK_BATCHES, 0), (10, fastest.PEAK_BATCHES, 0), (5, fastest.PEAK_BATCHES, 0)]
    assert [c.settings.micro_batch_size for c in fastest.order(measured, 850)] == [10, 5]


def test_other_work_on_the_machine_is_seen_and_this_process_is_not():
    from lm_lightning.memory.machine import OtherWork

    with OtherWork() as own:
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:  # this process busy: not other work
            pass
    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        with OtherWork() as other:
            time.sleep(1.0)
    finally:
        burner.wait()
    # One core of os.cpu_count() busy for the whole second, less the kernel's accounting granularity.
    assert other.share > 0.6 / (os.cpu_count() or 1), other.share
    assert own.share < other.share, (own.share, other.share)
