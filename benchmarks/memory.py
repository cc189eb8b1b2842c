"""What does each memory strategy buy? Train the same model with each strategy alone and all together.

    python benchmarks/memory.py                                    # embedded corpus, default recipe, 2 epochs
    python benchmarks/memory.py --recipe configs/ptb_small.yaml --epochs 1     # offline: --data-dir DIR

Every configuration runs in its own process (so peak memory is its own), with the memory monitor on, and
``--repeats`` times in rotating order (tokens/s on a shared machine is noisy: the table shows medians). Beside
the Lightning runs: the same training in a plain PyTorch loop (benchmarks/plain_loop.py), and post-training
quantization (PTQ) of the fp32 run's final weights. Writes ``<out>/memory.md`` (a Markdown table) and
``<out>/memory.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY = ROOT / "configs" / "memory"
BASELINE = "fp32 (baseline)"
QAT_INT4 = """trainer:
  callbacks+:
    - class_path: lm_lightning.callbacks.quantization.QuantizationAwareFinishing
      init_args:
        bits: 4
        group_size: {group_size}
"""


ACCUMULATION = """trainer:
  callbacks+:
    - class_path: lm_lightning.callbacks.accumulation.MicroBatchAccumulation
      init_args:
        micro_batch_size: {micro_batch_size}
