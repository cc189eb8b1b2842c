"""Exports at inference, side by side: file size, process memory, start-up, generation speed, test perplexity.

    python benchmarks/inference.py --test-file DATA/wikitext-2/test.txt \
        "fp32 ONNX=RUN/export-onnx-fp32" "int8 ONNX=RUN/export-onnx-int8" "fp32 safetensors=RUN/export-fp32"

A row is ``NAME=FOLDER``, or ``NAME=FOLDER::CHECKOUT`` to run it with another checkout of this project (an older
commit, to compare its runtime with this one's in the same run). Each row is measured in processes of its own, loaded
the way a user loads it: an ONNX export by ``deploy/runtime.py``'s ``OnnxModel`` (ONNX Runtime, no torch in the
process), a safetensors export by ``export/commands.py``'s ``ExportedModel`` (torch), one thread each (``--threads``):

* process memory: RSS after the imports, after loading, the peak while generating (VmHWM), and the peak after
  scoring the test file too (scoring holds a window's logits: streams x bptt x vocabulary floats);
* start-up: the wall time of ``python -m lm_lightning generate FOLDER --max-new-tokens 1``, from the command to its
  first token printed (imports, checks, loading), median of ``--rounds``;
* generation: ``--tokens`` new tokens after ``--prompt`` (top-k 50, temperature 0.8), ``--repeats`` times in each of
  ``--rounds`` processes per row, the rows taking turns round by round (a busy stretch of a shared machine then
  slows every row, not one), median tokens/s over all of them;
* test perplexity: ``score`` on ``--test-file``, next to the figure the export wrote when it was made.

Writes a Markdown table to stdout and every figure to ``--out`` (JSON).
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


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def runtime(folder: str, threads: int):
    """What loads the export as a user loads it, with only its own runtime imported."""
    if (Path(folder) / "model.onnx").is_file():
        from lm_lightning.deploy.runtime import OnnxModel

        return lambda: OnnxModel.load(folder, threads=threads)
    import torch

    torch.set_num_threads(threads)
    from lm_lightning.export.commands import ExportedModel

    return lambda: ExportedModel.load(folder)


def measure(folder: str, test_file: str, prompt: str, tokens: int, repeats: int, threads: int, score: bool) -> dict:
    load = runtime(folder, threads)
    baseline = status_bytes("VmRSS")
    start = time.perf_counter()
    model = load()
    result = {"load_seconds": time.perf_counter() - start, "rss_import_bytes": baseline, "rss_loaded_bytes": status_bytes("VmRSS")}
    model.generate(prompt, max_new_tokens=5)  # first calls allocate their buffers
    speeds = []
    for seed in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, seed=seed)
        speeds.append(tokens / (time.perf_counter() - start))
    result.update(tokens_per_s_runs=speeds, peak_generate_bytes=status_bytes("VmHWM"))
    result["torch_imported"] = "torch" in sys.modules
    if score:
        scored = model.score_file(test_file)
        result.update(test_ppl=scored["ppl"], score_seconds=scored["seconds"], peak_score_bytes=status_bytes("VmHWM"))
        result["test_ppl_when_written"] = (model.metadata.get("evaluation") or {}).get("test_ppl")
    return result


def startup_seconds(folder: str, checkout: Path, prompt: str, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    command = [sys.executable, "-m", "lm_lightning", "generate", folder, "--prompt", prompt, "--max-new-tokens", "1"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, cwd=checkout)
    return time.perf_counter() - start


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| export | runtime | file MiB | RSS after imports | RSS after load | peak RSS, generate | peak RSS, + score | "
        "start-up to first token | generation tokens/s | test ppl (score) | test ppl (when written) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        written = r.get("test_ppl_when_written")
        lines.append(
            f"| {name} | {'ONNX Runtime' if r['onnx'] else 'torch'} | {mib(r['file_bytes'])} | {mib(r['rss_import_bytes'])} | "
            f"{mib(r['rss_loaded_bytes'])} | {mib(r['peak_generate_bytes'])} | {mib(r['peak_score_bytes'])} | "
            f"{statistics.median(r['startup_runs']):.2f} s | {r['tokens_per_s']:,.0f} | {r['test_ppl']:.2f} | "
            f"{'—' if written is None else f'{written:.2f}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="*", help="NAME=FOLDER or NAME=FOLDER::CHECKOUT")
    parser.add_argument("--test-file", required=True, type=lambda p: str(Path(p).resolve()), help="the text to score (the export's own test split, to compare)")
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
        sys.exit("give the exports as NAME=FOLDER (e.g. int8=lightning_logs/version_0/export), optionally ::CHECKOUT.")
    rows: dict[str, dict] = {}
    for round_ in range(max(1, args.rounds)):
        for spec in args.exports:
            name, target = spec.split("=", 1)
            folder, _, checkout = target.partition("::")
            checkout_dir = Path(checkout or ROOT).resolve()
            folder = str(Path(folder).resolve())
            out = Path(f"/tmp/lm_lightning_inference_{os.getpid()}.json")
            command = [sys.executable, __file__, "--measure-one", folder, str(out), "--test-file", args.test_file, "--prompt",
                       args.prompt, "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--threads", str(args.threads)]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(checkout_dir), "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run(command + ["--speed-only"] * (round_ > 0), check=True, env=env, cwd=checkout_dir)
            result = json.loads(out.read_text())
            out.unlink()
            startup = startup_seconds(folder, checkout_dir, args.prompt, args.threads)
            if round_ == 0:
                rows[name] = result | {"onnx": (Path(folder) / "model.onnx").is_file(), "startup_runs": []}
                rows[name]["file_bytes"] = sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
            else:
                rows[name]["tokens_per_s_runs"] += result["tokens_per_s_runs"]
            rows[name]["startup_runs"].append(startup)
            rows[name]["tokens_per_s"] = statistics.median(rows[name]["tokens_per_s_runs"])
            print(f"round {round_ + 1}, {name}: {statistics.median(result['tokens_per_s_runs']):.0f} tokens/s, start-up {startup:.2f} s", file=sys.stderr)
    print(table(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
