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
    # The smallest candidate's peak and 15%: a fit's resident peak has come out up to 13% off the probe's with the
    # machine shared (docs/estimate.md); the benchmark, not this test, holds the prediction to a few percent.
    budget = 4096 if room == "roomy" else round(min(peaks) * 1.15)
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
    assert abs(measured_peak / mib(peak_mib, unit) - 1) < 0.20, (peak_mib, line)
    # Speed on a shared machine: a factor, not a figure (the benchmark, benchmarks/fastest.py, compares it closely).
    assert 0.5 < measured_speed / float(speed.replace(",", "")) < 2.0, (speed, line)


def test_fastest_without_a_budget_is_one_sentence(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lm_lightning", "estimate", "--fastest"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: --fastest ranks the runs that fit a budget: give it with --budget SIZE, e.g. --budget 2GiB."
