"""Memory strategies on a converged model: post-training quantization (PTQ) of its checkpoint, and QAT and pruning as
finishing phases from its weights (``fit --weights_from``: new optimizer, constant small lr, new run folder).

    python -m lm_lightning fit -c configs/ptb_small.yaml      # ~70 min, one thread (offline: --data.data_dir DIR)
    python benchmarks/converged.py --run lightning_logs/version_0 --skip all                      # ~25 min, 2 cores

``benchmarks/memory.py`` trains every strategy from scratch for a few epochs, which says what each one costs in memory
and speed; this script says what each one costs in *perplexity*, which only means something on a model that has
finished learning. Rows (each in its own process, ``--jobs`` at a time, each with ``cpu_count / jobs`` threads):

* float32, int8 PTQ, int4 PTQ: the export step on the checkpoint (``python -m lm_lightning export``);
* int4 QAT: one finishing epoch on fake-quantized int4 weights, and its control, the same epoch without QAT followed
  by int4 PTQ, so that "QAT recovered x% of PTQ's loss" is QAT's doing and not the extra epoch's;
* 80% pruning + int8, two finishing epochs;
* everything at once: bf16-mixed + accumulation (4 micro-batches) + 50% pruning + int8 QAT, one finishing epoch
  (115 min here, on a CPU without a bf16 LSTM kernel, where bf16 runs ~14-20x slower than float32).

Every row's test perplexity is that of its export file, loaded back. Writes ``<out>/converged.md`` and
``converged.json``; the finishing runs stay in ``<out>/runs/`` (outside the repository by default).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MEMORY = ROOT / "configs" / "memory"
sys.path.insert(0, str(ROOT))
from benchmarks.memory import ACCUMULATION, folder_bytes, int4_group_size, recipe_batch_size  # noqa: E402

PRUNING_50 = """trainer:
  callbacks+:
    - class_path: lm_lightning.callbacks.pruning.MagnitudePruning
      init_args:
        sparsity: 0.5
        schedule: cubic
