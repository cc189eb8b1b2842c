"""The adaptive layers with everything else: pruning and quantization-aware training act on their matrices, the export
(safetensors and ONNX) rebuilds them tied, ``generate``/``score`` run them, ``estimate`` and the HPARAMS row see them."""

import json
import re
from pathlib import Path

import pytest
import torch
from test_strategy_contract import hparams_row

from lm_lightning.cli import build_cli, estimate, main
from lm_lightning.export.loader import load_exported
from lm_lightning.export.writer import plain_copy
from lm_lightning.memory.measure import allocated_bytes
from lm_lightning.networks import AdaptiveLogSoftmax

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = ["-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"), *FAST,
        "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32"]  # fmt: skip
ADAPTIVE = ["-c", str(ROOT / "configs/memory/adaptive.yaml")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Adaptive layers + 50% magnitude pruning + int8 QAT, 3 epochs, exported at the end (sparse int8 safetensors)."""
    folder = tmp_path_factory.mktemp("adaptive_all")
    cwd = Path.cwd()
    try:
        import os

        os.chdir(folder)
        cli = build_cli([
            "fit", *TINY, *ADAPTIVE, "-c", str(ROOT / "configs/memory/qat.yaml"), "-c", str(ROOT / "configs/memory/pruning.yaml"),
            "--trainer.callbacks.sparsity", "0.5", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "6",
            "--model.sample_length", "8",
        ])  # fmt: skip
    finally:
        os.chdir(cwd)
    cli.run_dir = folder / cli.trainer.log_dir
    return cli


def test_pruning_and_qat_act_on_the_adaptive_matrices_and_the_export_rebuilds_them_tied(finished):
    run = finished.run_dir
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["bits"] == 8 and set(manifest["network"]["modules"]) == {"embedding", "decoder"}
    assert manifest["metadata"]["strategies"]["adaptive_softmax"]["cutoffs"] == manifest["network"]["modules"]["decoder"]["init_args"]["cutoffs"]
    exported = load_exported(run / "export")
    assert isinstance(exported.decoder, AdaptiveLogSoftmax)
    assert exported.decoder.shortlist.weight is exported.embedding.embeddings[0].weight  # tied again on load
    for name, weight in (("tail words", exported.decoder.tails[0][1].weight), ("head words", exported.decoder.shortlist.weight)):
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name  # pruned per layer, kept zero
    trained = plain_copy(finished.model.network).eval()  # pruning made permanent, fake quantization off
    ids = torch.randint(0, exported.decoder.config["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = exported(ids)[0], trained(ids)[0]
    assert (ours - theirs).abs().max() < 0.05  # int8 codes of QAT-trained weights: close, not equal
    assert ours.exp().sum(-1).sub(1).abs().max() < 1e-4  # still a distribution
    row = hparams_row(str(run))
    assert row["adaptive_softmax/cutoffs"] == row["adaptive_input/cutoffs"] == "150,740"
    assert "adaptive input [150, 740]" in row["Memory strategies"] and "pruning" in row["Memory strategies"]


def test_the_onnx_export_generates_and_scores_the_adaptive_model(finished, tmp_path, capsys):
    """int8 ONNX (QAT trained for it; tests/test_export_onnx.py holds every format to the network): its test
    perplexity is the safetensors export's, and ONNX Runtime generates and scores with it."""
    bits, run = 8, finished.run_dir
    folder = tmp_path / f"onnx-{bits}"
    main(["export", "-c", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--export.format", "onnx",
          "--export.bits", str(bits), "--export.group_size", "16", "--export.folder", str(folder)])  # fmt: skip
    manifest = json.loads((folder / "manifest.json").read_text())
    written = manifest["metadata"]["evaluation"]["test_ppl"]
    safetensors = json.loads((run / "export" / "manifest.json").read_text())["metadata"]["evaluation"]["test_ppl"]
    assert written == pytest.approx(safetensors, rel=0.02)  # the same trained weights, another runtime and rounding
    capsys.readouterr()
    main(["generate", str(folder), "--prompt", "the", "--max-new-tokens", "12", "--seed", "0"])
    assert len(capsys.readouterr().out.split()) >= 10
    text = tmp_path / "text.txt"
    text.write_text((" ".join(finished.datamodule.vocab.itos[2:40]) + "\n") * 12)  # frequent words, > 1 window
    main(["score", str(folder), str(text)])
    figure = float(re.search(r"perplexity ([0-9.,]+)", capsys.readouterr().out).group(1).replace(",", ""))
    assert 1 < figure < finished.datamodule.vocab_size


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="estimate needs glibc's mallinfo2 (Linux)")
def test_estimate_counts_the_adaptive_layers_and_times_them(tmp_path, monkeypatch, capsys):
    """At a 2,458-word vocabulary and 128 units the tied full matrix is 1.26 MB; the adaptive pair holds a fraction of
    it, and estimate prints the speed of both runs from timed probe steps."""
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(ROOT / "configs/default.yaml"), "--model.network.embedding_dim", "128", "--model.network.hidden_dim", "128"]
    plain, adaptive = estimate(args), estimate([*args, *ADAPTIVE])
    out = capsys.readouterr().out
    cli = build_cli([*args, *ADAPTIVE], run=False)
    network = cli.model.network
    params = sum(p.numel() * 4 for p in {id(p): p for p in network.parameters()}.values())
    assert adaptive.params == params and plain.params - adaptive.params > 0.6 * 2458 * 128 * 4
    assert adaptive.grads == adaptive.params and adaptive.pruning == 0
    assert "adaptive input [150, 740] + adaptive softmax [150, 740]" in out
    assert out.count("Predicted speed:") == 2 and "x the same run without its memory strategies" in out
