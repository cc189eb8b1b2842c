"""All memory strategies in one run (configs/memory/all.yaml): they compose, log, and export together."""

import json
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.cli import build_cli
from lm_lightning.export.loader import load_exported

ROOT = Path(__file__).resolve().parents[1]


def test_all_strategies_train_together_and_export_a_sparse_int8_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"),
         "-c", str(ROOT / "configs/memory/all.yaml"), "--trainer.limit_train_batches", "16",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--model.network.embedding_dim", "64", "--model.network.hidden_dim", "64"]
    )
    assert str(cli.trainer.precision) == "bf16-mixed"
    assert cli.trainer.global_step == 4  # 16 micro-batches of 8 streams = 4 optimizer steps of 32 streams
    run = Path(cli.trainer.log_dir)

    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ["memory/activations_bytes", "pruning/sparsity", "qat/active", "accumulation/steps", "val/ppl"]:
        assert tag in scalars, f"{tag} missing"
    assert "precision/summary/text_summary" in events.Tags()["tensors"]

    # One export for the run, written by the export step: int8 (the QAT bits) *and* sparse, so the savings multiply.
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("export")) == ["export"]
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["bits"] == 8 and {"pruning", "qat"} <= set(manifest["metadata"]["strategies"])
    network = load_exported(run / "export")  # float32, the int8 codes dequantized
    weights = [network.embedding.weight, network.lstm.weight_ih_l0, network.lstm.weight_hh_l0]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.75  # 80% pruned; zeros stay exactly zero through quantization
    report = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Export").report
    assert report["bytes"] < 0.15 * report["float32_bytes"]  # 9% measured: int8 codes of the ~20% kept weights + bitmasks
    with torch.no_grad():
        logits, _ = network(torch.zeros(1, 3, dtype=torch.long))
    assert torch.isfinite(logits).all()