"""
FINISH = ["--model.lr_scheduler", "null"]  # a constant lr, the optimizer of the run's recipe


def rows(run_config: Path, ckpt: Path, group_size: int, batch_size: int, lr: float, scratch: Path) -> dict[str, dict]:
    """Name -> {"kind": "export" | "fit", "args": CLI arguments after the subcommand, "how": the flags to show}.
    Finishing phases run at a constant fraction of the recipe's lr: 1/200 for QAT, 1/40 for pruning (0.1 and 0.5 for
    the SGD recipes at lr 20; found on ptb_small: QAT needs only small steps, pruned weights need room to move)."""
    qat_lr, prune_lr = f"{lr / 200:.3g}", f"{lr / 40:.3g}"
    (scratch / "pruning50.yaml").write_text(PRUNING_50)
    (scratch / "accumulation.yaml").write_text(ACCUMULATION.format(micro_batch_size=batch_size // 4))
    int4 = ["--export.bits", "4", "--export.group_size", str(group_size)]
    table = {
        "float32": ("export", ["--export.enabled", "true"]),
        "int8 PTQ": ("export", ["--export.bits", "8"]),
        f"int4 PTQ, groups of {group_size}": ("export", int4),
        f"int4 QAT, 1 finishing epoch at lr {qat_lr}": (
            "fit",
            [
                "-c",
                f"{MEMORY}/qat.yaml",
                "--trainer.callbacks.bits",
                "4",
                "--trainer.callbacks.group_size",
                str(group_size),
                "--trainer.callbacks.last_fraction",
                "1.0",
                "--trainer.max_epochs",
                "1",
                "--model.optimizer.lr",
                qat_lr,
            ],
        ),
        "control: the same epoch without QAT, then int4 PTQ": (
            "fit",
            [*int4, "--trainer.max_epochs", "1", "--model.optimizer.lr", qat_lr],
        ),
        f"80% pruned + int8, 2 finishing epochs at lr {prune_lr}": (
            "fit",
            ["-c", f"{MEMORY}/pruning.yaml", "--trainer.max_epochs", "2", "--model.optimizer.lr", prune_lr, "--export.bits", "8"],
        ),
        # One finishing epoch, not two: on a CPU without native bfloat16 (AVX2 only) bf16-mixed trains ~14x slower
        # than float32 (PrecisionGuard turns oneDNN off, which has no bf16 LSTM there) -- 72 min per PTB epoch here.
        f"all: bf16 + accumulation 4x + 50% pruning + int8 QAT, 1 finishing epoch at lr {prune_lr}": (
            "fit",
            [
                "-c",
                f"{MEMORY}/bf16.yaml",
                "-c",
                str(scratch / "accumulation.yaml"),
                "-c",
                str(scratch / "pruning50.yaml"),
                "-c",
                f"{MEMORY}/qat.yaml",
                "--trainer.max_epochs",
                "1",
                "--model.optimizer.lr",
                prune_lr,
            ],
        ),
    }
    out = {}
    for i, (name, (kind, how)) in enumerate(table.items()):
        common = ["-c", str(run_config), "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
        if kind == "export":
            args = [*common, "--ckpt_path", str(ckpt), "--export.folder", f"exports/{i}", *how]
        else:
            args = [*common, "--weights_from", str(ckpt), *how, *FINISH, "--trainer.logger.init_args.version", f"finish-{i}"]
        out[name] = {"id": i, "kind": kind, "args": args, "how": how}
    return out


def run_one(kind: str, args: list[str], out: Path) -> None:
    """One row, in this process: the export subcommand, or a finishing fit whose export step scores its export."""
    from lm_lightning.callbacks.export import Export
    from lm_lightning.cli import build_cli, export_checkpoint

    if kind == "export":
        report = export_checkpoint(args)
    else:
        cli = build_cli(["fit", *args])
        report = next(c for c in cli.trainer.callbacks if isinstance(c, Export)).report
    weights = Path(report["folder"]) / "model.safetensors"
    out.write_text(
        json.dumps(
            {
                "folder": report["folder"],
                "folder_bytes": folder_bytes(Path(report["folder"])),
                "weights_bytes": weights.stat().st_size,
                "test_ppl": report["test_ppl"],
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
            }
        )
    )


def report_table(results: dict[str, dict]) -> str:
    base = results["float32"]
    lines = [
        "| export | size (folder) | size (weights file) | test ppl | vs float32 | wall time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        size = f"{r['folder_bytes']:,} B" if r is base else f"{r['folder_bytes'] / base['folder_bytes']:.1%}"
        weights = f"{r['weights_bytes']:,} B" if r is base else f"{r['weights_bytes'] / base['weights_bytes']:.1%}"
        change = "—" if r is base else f"{r['test_ppl'] / base['test_ppl'] - 1:+.2%}"
        lines.append(f"| {name} | {size} | {weights} | {r['test_ppl']:.2f} | {change} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def recovery(results: dict[str, dict]) -> str:
    """How much of int4 PTQ's perplexity loss QAT took back, against PTQ of the checkpoint and against the control."""
    fp32 = results["float32"]["test_ppl"]
    ptq = next(r for n, r in results.items() if n.startswith("int4 PTQ"))["test_ppl"]
    qat = next(r for n, r in results.items() if n.startswith("int4 QAT"))["test_ppl"]
    control = next(r for n, r in results.items() if n.startswith("control"))["test_ppl"]
    return (
        f"int4 QAT took back {(ptq - qat) / (ptq - fp32):.0%} of int4 PTQ's loss ({ptq:.2f} -> {qat:.2f}, float32 {fp32:.2f}); "
        f"against the control (same epoch without QAT, then PTQ: {control:.2f}) {(control - qat) / (control - fp32):.0%}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run's folder (config.yaml, checkpoints/)")
    parser.add_argument("--ckpt", type=Path, default=None, help="the checkpoint to start from (default: the run's best-*.ckpt)")
    parser.add_argument("--jobs", type=int, default=2, help="rows run at once")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "lm_lightning_converged")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out, by the start of their name (e.g. all)")
    parser.add_argument("--reuse", action="store_true", help="keep the rows already measured in --out (storage/N.json)")
    parser.add_argument("--run-one", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()  # extra: CLI flags for every row (e.g. --data.data_dir, --trainer.limit_*)
    extra = [a for a in extra if a != "--"]
    if args.run_one:
        return run_one(args.run_one[0], extra, Path(args.run_one[1]))
    if args.run is None or not (args.run / "config.yaml").is_file():
        sys.exit(
            f"--run {args.run} is not a finished run's folder (no config.yaml in it): give lightning_logs/version_N of a fit."
        )
    ckpt = args.ckpt or next(iter(sorted((args.run / "checkpoints").glob("best-*.ckpt"))), None)
    if ckpt is None or not ckpt.is_file():
        sys.exit(f"no checkpoint to start from in {args.run}/checkpoints: give --ckpt PATH.")
    config = str(args.run / "config.yaml")
    group_size, batch_size = int4_group_size(config), recipe_batch_size(config)
    if batch_size % 4:
        sys.exit(f"the run's batch_size {batch_size} must be divisible by 4 for the accumulation row (4 micro-batches).")
    out = args.out.resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    lr = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    plan = rows(args.run.resolve() / "config.yaml", ckpt.resolve(), group_size, batch_size, lr, out)
    plan = {name: row for name, row in plan.items() if not any(name.startswith(prefix) for prefix in args.skip)}
    if "float32" not in plan:
        sys.exit("--skip cannot leave out float32: every row is compared with it.")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))

    def launch(item: tuple[str, dict]) -> tuple[str, dict]:
        name, row = item
        target = out / "runs" / f"{row['id']}.json"
        if args.reuse and target.is_file() and "seconds" in json.loads(target.read_text()):
            return name, json.loads(target.read_text())
        start = time.perf_counter()
        cmd = [sys.executable, __file__, "--run-one", row["kind"], str(target), "--", *row["args"], *extra]
        proc = subprocess.run(cmd, cwd=out / "runs", env=env, capture_output=True, text=True)
        # A fit stopped by SIGTERM exits with status 0 (Lightning's own handler) without reaching the export step.
        if proc.returncode != 0 or not target.is_file():
            raise RuntimeError(f"{name} failed or was stopped (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
        print(f"done: {name}", flush=True)
        result = {**json.loads(target.read_text()), "seconds": time.perf_counter() - start, "how": row["how"]}
        target.write_text(json.dumps(result))
        return name, result

    # Longest first, so that the short exports fill the gaps at the end.
    order = sorted(plan.items(), key=lambda item: item[1]["kind"] == "export")
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(pool.map(launch, order))
    results = {name: done[name] for name in plan}
    needed = ("float32", "int4 PTQ", "int4 QAT", "control")
    found = all(any(n.startswith(k) for n in results) for k in needed)
    text = f"From `{ckpt}`\n\n{report_table(results)}\n\n{recovery(results) if found else ''}\n"
    (out / "converged.md").write_text(text)
    (out / "converged.json").write_text(json.dumps(results, indent=2))
    print(f"\n{text}\nwrote {out / 'converged.md'}")


if __name__ == "__main__":
    main()
