"""What a person sees of a run: where its logs go, the HPARAMS row, one console line per validation without a progress
bar, `fit --help`, and `compare` (runs side by side, the Pareto picture)."""

import math
import sys
from pathlib import Path

import pytest
import yaml

from lm_lightning.callbacks.console import ValidationLine, duration
from lm_lightning.cli import build_cli, main
from lm_lightning.reports.compare import Run, pareto_front, quality, read_run, strategies

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = ["-c", str(ROOT / "configs/presets/debug.yaml"), "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32",
        "--model.network.num_layers", "1", "--trainer.max_epochs", "2"]  # fmt: skip


def fit(*args: str) -> Path:
    return Path(build_cli(["fit", *TINY, *QUIET, *args]).trainer.log_dir)


def test_logs_go_under_default_root_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit("--trainer.default_root_dir", str(tmp_path / "runs"))
    assert run == tmp_path / "runs" / "lightning_logs" / "version_0"
    assert (run / "config.yaml").is_file() and any((run / "checkpoints").glob("best-*.ckpt"))
    assert not (tmp_path / "lightning_logs").exists()


def test_evaluating_a_runs_checkpoint_logs_into_that_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit()
    hparams = (run / "hparams.yaml").read_text()
    config = ["-c", str(run / "config.yaml"), *QUIET]
    for command in ("validate", "test", "predict"):
        main([command, *config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # no new version_N
    assert (run / "generated.txt").is_file() and (run / "hparams.yaml").read_text() == hparams  # the fit's row kept
    figures = read_run(run).figures
    assert math.isfinite(figures["test_ppl"]) and figures["test_ppl"] > 1
    # Evaluating no run's checkpoint: a folder named after the command, not a training-looking version.
    main(["validate", *config])
    main(["validate", *config])
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["validate_0", "validate_1", "version_0"]


def test_hparams_row_names_the_memory_strategies_and_their_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = fit("-c", str(ROOT / "configs/memory/all.yaml"), "--trainer.limit_train_batches", "4")
    row = read_run(run)
    assert strategies(row.hparams) == "bf16-mixed + micro-batches of 8 + pruning 80% + QAT int8"
    assert row.label == "lightning_logs/version_0: " + strategies(row.hparams)  # the legend tells equal strategies apart
    assert row.hparams["pruning/sparsity"] == pytest.approx(0.8) and row.hparams["qat/bits"] == 8
    assert row.hparams["micro_batches/micro_batch_size"] == 8 and row.hparams["trainer/precision"] == "bf16-mixed"
    assert row.hparams["export/format"] == "int8"  # the export follows QAT
    # The figures that exist for this run, in the row: validation, the monitor's peak, the export and its perplexity.
    assert {"best_val_ppl", "peak_memory_mib", "export_mib", "export_test_ppl"} <= set(row.figures)
    assert row.figures["export_mib"] == pytest.approx(sum(p.stat().st_size for p in (run / "export").iterdir()) / 2**20)


def test_without_a_progress_bar_each_validation_prints_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *TINY, *QUIET])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2 · step 5 · train loss ") and lines[1].startswith("epoch 2/2 · step 10")
    val_ppl = float(cli.trainer.callback_metrics["val/ppl"])
    assert f"val ppl {val_ppl:.2f}" in lines[1] and " MiB · " in lines[1] and lines[1].endswith("0 s left")
    assert "Training: 2 epochs, 10 optimizer steps; a line after each validation." in out


def test_with_a_progress_bar_on_a_terminal_the_lines_stay_off(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    cli = build_cli(["fit", *TINY, "--trainer.enable_model_summary", "false"])
    line = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationLine))
    assert line.lines == [] and "a line after each validation" not in capsys.readouterr().out


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 45, 250, 7500)] == ["0 s", "45 s", "4 min 10 s", "2 h 05 min"]


