"""Does it learn? A short fit on the embedded corpus against that corpus's own unigram baseline, and resume."""

from pathlib import Path

import pytest
import torch

from lm_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
def test_short_fit_clearly_beats_the_unigram_baseline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", *QUIET, "--trainer.max_epochs", "3", "--model.network.embedding_dim", "128", "--model.network.hidden_dim", "128",
         "--model.network.num_layers", "1", "--model.sample_length", "0", "--trainer.num_sanity_val_steps", "0"]
    )
    unigram = cli.datamodule.unigram_perplexity("valid")
    val_ppl = float(cli.trainer.callback_metrics["val/ppl"])
    assert 150 < unigram < 300  # the baseline itself: add-one unigram of the embedded corpus (~209)
    assert val_ppl < 0.6 * unigram, f"val/ppl {val_ppl:.1f} vs unigram {unigram:.1f}"


def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    """Resuming restores weights, optimizer state and the step counter: the run continues, it does not restart."""
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/presets/debug.yaml"), *QUIET, "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32", "--model.network.num_layers", "1"]
    first = build_cli(["fit", *common])
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    state = torch.load(last, weights_only=False)
    resumed = build_cli(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    assert first.trainer.global_step == 5 and resumed.trainer.global_step == 10
    assert resumed.trainer.current_epoch == 2
    assert state["best_val_ppl"] == pytest.approx(float(first.trainer.callback_metrics["val/ppl"]))
    # The resumed run's first optimizer state was loaded, so Adam's step count continued from 5.
    steps = [s["step"] for s in resumed.trainer.optimizers[0].state.values()]
    assert all(float(step) == 10 for step in steps)
