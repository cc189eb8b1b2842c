"""Exports at inference, side by side: resident weight bytes, process memory, generation speed, test perplexity.

    python benchmarks/inference.py --test-file ../shared/data/wikitext-2/test.txt \
        fp32=RUN/export-fp32 int8=RUN/export-int8 int4=RUN/export-int4 "80% pruned + int8"=RUN/finish/export

Each export is measured in a process of its own (so one row's memory does not show in the next), loaded the way a user
loads it (``ExportedModel.load``: int8/int4 codes resident, ``export/inference.py``), with ``--threads`` threads:

* resident weight bytes: every parameter and buffer of the loaded network, each storage once, by layer;
* process memory: RSS after ``import`` (the baseline), after loading, and the peak (VmHWM) after generating and scoring;
* generation: ``--tokens`` new tokens from ``--prompt`` (top-k 50, temperature 0.8), ``--repeats`` times in each of
  ``--rounds`` processes per export, the exports taking turns round by round (a busy stretch of a shared machine then
  slows every row, not one), median tokens/s over all of them;
* test perplexity: ``score`` on ``--test-file``, next to the figure the export measured on itself when it was written
  (they must be equal: the same text, read and batched the same way, through the same modules).

Writes the table to stdout and every figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure(folder: str, test_file: str, prompt: str, tokens: int, repeats: int, threads: int, score: bool = True) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lm_lightning.export.commands import ExportedModel

    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    model = ExportedModel.load(folder)
    load_seconds = time.perf_counter() - start
    loaded = status_kib("VmRSS")
    model.generate(prompt, max_new_tokens=5)  # first calls allocate their buffers
    speeds = []
    for seed in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, seed=seed)
        speeds.append(tokens / (time.perf_counter() - start))
    if not score:  # a later round: the speed only
        return {"tokens_per_s_runs": speeds}
    scored = model.score_file(test_file)
    evaluation = model.metadata.get("evaluation", {})
    return {
        "folder": folder,
        "bits": json.loads((Path(folder) / "manifest.json").read_text())["bits"],
        "resident_bytes": model.resident_bytes(),
        "file_bytes": sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file()),
        "rss_baseline_bytes": baseline,
        "rss_loaded_bytes": loaded,
        "peak_rss_bytes": status_kib("VmHWM"),
        "load_seconds": load_seconds,
        "tokens_per_s": statistics.median(speeds),
        "tokens_per_s_runs": speeds,
        "test_ppl": scored["ppl"],
        "score_seconds": scored["seconds"],
        "test_ppl_when_written": evaluation.get("test_ppl"),
        "test_batches_when_written": evaluation.get("test_batches"),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def table(rows: dict[str, dict]) -> str:
    base = next(iter(rows.values()))
    lines = [
        "| export | file | resident weights | vs first row | RSS after load (over import) | peak RSS | generation tokens/s | vs first row | test ppl (score) | test ppl (when written) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        written = r["test_ppl_when_written"]
        lines.append(
            f"| {name} | {mib(r['file_bytes'])} | {mib(r['resident_bytes']['total'])} | "
            f"{r['resident_bytes']['total'] / base['resident_bytes']['total']:.1%} | "
            f"{mib(r['rss_loaded_bytes'])} (+{mib(r['rss_loaded_bytes'] - r['rss_baseline_bytes'])}) | {mib(r['peak_rss_bytes'])} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['test_ppl']:.2f} | "
            f"{'—' if written is None else f'{written:.2f}'} |"
        )
    lines += ["", "Resident bytes by layer:", "", "| export | " + " | ".join(k for k in base["resident_bytes"] if k != "total") + " |"]
    lines.append("|---|" + "---:|" * (len(base["resident_bytes"]) - 1))
    for name, r in rows.items():
        layers = [k for k in base["resident_bytes"] if k != "total"]
        lines.append(f"| {name} | " + " | ".join(f"{r['resident_bytes'].get(k, 0):,} B" for k in layers) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help="NAME=FOLDER, the first row is the reference (fp32)")
    parser.add_argument("--test-file", required=True, help="the text to score (the export's own test split, to compare)")
    parser.add_argument("--prompt", default="the")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="processes per export for the speed, taking turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write every figure here (JSON)")
    parser.add_argument("--measure-one", nargs=2, metavar=("FOLDER", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_one:
        result = measure(args.measure_one[0], args.test_file, args.prompt, args.tokens, args.repeats, args.threads, not args.speed_only)
        Path(args.measure_one[1]).write_text(json.dumps(result))
        return
    if not args.exports or any("=" not in e for e in args.exports):
        sys.exit("give the exports as NAME=FOLDER (e.g. fp32=lightning_logs/version_0/export-fp32), the reference first.")
    rows: dict[str, dict] = {}
    for round_ in range(max(1, args.rounds)):
        for spec in args.exports:
            name, folder = spec.split("=", 1)
            out = Path(f"/tmp/lm_lightning_inference_{os.getpid()}.json")
            command = [sys.executable, __file__, "--measure-one", folder, str(out), "--test-file", args.test_file, "--prompt",
                       args.prompt, "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
            subprocess.run(command + ["--speed-only"] * (round_ > 0), check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            result = json.loads(out.read_text())
            out.unlink()
            if round_ == 0:
                rows[name] = result
            else:
                rows[name]["tokens_per_s_runs"] += result["tokens_per_s_runs"]
            rows[name]["tokens_per_s"] = statistics.median(rows[name]["tokens_per_s_runs"])
            print(f"round {round_ + 1}, {name}: {statistics.median(result['tokens_per_s_runs']):.0f} tokens/s", file=sys.stderr)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