def test_fit_help_leads_to_the_model_and_data_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model.help LanguageModel" in text and "--data.help TokenDataModule" in text
    assert text.count("--model.help LanguageModel") == 2  # at the top and at the end
    assert "--model.network.help LSTMNetwork" in text  # the network's sizes
    for flag, name, option in (("--model.help", "LanguageModel", "--model.network"), ("--model.network.help", "LSTMNetwork", "--network.hidden_dim"),
                               ("--data.help", "TokenDataModule", "--data.bptt")):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["fit", flag, name])
        assert option in capsys.readouterr().out


def test_pareto_front_keeps_the_runs_nothing_beats_on_both_axes(tmp_path):
    def run(name, ppl, mib):
        return Run(tmp_path / name, name, {"best_val_ppl": ppl, "peak_memory_mib": mib})

    runs = [run("a", 100, 600), run("b", 110, 500), run("c", 120, 550), run("d", 100, 650), run("e", 90, math.nan)]
    assert [r.label for r in pareto_front(runs, "peak_memory_mib")] == ["b", "a"]  # c loses to b, d to a, e unmeasured
    # A panel plots test perplexity only when every run on it has one: one axis never mixes test and validation.
    assert quality(runs, ("test_ppl", "best_val_ppl")) == "best_val_ppl"
    tested = [Run(tmp_path / n, n, {"best_val_ppl": 1.0, "test_ppl": 2.0}) for n in "xy"]
    assert quality(tested, ("test_ppl", "best_val_ppl")) == "test_ppl"


def test_compare_prints_the_runs_and_draws_the_picture(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fit()
    fit("-c", str(ROOT / "configs/memory/pruning.yaml"), "--export.bits", "8")
    main(["validate", "-c", "lightning_logs/version_0/config.yaml", *QUIET])  # no run's checkpoint: left out below
    capsys.readouterr()
    main(["compare", "lightning_logs", "--out", str(tmp_path / "docs" / "pareto.png")])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| lightning_logs/")]
    assert len(rows) == 2 and any("| pruning 80% |" in row for row in rows) and any("| none |" in row for row in rows)
    png = (tmp_path / "docs" / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    for args, message in [
        ([str(tmp_path / "nowhere")], "is not a folder"),
        (["lightning_logs", "--out", "pareto.jpeg"], "end it in .png, .svg or .pdf"),
        (["lightning_logs", "--out", "/dev/null/pareto.png"], "cannot be written"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["compare", *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["pareto.png"]  # no temporary file left


def test_every_memory_callback_names_itself_in_the_hparams_row():
    """A strategy's settings come from its own hparams(); the label from label() (the contract of callbacks/strategy.py)."""
    from lm_lightning.callbacks import MagnitudePruning, MicroBatchAccumulation, QuantizationAwareFinishing, ReturnFreedMemory

    for callback, label in [
        (MagnitudePruning(sparsity=0.5), "pruning 50%"),
        (MicroBatchAccumulation(micro_batch_size=4), "micro-batches of 4"),
        (QuantizationAwareFinishing(bits=4, group_size=16), "QAT int4 groups of 16"),
        (ReturnFreedMemory(), "freed memory returned"),
    ]:
        assert callback.label() == label
        assert all(isinstance(v, (bool, int, float, str, type(None))) for v in callback.hparams().values())
        yaml.safe_dump(callback.hparams())  # plain values only


def test_a_run_without_a_logger_trains_and_still_reports(tmp_path, monkeypatch, capsys):
    """--trainer.logger false: no learning rate to log (Lightning's LearningRateMonitor would stop the run), checkpoints
    under default_root_dir, one line per validation."""
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["fit", *TINY, *QUIET, "--trainer.logger", "false", "--trainer.default_root_dir", "plain"])
    assert cli.trainer.global_step == 10 and (tmp_path / "plain" / "checkpoints" / "last.ckpt").is_file()
    assert sum(line.startswith("epoch ") for line in capsys.readouterr().out.splitlines()) == 2
