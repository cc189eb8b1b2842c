"""The memory-strategy contract (lm_lightning/callbacks/strategy.py): a strategy that lives in tests/ (frozen_embedding.py),
added by class path, shows up everywhere a run is reported or planned -- the HPARAMS row, estimate's prediction, the
export's manifest, the memory benchmark -- with nothing in the package naming it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lm_lightning.cli import build_cli, estimate
from lm_lightning.memory.measure import allocated_bytes

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = ["-c", str(ROOT / "configs/presets/debug.yaml"), "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32",
        "--model.network.num_layers", "1", "--model.network.tie_weights", "false", "--model.sample_length", "0"]  # fmt: skip
STRATEGY = "--trainer.callbacks+=frozen_embedding.FrozenEmbedding"


def hparams_row(log_dir: str) -> dict:
    events = EventAccumulator(log_dir, size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.string_value or v.number_value for k, v in info.hparams.items()}


def test_a_strategy_from_outside_the_package_is_in_the_hparams_row_and_the_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *TINY, *QUIET, STRATEGY, "--export.enabled", "true"])
    assert not cli.model.network.embedding.weight.requires_grad and cli.model.network.embedding.weight.grad is None
    row = hparams_row(cli.trainer.log_dir)
    assert row["Memory strategies"] == "frozen embedding" and row["frozen_embedding/modules"] == "all"
    manifest = json.loads((Path(cli.trainer.log_dir) / "export" / "manifest.json").read_text())
    assert manifest["metadata"]["strategies"]["frozen_embedding"] == {"frozen": ["embedding"]}


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="estimate needs glibc's mallinfo2 (Linux)")
def test_estimate_runs_a_strategy_from_outside_the_package_and_predicts_its_saving(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(ROOT / "configs/default.yaml"), *TINY[2:], "--model.network.embedding_dim", "128"]
    plain, frozen = estimate(args), estimate([*args, STRATEGY])
    out = capsys.readouterr().out
    assert "with the memory strategies: frozen embedding" in out and frozen.strategies == "frozen embedding"
    vocab = build_cli(args, run=False).datamodule.vocab_size
    embedding_bytes = vocab * 128 * 4
    # No gradient and no AdamW state for the vocab x 128 embedding: one matrix fewer of gradients, two of moments (and
    # the parameter's float32 step count).
    assert plain.grads - frozen.grads == embedding_bytes and plain.optimizer - frozen.optimizer == 2 * embedding_bytes + 4


@pytest.mark.slow
def test_the_memory_benchmark_measures_a_preset_from_outside_the_package(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks/memory.py"), "--epochs", "1", "--max-steps", "3", "--eval-batches", "2",
           "--no-plain-loop", "--out", str(out), "--preset", str(ROOT / "tests/frozen_embedding.yaml"), "--only", "frozen_embedding",
           "--", "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((out / "memory.json").read_text())}
    assert rows["frozen_embedding"]["strategies"] == "frozen embedding"
    assert "| frozen_embedding | frozen embedding |" in (out / "memory.md").read_text()
