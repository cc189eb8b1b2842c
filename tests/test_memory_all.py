"""All memory strategies in one run (configs/memory/all.yaml): they compose, log, and export together."""

import json
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.cli import build_cli
from lm_lightning.export import load_exported

ROOT = Path(__file__).resolve().parents[1]


def test_all_strategies_train_together_and_export_a_sparse_int8_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"),
         "-c", str(ROOT / "configs/memory/all.yaml"), "--trainer.limit_train_batches", "16",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--model.embedding_dim", "64", "--model.hidden_dim", "64"]
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

    # The QAT export of the pruned network is int8 *and* sparse: the savings multiply.
    manifest = json.loads((run / "export-int8" / "manifest.json").read_text())
    assert manifest["bits"] == 8
    network = load_exported(run / "export-int8")
    weights = [network.embedding.weight, network.lstm.weight_ih_l0, network.lstm.weight_hh_l0]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.75  # 80% pruned; zeros stay exactly zero through quantization
    int8_bytes = sum(p.stat().st_size for p in (run / "export-int8").iterdir())
    sparse_fp32_bytes = sum(p.stat().st_size for p in (run / "export-sparse").iterdir())
    assert int8_bytes < 0.6 * sparse_fp32_bytes
    with torch.no_grad():
        logits, _ = network(torch.zeros(1, 3, dtype=torch.long))
    assert torch.isfinite(logits).all()
