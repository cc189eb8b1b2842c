"""A fork is one file: the GRU network of tests/gru_model.py, given by class path only (no subclass), trains with every
memory preset in configs/memory/, is predicted by estimate, and where a strategy cannot apply to a network the run stops
before training with one sentence. (Its int8/int4 exports and generate: tests/test_export_fork.py.)"""

from pathlib import Path

import pytest
import torch

from lm_lightning.callbacks import memory_strategies
from lm_lightning.cli import build_cli, estimate, main
from lm_lightning.memory.measure import allocated_bytes

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "memory").glob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
GRU = ["-c", str(ROOT / "configs/presets/debug.yaml"), "--model.network", "gru_model.GRUNetwork",
       "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32", "--model.sample_length", "0"]  # fmt: skip
# Sparse embedding gradients need an optimizer that takes them (the GRU is untied already).
NEEDS = {"sparse_gradients.yaml": ["--model.optimizer", "SGD", "--model.optimizer.lr", "1", "--model.optimizer.weight_decay", "0"]}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_gru_from_outside_the_package_trains_with_every_memory_preset(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *GRU, "-c", str(preset), *NEEDS.get(preset.name, []), *QUIET])
    assert isinstance(cli.model.network.gru, torch.nn.GRU) and cli.trainer.global_step > 0
    ppl = float(cli.trainer.callback_metrics["val/ppl"])
    assert 1 < ppl < cli.datamodule.vocab_size  # finite, and better than a uniform guess after a few steps
    labels = [s.label() for s in memory_strategies(cli.trainer)]
    if preset.name not in ("monitor.yaml", "bf16.yaml"):  # a monitor saves nothing; bf16 is a trainer setting
        assert labels, f"{preset.name} ran no memory strategy"
    if "qat" in preset.read_text().lower() or preset.name == "all.yaml":
        gru = cli.model.network.gru
        assert type(gru) is torch.nn.GRU  # fake quantization undone after fit; the export holds the integer weights
        assert (Path(cli.trainer.log_dir) / "export" / "manifest.json").is_file()


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="estimate needs glibc's mallinfo2 (Linux)")
def test_estimate_predicts_a_gru_with_its_strategies(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = estimate(GRU)
    chunked = estimate([*GRU, "-c", str(ROOT / "configs/memory/chunked_loss.yaml")])
    assert plain.params > 0 and plain.peak > plain.baseline and chunked.strategies == "chunked loss 256"
    assert chunked.temporaries + chunked.activations < plain.temporaries + plain.activations  # no logits kept


def test_a_strategy_a_network_cannot_take_stops_the_run_before_training_in_one_sentence(tmp_path, monkeypatch, capsys):
    """The bare GRU has no output-layer hook: the chunked loss refuses it by name, and no run folder is left."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", *GRU, "--model.network", "gru_model.BareGRUNetwork", "--model.network.hidden_dim", "16", *QUIET,
            "-c", str(ROOT / "configs/memory/chunked_loss.yaml")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert err.startswith("error: ChunkedLoss needs a network with a features() method and an nn.Linear decoder")
    assert "BareGRUNetwork lacks them" in err
    assert not any(Path("lightning_logs").glob("*/checkpoints/*.ckpt"))
