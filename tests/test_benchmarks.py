"""benchmarks/converged.py end to end on a tiny run: every row runs, is scored from its export file, and the table's
sizes and perplexities are the files' own (the real numbers come from converged models; see the README)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.cli import build_cli
from lm_lightning.export.loader import load_exported

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_converged_benchmark_rows_are_their_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "-c",
            str(ROOT / "configs/default.yaml"),
            "-c",
            str(ROOT / "configs/presets/debug.yaml"),
            "--model.network.embedding_dim",
            "64",
            "--model.network.hidden_dim",
            "64",
            "--trainer.limit_train_batches",
            "8",
            *FAST,
        ]
    )
    run = Path(cli.trainer.log_dir)
    out = tmp_path / "bench"
    limits = ["--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2", "--trainer.limit_test_batches", "4"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/converged.py"), "--run", str(run), "--out", str(out), "--", *limits],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = json.loads((out / "converged.json").read_text())
    assert len(results) == 7
    fp32 = results["float32"]
    # Finishing lrs follow the recipe's (AdamW 3e-3 here): every row stays near the checkpoint it started from.
    assert all(1 < r["test_ppl"] < 1.5 * fp32["test_ppl"] for r in results.values()), {
        n: r["test_ppl"] for n, r in results.items()
    }
    # The finishing runs wrote the exports their strategies call for, and the table reports those files.
    kinds = {name: json.loads((Path(r["folder"]) / "manifest.json").read_text()) for name, r in results.items()}
    assert [kinds[n]["bits"] for n in results] == [None, 8, 4, 4, 4, 8, 8]
    assert {"qat", "pruning"} <= set(kinds[list(results)[-1]]["metadata"]["strategies"])
    assert results["int8 PTQ"]["weights_bytes"] < 0.3 * fp32["weights_bytes"]
    pruned = next(r for n, r in results.items() if n.startswith("80% pruned"))
    assert pruned["weights_bytes"] < results["int8 PTQ"]["weights_bytes"] / 2
    # PTQ rows start from the checkpoint itself: the float32 export's perplexity is the best checkpoint's.
    network = load_exported(fp32["folder"])
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    state = {k.removeprefix("network."): v for k, v in __import__("torch").load(best, weights_only=True)["state_dict"].items()}
    assert all((network.state_dict()[k] == v).all() for k, v in state.items() if k in network.state_dict())
    table = (out / "converged.md").read_text()
    assert "int4 QAT took back" in table and f"{fp32['test_ppl']:.2f}" in table

    # --reuse keeps the measured rows (their files untouched), --skip leaves rows out of the table.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    command = [
        sys.executable,
        str(ROOT / "benchmarks/converged.py"),
        "--run",
        str(run),
        "--out",
        str(out),
        "--reuse",
        "--skip",
        "all",
    ]
    proc = subprocess.run([*command, "--", *limits], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == before
    again = json.loads((out / "converged.json").read_text())
    refused = subprocess.run([*command[:-2], "--skip", "float32"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "--skip cannot leave out float32: every row is compared with it."
    ]
    assert list(again) == list(results)[:-1] and again["float32"]["test_ppl"] == fp32["test_ppl"]


def test_plain_loop_trains_the_recipe_the_template_trains(tmp_path, monkeypatch):
    """benchmarks/plain_loop.py reads the recipe (network, optimizer, schedule, clipping): without dropout it takes
    the template's exact steps, so "the template against a plain loop" compares the same training. (Recipes name every
    optimizer argument: switching --model.optimizer to SGD keeps the default AdamW's weight_decay 0.01 in the CLI.)"""
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    recipe["trainer"]["max_epochs"] = 2
    recipe["model"]["init_args"]["network"]["init_args"].update(embedding_dim=48, hidden_dim=48, dropout=0.0)
    recipe["model"]["init_args"].update(
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 5.0, "weight_decay": 0.0}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = build_cli(["fit", "-c", str(path), "--trainer.limit_train_batches", "6", *FAST])
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    template = [e.value for e in events.Scalars("val/ppl")]
    out = tmp_path / "plain.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/plain_loop.py"),
            "--recipe",
            str(path),
            "--limit-train-batches",
            "6",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(out.read_text())["val_ppl_per_epoch"]
    assert len(template) == len(plain) == 2 and template[1] < template[0]
    assert plain == pytest.approx(template, rel=1e-4)


def test_plain_loop_resumed_after_an_epoch_is_the_uninterrupted_run(tmp_path):
    """--state: a long plain-loop run (WikiText-2: ~3 h here) killed between epochs goes on where it stopped, dropout
    masks included, and ends where the uninterrupted run ends."""
    recipe = yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    recipe["trainer"]["max_epochs"] = 2
    recipe["model"]["init_args"]["network"]["init_args"].update(embedding_dim=32, hidden_dim=32, dropout=0.3)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def loop(*extra: str) -> dict:
        out = tmp_path / "plain.json"
        cmd = [sys.executable, str(ROOT / "benchmarks/plain_loop.py"), "--recipe", str(path), "--limit-train-batches", "4"]
        proc = subprocess.run(
            [*cmd, "--out", str(out), *extra], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(out.read_text())

    straight = loop()
    state = tmp_path / "loop.state"
    first = loop("--epochs", "1", "--state", str(state))
    assert state.is_file() and len(first["val_ppl_per_epoch"]) == 1
    resumed = loop("--state", str(state))
    assert resumed["val_ppl_per_epoch"] == straight["val_ppl_per_epoch"]
    assert resumed["test_ppl"] == straight["test_ppl"]


@pytest.mark.parametrize("recipe", ["default.yaml", "ptb_small.yaml"])
def test_optimizer_rows_are_the_optimizers_they_name(recipe, tmp_path, tiny_corpus):
    """benchmarks/memory.py --optimizers: each row's optimizer is exactly its own settings on any recipe (the CLI keeps
    a replaced optimizer's arguments, so a row that named only lr would train AdamW's weight decay into SGD, or
    ptb_small's SGD settings into AdamW)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.memory import OPTIMIZERS, optimizer_rows

    for name, preset in optimizer_rows(tmp_path).items():
        class_path, init_args = OPTIMIZERS[name]
        cli = build_cli(["-c", str(ROOT / "configs" / recipe), "-c", *preset, "--data.data_dir", str(tiny_corpus)], run=False)
        optimizer = cli.model.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
        module, cls = class_path.rsplit(".", 1)
        expected = getattr(importlib.import_module(module), cls)(cli.model.parameters(), **init_args)
        assert type(optimizer) is type(expected)
        assert optimizer.defaults == expected.defaults, name  # every setting, the ones the row does not name included
        assert cli.trainer.gradient_clip_val == 0.25
