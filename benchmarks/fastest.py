"""`estimate --budget SIZE --fastest` against what its answer does: for each budget, the recommended `fit` line, its
predicted peak RSS and tokens/s, then the same line run for a few hundred steps and measured (the fit's own console
line: peak RSS and tokens/s), with the `lean` preset and the plain PyTorch loop (benchmarks/plain_loop.py) beside them.

    python benchmarks/fastest.py --recipe configs/wikitext2_small.yaml --data-dir DIR --budgets tight middle 2GiB

Each line is run `--repeats` times (3): where glibc's heap keeps freed memory, identical fits peak differently (at
33k words one line peaked at 714-827 MiB: docs/estimate.md), so the table gives the median and the range.

`tight` and `middle` are read from the candidates of the last (roomy) budget's search: `tight` is the smallest
candidate's predicted peak and 10% (a candidate's peak varies by up to ~10% from one search to the next at 33k words),
`middle` halfway between it and the largest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREDICTED = re.compile(r"predicted: peak (?P<peak>[\d.]+ [KMG]iB), (?P<speed>[\d,]+) tokens/s")


def mib(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}[unit]


def recommend(recipe: str, data_dir: str | None, budget: str) -> tuple[list[str], dict[str, str], float, float] | None:
    """The recommended line of `estimate --fastest` (arguments after `fit`, environment) and its prediction."""
    args = [sys.executable, "-m", "lm_lightning", "estimate", "-c", recipe, "--budget", budget, "--fastest"]
    args += ["--data.data_dir", data_dir] if data_dir else []
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    print(out, flush=True)
    if "the fastest run that fits" not in out:
        return None
    block = out.split("the fastest run that fits", 1)[1].splitlines()
    line, prediction = block[1].strip(), PREDICTED.search(block[2])
    words = shlex.split(line)
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return words[4:], env, mib(prediction["peak"]), float(prediction["speed"].replace(",", ""))


def measure(fit_args: list[str], env: dict[str, str], steps: int) -> tuple[float, float]:
    """Peak RSS (MiB) and tokens/s of the line, run for `steps` optimizer steps (the fit's own last console line)."""
    short = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "2"]
    short += ["--trainer.limit_test_batches", "0", "--export.enabled", "false", "--trainer.enable_progress_bar", "false"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "configs").symlink_to(ROOT / "configs")
        done = subprocess.run(
            [sys.executable, "-m", "lm_lightning", "fit", *fit_args, *short], cwd=folder, capture_output=True, text=True,
            env={**os.environ, **env}, check=True,
        )  # fmt: skip
    line = [row for row in (done.stdout + done.stderr).splitlines() if " tok/s" in row][-1]
    speed = float(re.search(r"([\d,]+) tok/s", line).group(1).replace(",", ""))
    peak = float(re.search(r"peak ([\d,]+) MiB", line).group(1).replace(",", ""))
    return peak, speed


def measure_repeated(fit_args: list[str], env: dict[str, str], steps: int, repeats: int) -> tuple[list[float], float]:
    """The peaks (MiB) of `repeats` runs of the line, and their median tokens/s."""
    runs = [measure(fit_args, env, steps) for _ in range(repeats)]
    return [peak for peak, _ in runs], statistics.median(speed for _, speed in runs)


def spread(peaks: list[float]) -> str:
    median = statistics.median(peaks)
    return f"{median:,.0f} MiB" + (f" ({min(peaks):,.0f}-{max(peaks):,.0f})" if len(peaks) > 1 else "")


def candidate_peaks(recipe: str, data_dir: str | None, budget: str) -> list[float]:
    """The predicted peaks (MiB) of every candidate `estimate --fastest` times for `budget`."""
    args = [sys.executable, "-m", "lm_lightning", "estimate", "-c", recipe, "--budget", budget, "--fastest"]
    out = subprocess.run([*args, *(["--data.data_dir", data_dir] if data_dir else [])], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [mib(f"{n} {u}") for n, u in re.findall(r" ([\d.]+) (KiB|MiB|GiB)\s+[\d,]+\s+(?:yes|no)", out)]


def plain_loop(recipe: str, data_dir: str | None, steps: int) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), "--recipe", recipe, "--epochs", "1"]
        args += ["--max-steps", str(steps), "--eval-batches", "2", "--out", out.name, *(["--data-dir", data_dir] if data_dir else [])]
        subprocess.run(args, cwd=ROOT, capture_output=True, check=True)
        result = json.loads(Path(out.name).read_text())
    return result["peak_rss_bytes"] / 2**20, result["tokens_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/wikitext2_small.yaml")
    parser.add_argument("--data-dir", default=None, help="a folder holding the recipe's train/valid/test.txt")
    parser.add_argument("--budgets", nargs="+", default=["tight", "middle", "2GiB"], help="sizes, or tight / middle (see above)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="fits of each line (the median and the range are reported)")
    args = parser.parse_args()
    budgets = list(args.budgets)
    if {"tight", "middle"} & set(budgets):
        peaks = candidate_peaks(args.recipe, args.data_dir, next(b for b in reversed(budgets) if b not in ("tight", "middle")))
        named = {"tight": f"{min(peaks) * 1.10:.0f}MiB", "middle": f"{(min(peaks) * 1.10 + max(peaks)) / 2:.0f}MiB"}
        budgets = [named.get(b, b) for b in budgets]
    data = ["--data.data_dir", args.data_dir] if args.data_dir else []
    rows = ["| budget | recommended (after `fit -c RECIPE`) | predicted peak | measured peak: median (range) | predicted tokens/s | measured tokens/s (median) |", "|---|---|---:|---:|---:|---:|"]
    for budget in budgets:
        found = recommend(args.recipe, args.data_dir, budget)
        if found is None:
            rows.append(f"| {budget} | nothing fits | | | | |")
            continue
        fit_args, env, peak, speed = found
        peaks, measured_speed = measure_repeated(fit_args, env, args.steps, args.repeats)
        measured_peak = statistics.median(peaks)
        extra = " ".join([*(f"{k}={v}" for k, v in env.items()), *fit_args[2:]]).replace(" ".join(data), "").strip()
        fits = "" if max(peaks) <= mib(budget.replace("MiB", " MiB").replace("GiB", " GiB")) else ", over the budget"
        rows.append(
            f"| {budget} | `{extra or '(as configured)'}` | {peak:,.0f} MiB | {spread(peaks)}, median {measured_peak / peak - 1:+.1%}{fits} | "
            f"{speed:,.0f} | {measured_speed:,.0f} ({measured_speed / speed - 1:+.0%}) |"
        )
    peaks, speed = measure_repeated(["-c", args.recipe, "-c", "configs/memory/lean.yaml", *data], {}, args.steps, args.repeats)
    rows.append(f"| `-c configs/memory/lean.yaml` | | | {spread(peaks)} | | {speed:,.0f} |")
    runs = [plain_loop(args.recipe, args.data_dir, args.steps) for _ in range(args.repeats)]
    rows.append(f"| plain PyTorch loop | | | {spread([p for p, _ in runs])} | | {statistics.median(s for _, s in runs):,.0f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