"""


def recipe_batch_size(recipe: str) -> int:
    import yaml

    return yaml.safe_load(Path(recipe).read_text()).get("data", {}).get("init_args", {}).get("batch_size", 32)


def network_args(recipe: str) -> dict:
    import yaml

    model = yaml.safe_load(Path(recipe).read_text()).get("model", {}).get("init_args", {})
    return model.get("network", {}).get("init_args", {}) or {}


def int4_group_size(recipe: str) -> int:
    """int4 groups must divide the input widths: 32 for the default's 256, 40 for ptb_small's 200."""
    network = network_args(recipe)
    widths = {network.get("embedding_dim", 256), network.get("hidden_dim", 256)}
    return next(g for g in range(32, 257) if all(w % g == 0 for w in widths))


def takes_sparse_gradients(recipe: str) -> bool:
    """An untied recipe trained by SGD without weight decay (ptb_small): its embedding can have a sparse gradient."""
    import yaml

    optimizer = yaml.safe_load(Path(recipe).read_text()).get("model", {}).get("init_args", {}).get("optimizer", {})
    return (
        network_args(recipe).get("tie_weights") is False
        and str(optimizer.get("class_path", "")).endswith("SGD")
        and not optimizer.get("init_args", {}).get("weight_decay", 0)
    )


def strategies(scratch: Path, group_size: int, batch_size: int, sparse: bool = False, extra: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Name -> extra ``-c`` presets: one row per preset file in configs/memory/ (named by it), then the presets given
    with ``--preset`` (a fork's strategy: its row is labelled by the strategy itself, in the run's HPARAMS). The memory
    monitor is stacked on every run, the baseline included. Two presets are adapted to the recipe: accumulation runs
    4 micro-batches per step whatever its batch size (also inside "all"), and QAT int4 gets a row at a group size that
    divides its widths. Sparse embedding gradients run only on a recipe that can take them (untied, SGD)."""
    int4 = scratch / "qat_int4.yaml"
    int4.write_text(QAT_INT4.format(group_size=group_size))
    accumulation = scratch / "accumulation.yaml"
    accumulation.write_text(ACCUMULATION.format(micro_batch_size=batch_size // 4))
    adapted = {
        "accumulation.yaml": [str(accumulation)],
        "all.yaml": [str(MEMORY / "bf16.yaml"), str(accumulation), str(MEMORY / "pruning.yaml"), str(MEMORY / "qat.yaml")],
    }
    rows: dict[str, list[str]] = {BASELINE: []}
    for preset in sorted(MEMORY.glob("*.yaml")):
        if preset.name == "monitor.yaml" or (preset.name == "sparse_gradients.yaml" and not sparse):
            continue
        rows[preset.stem] = adapted.get(preset.name, [str(preset)])
        if preset.name == "qat.yaml":
            rows["qat int4"] = [str(int4)]
    for preset in extra:
        rows[Path(preset).stem] = [str(Path(preset).resolve())]
    return rows


# Optimizer state as a choice (--optimizers): one row per optimizer, each with its full settings (nothing carried over
# from the recipe's optimizer) and the clipping word_language_model uses. Learning rates: SGD's 20 is the per-token
# loss's classic; momentum 0.9 at lr 2 takes the same step in a steady state (lr / (1 - momentum)); the AdamW rows at
# 3e-3, a common rate for small LSTMs with Adam (not tuned here: a row each, not a search).
OPTIMIZERS = {
    "SGD (no state)": ("torch.optim.SGD", {"lr": 20.0, "momentum": 0.0, "weight_decay": 0.0}),
    "SGD + momentum 0.9 (1 buffer)": ("torch.optim.SGD", {"lr": 2.0, "momentum": 0.9, "weight_decay": 0.0}),
    "AdamW (2 buffers)": ("torch.optim.AdamW", {"lr": 3e-3, "weight_decay": 0.01}),
    "AdamW 8-bit, torchao (2 int8 buffers)": ("torchao.optim.AdamW8bit", {"lr": 3e-3, "weight_decay": 0.01}),
}


def optimizer_rows(scratch: Path) -> dict[str, list[str]]:
    import yaml

    rows = {}
    for i, (name, (class_path, init_args)) in enumerate(OPTIMIZERS.items()):
        preset = scratch / f"optimizer{i}.yaml"
        preset.write_text(yaml.safe_dump({
            "trainer": {"gradient_clip_val": 0.25},
            "model": {"init_args": {"optimizer": {"class_path": class_path, "init_args": init_args}}},
        }))
        rows[name] = [str(preset)]
    return rows


# --- one configuration, in its own process -------------------------------------------------------------
def scalars(log_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def export_label(folder: Path) -> str:
    """``export-int8``, ``export-sparse``, ``export-int8+sparse``: what the export step wrote, read from its manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    kinds = [f"int{manifest['bits']}"] if manifest["bits"] else []
    if any(t["storage"] != "dense" for t in manifest["tensors"].values() if len(t["shape"]) == 2):
        kinds.append("sparse")
    return "export-" + ("+".join(kinds) or "fp32")


def run_one(name: str, cli_args: list[str], out: Path, group_size: int, eval_batches: int | None) -> None:
    from lm_lightning.cli import build_cli
    from lm_lightning.evaluation import perplexity
    from lm_lightning.export.loader import load_exported
    from lm_lightning.export.writer import export_model

    cli = build_cli(["fit", *cli_args])
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    log_dir = Path(cli.trainer.log_dir)
    logged = scalars(log_dir)
    from lm_lightning.callbacks import memory_strategies

    result = {
        "name": name,
        # Each strategy's own words (its label(): the contract of callbacks/strategy.py), a fork's strategy too.
        "strategies": " + ".join(s.label() for s in memory_strategies(cli.trainer) if s.label()) or "none",
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "tokens_per_sec": statistics.median(logged.get("train/tokens_per_sec", [math.nan])),
        # What the forward pass kept for backward, by the allocator's count where there is one (it sees the chunked
        # loss's early gradients and recomputed segments' inputs, which saved-tensor hooks cannot).
        "optimizer_bytes": statistics.median(logged.get("memory/optimizer_bytes", [math.nan])),
        "state_bytes": sum(statistics.median(logged.get(f"memory/{part}_bytes", [math.nan])) for part in ("params", "grads", "optimizer")),
        "activations_bytes": statistics.median(
            logged.get("memory/retained_bytes", logged.get("memory/activations_bytes", [math.nan]))
        ),
        "test_ppl": test["test/ppl"],
        "exports": {},
        "log_dir": str(log_dir.absolute()),  # the driver reads it back from another folder
    }
    # The run's export (the export step writes one when a strategy calls for it); for the baseline, fp32 and
    # post-training quantization (PTQ) of its final weights, the reference the QAT and pruning exports are judged against.
    exports = {export_label(log_dir / "export"): log_dir / "export"} if (log_dir / "export" / "manifest.json").exists() else {}
    if name == BASELINE:
        network = cli.model.network
        for bits, label in ((None, "export-fp32"), (8, "export-ptq-int8"), (4, "export-ptq-int4")):
            export_model(network, log_dir / label, bits=bits, group_size=group_size)
            exports[label] = log_dir / label
    cli.datamodule.setup("test")
    for label, folder in exports.items():
        ppl = perplexity(load_exported(folder), cli.datamodule.test_dataloader(), max_batches=eval_batches)
        result["exports"][label] = {"bytes": folder_bytes(folder), "test_ppl": ppl}
    out.write_text(json.dumps(result, indent=2))


# --- the table and the plot ---------------------------------------------------------------------------
def mib(n: float) -> str:
    return "–" if n is None or math.isnan(n) else f"{n / 2**20:,.1f} MiB"


def table(rows: list[dict], baseline: dict) -> str:
    lines = [
        "| preset | strategies (their labels) | peak memory (RSS) | parameters + gradients + optimizer state | optimizer state | kept for backward per step | tokens/s (median) | export | export size | test ppl (model) | test ppl (export) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["tokens_per_sec"] / baseline["tokens_per_sec"]
        exports = row.get("exports") or {"–": {"bytes": math.nan, "test_ppl": math.nan}}
        for i, (label, export) in enumerate(exports.items()):
            first = i == 0
            lines.append(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    row["name"] if first else "",
                    row.get("strategies", "") if first else "",
                    mib(row["peak_rss_bytes"]) if first else "",
                    mib(row.get("state_bytes", math.nan)) if first else "",
                    mib(row.get("optimizer_bytes", math.nan)) if first else "",
                    mib(row.get("activations_bytes", math.nan)) if first else "",
                    f"{row['tokens_per_sec']:,.0f} ({ratio:.2f}x)" if first else "",
                    label,
                    mib(export["bytes"]),
                    f"{row['test_ppl']:.1f}" if first else "",
                    "–" if math.isnan(export["test_ppl"]) else f"{export['test_ppl']:.1f}",
                )
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    smallest_export = [min((e["bytes"] for e in r.get("exports", {}).values()), default=math.nan) for r in rows]
    panels = [
        ("peak memory (MiB)", [r["peak_rss_bytes"] / 2**20 for r in rows]),
        ("kept for backward per step (MiB)", [r.get("activations_bytes", math.nan) / 2**20 for r in rows]),
        ("tokens/s", [r["tokens_per_sec"] for r in rows]),
        ("smallest export (MiB)", [b / 2**20 for b in smallest_export]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(names) + 1.8), sharey=True)
    for ax, (title, values) in zip(axes, panels):
        ax.barh(names, [0 if math.isnan(v) else v for v in values], color=["#888"] + ["#3b7dd8"] * (len(names) - 1))
        ax.set_title(title)
        for y, v in enumerate(values):
            if not math.isnan(v):
                ax.text(v, y, f" {v:,.1f}" if v < 100 else f" {v:,.0f}", va="center", fontsize=8)
    axes[0].invert_yaxis()  # once: the panels share the y axis; baseline on top, in table order
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- driver ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=lambda p: str(Path(p).resolve()), default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--data-dir", type=lambda p: str(Path(p).resolve()), default=None, help="folder of the recipe's corpus (a folder holding train.txt, valid.txt, test.txt; default: downloaded by name)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per run (windows; same for accumulation)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; tokens/s is their median")
    parser.add_argument(
        "--eval-batches", type=int, default=None,
        help="validate and test on the first N windows only, in every run and in the plain loop (WikiText-2's test split "
        "takes ~2 min per evaluation here at 33k words; the perplexities stay comparable, all on the same windows)",
    )
    parser.add_argument("--optimizers", action="store_true", help="compare optimizers (state bytes, perplexity) instead of strategies")
    parser.add_argument("--no-plain-loop", action="store_true", help="leave out the plain PyTorch loop")
    parser.add_argument("--only", nargs="*", default=None, help="names of the strategies to run (default: all)")
    parser.add_argument("--preset", action="append", default=[], help="another strategy's preset (YAML) to measure as a row")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--run-one", nargs=4, metavar=("NAME", "JSON", "GROUP_SIZE", "EVAL_BATCHES"), help=argparse.SUPPRESS)
    args, cli_args = parser.parse_known_args()
    if args.run_one:
        name, target, group_size, eval_batches = args.run_one
        cli_args = [a for a in cli_args if a != "--"]
        return run_one(name, cli_args, Path(target), int(group_size), int(eval_batches) or None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="lm_lightning_bench_"))
    common = ["-c", args.recipe, "-c", str(MEMORY / "monitor.yaml"), "--trainer.max_epochs", str(args.epochs),
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if args.data_dir:
        common += ["--data.data_dir", args.data_dir]
    common += [a for a in cli_args if a != "--"]  # fit's own flags after "--" go to every run (not to the plain loop)
    if args.max_steps:
        common += ["--trainer.max_steps", str(args.max_steps)]
    if args.eval_batches:
        common += ["--trainer.limit_val_batches", str(args.eval_batches), "--trainer.limit_test_batches", str(args.eval_batches)]
    group_size = int4_group_size(args.recipe)
    batch_size = recipe_batch_size(args.recipe)
    if batch_size % 4:
        sys.exit(f"--recipe's batch_size {batch_size} must be divisible by 4 for the accumulation runs.")
    plan = strategies(scratch, group_size, batch_size, sparse=takes_sparse_gradients(args.recipe), extra=tuple(args.preset))
    if args.optimizers:
        plan = {BASELINE: [], **optimizer_rows(scratch)}
    if args.only:
        plan = {k: v for k, v in plan.items() if k in args.only or k == BASELINE}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results: dict[str, list[dict]] = {name: [] for name in [*plan, *([] if args.no_plain_loop else ["plain PyTorch loop"])]}
    names = list(results)
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]  # rotate: no config always runs first
        for name in order:
            run_dir = scratch / f"{len(results[name])}-{abs(hash(name))}"
            run_dir.mkdir()
            target = run_dir / "result.json"
            if name == "plain PyTorch loop":
                cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), "--epochs", str(args.epochs), "--out", str(target)]
                cmd += plain_loop_args(args)
            else:
                cmd = [sys.executable, __file__, "--run-one", name, str(target), str(group_size), str(args.eval_batches or 0), "--", *common, *sum((["-c", p] for p in plan[name]), [])]
            print(f"[{repeat + 1}/{args.repeats}] {name}", flush=True)
            proc = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(target.read_text()))
    rows = [median_row(runs) for runs in results.values()]
    report = table(rows, rows[0])
    meta = f"recipe `{Path(args.recipe).name}`, {args.epochs} epoch(s)" + (f", at most {args.max_steps} optimizer steps" if args.max_steps else "")
    meta += f", evaluated on the first {args.eval_batches} windows" if args.eval_batches else ""
    meta += f", {os.environ['OMP_NUM_THREADS']} thread(s)" if os.environ.get("OMP_NUM_THREADS") else ""
    bow = f"{bow_input_bytes()}\n\n{matmul_speedup()}"
    (out / "memory.md").write_text(f"{meta}, medians of {args.repeats} run(s)\n\n{report}\n\n{bow}\n")
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "memory.png")
    pareto(results, out / "pareto.png", meta)
    print(f"\n{meta}\n\n{report}\n\n{bow}\n\nwrote {out / 'memory.md'}, {out / 'memory.png'} and {out / 'pareto.png'}")


def pareto(results: dict[str, list[dict]], path: Path, meta: str) -> None:
    """``compare``'s picture of the first repeat's runs (read back from their TensorBoard events, as
    ``python -m lm_lightning compare`` reads any run), each labelled with its strategy; the baseline's exports (fp32,
    post-training quantized) are points of their own on the export panel, at their own test perplexity."""
    from dataclasses import replace

    from lm_lightning.reports.compare import plot, read_run

    runs = []
    for name, repeats in results.items():
        if not repeats or "log_dir" not in repeats[0]:
            continue  # the plain loop writes no TensorBoard run
        run = replace(read_run(Path(repeats[0]["log_dir"])), label=name)
        runs.append(run)
        if name == BASELINE:  # its exports, made after the run: the plain fp32 file and post-training quantization
            for label, export in repeats[0]["exports"].items():
                figures = {"test_ppl": run.get("test_ppl"), "export_mib": export["bytes"] / 2**20, "export_test_ppl": export["test_ppl"]}
                kind = label.removeprefix("export-").replace("ptq-", "PTQ ")
                runs.append(replace(run, label=f"{name}, {kind} export", figures=figures))
    plot(runs, path, title=f"Memory strategies: {meta}")


def matmul_speedup(size: int = 1024, repeats: int = 7) -> str:
    """bf16 against fp32 for one square matmul, median of ``repeats`` (what AVX-512 bf16 / AMX can give)."""
    import time

    import torch

    def median_seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up: oneDNN picks and caches its kernel on the first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    fp32, bf16 = median_seconds(torch.float32), median_seconds(torch.bfloat16)
    speed = f"{fp32 / bf16:.1f}x faster" if bf16 <= fp32 else f"{bf16 / fp32:.1f}x slower: no bf16 instructions"
    return (f"A {size}x{size} matmul on this CPU ({torch.get_num_threads()} thread(s), median of {repeats}): "
            f"float32 {fp32 * 1e3:.1f} ms, bfloat16 {bf16 * 1e3:.1f} ms ({speed}).")


def bow_input_bytes(recipe: Path = ROOT / "configs" / "bag_embedded.yaml") -> str:
    """Bytes of one input batch of the bag-of-words recipe: sparse bags against a dense batch x vocabulary matrix."""
    import yaml

    from lm_lightning.data.bag import BagDataModule, batch_bytes

    init = yaml.safe_load(recipe.read_text())["data"]["init_args"]
    dm = BagDataModule(**init)
    b = batch_bytes(dm.counts("train"), dm.hparams.batch_size, dm.hparams.bptt)
    return (f"Bag-of-words input (`{recipe.name}`, vocabulary {b['vocab_size']:,}, {b['segments']} segments per batch, "
            f"{b['distinct_words_per_segment']:.1f} distinct words each): {b['sparse_bytes'] / 2**10:,.1f} KiB as sparse "
            f"bags against {b['dense_bytes'] / 2**20:,.2f} MiB as a dense float32 matrix ({b['dense_over_sparse']:.0f}x).")


def plain_loop_args(args: argparse.Namespace) -> list[str]:
    """The plain loop trains what the recipe says (network, data, optimizer, schedule, clipping)."""
    extra = ["--recipe", args.recipe]
    if args.max_steps:
        extra += ["--max-steps", str(args.max_steps)]
    if args.data_dir:
        extra += ["--data-dir", args.data_dir]
    if args.eval_batches:
        extra += ["--eval-batches", str(args.eval_batches)]
    return extra


def median_row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    row["tokens_per_sec"] = statistics.median(r["tokens_per_sec"] for r in runs)
    row["peak_rss_bytes"] = statistics.median(r["peak_rss_bytes"] for r in runs)
    return row


if __name__ == "__main__":
    main()
