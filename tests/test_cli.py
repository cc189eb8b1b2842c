"""The command line end to end: fit -> validate -> test -> predict, recipes, --help, TensorBoard, a forked model."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.cli import build_cli, main
from lm_lightning.evaluation import perplexity
from lm_lightning.export.loader import load_exported
from lm_lightning.reports.compare import read_run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = ["--model.network.embedding_dim", "64", "--model.network.hidden_dim", "64", "--model.network.num_layers", "1", "--model.sample_length", "8"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One short fit shared by the round-trip tests: returns (run folder, fit CLI)."""
    workdir = tmp_path_factory.mktemp("fit")
    cwd = Path.cwd()
    try:
        import os

        os.chdir(workdir)
        args = ["fit", "-c", str(ROOT / "configs/presets/debug.yaml"), *QUIET, *SMALL]
        args += ["--trainer.limit_train_batches", "25", "--trainer.limit_val_batches", "4", "--trainer.max_epochs", "2"]
        cli = build_cli(args)
    finally:
        os.chdir(cwd)
    return workdir / "lightning_logs" / "version_0", cli


def test_fit_writes_config_checkpoints_and_hparams(fitted):
    run, cli = fitted
    assert (run / "config.yaml").is_file() and (run / "hparams.yaml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(name.startswith("best-") for name in ckpts)
    assert cli.trainer.global_step == 50
    assert cli.model.hparams.network["init_args"]["vocab_size"] == cli.datamodule.vocab_size  # linked from the datamodule
    assert cli.model.network.vocab_size == cli.datamodule.vocab_size


def test_validate_test_predict_from_saved_config_and_checkpoint(fitted, tmp_path, monkeypatch, capsys):
    run, fit_cli = fitted
    monkeypatch.chdir(tmp_path)
    best = str(run / "checkpoints" / Path(fit_cli.trainer.checkpoint_callback.best_model_path).name)
    config = ["-c", str(run / "config.yaml"), *QUIET]

    validate = build_cli(["validate", *config, "--ckpt_path", best])
    # Re-created from config.yaml alone, the best checkpoint scores what it scored during fit.
    assert float(validate.trainer.callback_metrics["val/ppl"]) == pytest.approx(float(fit_cli.trainer.checkpoint_callback.best_model_score), rel=1e-5)

    test = build_cli(["test", *config, "--ckpt_path", best])
    test_ppl = float(test.trainer.callback_metrics["test/ppl"])
    assert math.isfinite(test_ppl) and 1 < test_ppl < fit_cli.datamodule.vocab_size

    capsys.readouterr()
    predict = build_cli(["predict", *config, "--ckpt_path", best, "--data.prompt", "the function", "--data.num_prompts", "2", "--model.max_new_tokens", "12"])
    out = capsys.readouterr().out
    written = Path(predict.trainer.log_dir) / "generated.txt"
    text = written.read_text()
    assert text.count("--- sample") == 2 and "the function" in text
    assert "the function" in out and str(written) in out


def test_export_command_writes_the_export_of_a_saved_checkpoint(fitted, tmp_path, monkeypatch, capsys):
    """`python -m lm_lightning export`: a float32 export scores exactly the checkpoint's test perplexity, int8 within 1%."""
    run, _ = fitted
    monkeypatch.chdir(tmp_path)
    last, config = str(run / "checkpoints" / "last.ckpt"), ["-c", str(run / "config.yaml"), *QUIET]
    test_ppl = float(build_cli(["test", *config, "--ckpt_path", last]).trainer.callback_metrics["test/ppl"])
    capsys.readouterr()
    main(["export", *config, "--ckpt_path", last, "--export.folder", str(tmp_path / "fp32")])
    main(["export", *config, "--ckpt_path", last, "--export.bits", "8"])  # default folder: next to the checkpoints
    out = capsys.readouterr().out
    assert f"Exported the float32 model to {tmp_path / 'fp32'}" in out and f"Exported the int8 model to {run / 'export-last'}" in out
    datamodule = build_cli([*config], run=False).datamodule
    datamodule.setup("test")
    # The debug preset's --trainer.limit_test_batches 2 applies to the export's own test perplexity as to `test`.
    fp32 = perplexity(load_exported(tmp_path / "fp32"), datamodule.test_dataloader(), max_batches=2)
    int8 = perplexity(load_exported(run / "export-last"), datamodule.test_dataloader(), max_batches=2)
    assert f"test perplexity {fp32:.2f}" in out and f"test perplexity {int8:.2f}" in out
    assert fp32 == pytest.approx(test_ppl, rel=1e-5)
    assert int8 == pytest.approx(test_ppl, rel=0.01) and int8 != fp32
    manifest = json.loads((run / "export-last" / "manifest.json").read_text())
    assert manifest["bits"] == 8 and manifest["metadata"]["checkpoint"] == last and manifest["network"]["class"] == "LSTMNetwork"


@pytest.mark.parametrize(
    "make_ckpt, message",
    [
        (lambda d: d / "missing.ckpt", r"--ckpt_path .*missing.ckpt is not a file"),
        (lambda d: d, r"--ckpt_path .* is not a file"),
        (lambda d: (d / "noise.ckpt").write_bytes(b"not a checkpoint" * 10) and d / "noise.ckpt", r"noise.ckpt cannot be loaded into this run's model"),
    ],
    ids=["missing", "folder", "random-bytes"],
)
def test_export_command_with_a_bad_checkpoint_is_one_sentence(fitted, tmp_path, capsys, make_ckpt, message):
    run, _ = fitted
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "-c", str(run / "config.yaml"), *QUIET, "--ckpt_path", str(make_ckpt(tmp_path))])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(message, err) and err.startswith("error: ") and err.count("\n") == 1


def test_tensorboard_has_the_documented_scalars_text_and_hparams(fitted):
    run, cli = fitted
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ["train/loss", "train/ppl", "val/loss", "val/ppl", "lr-AdamW", "train/tokens_per_sec"]:
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    # One per epoch (the tests that validate this run's checkpoint add theirs after: they log into the run).
    assert [e.step for e in events.Scalars("val/ppl")][:2] == [24, 49]  # Lightning logs at the last step, from 0
    assert events.Scalars("lr-AdamW")[0].value == pytest.approx(3e-3)
    tokens_per_sec = [e.value for e in events.Scalars("train/tokens_per_sec")]
    assert all(v > 0 for v in tokens_per_sec)
    # Throughput: tokens/s and batches/s only, not ThroughputMonitor's running totals, per-device copies or validation.
    assert {t for t in scalars if t.startswith(("train/time", "train/batches", "train/samples", "train/lengths", "train/device", "validate/"))} == {"train/batches_per_sec"}
    assert "samples/generated/text_summary" in events.Tags()["tensors"]
    # The generated text is a Markdown code block (4 spaces a line): shown as written, not as Markdown.
    text_events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    text_events.Reload()
    sample = text_events.Tensors("samples/generated/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert sample.startswith("    ") and all(line.startswith("    ") for line in sample.splitlines())
    # HPARAMS: one flat row of what tells runs apart, and the figures to sort by; none of LightningCLI's internals.
    runs = read_run(run)
    assert not any(k.startswith("_") or "_class_path" in k or "_instantiator" in k for k in runs.hparams)
    expected = {"Batch": "32 x 35", "Corpus": "embedded (treebank)", "Memory strategies": "none", "Optimizer": "AdamW lr 0.003",
                "Precision": "32-true", "model/class": "LanguageModel", "network/class": "LSTMNetwork", "network/hidden_dim": 64, "optimizer/class": "AdamW",
                "optimizer/lr": pytest.approx(3e-3), "optimizer/lr_scheduler": "none", "data/source": "embedded",
                "data/batch_size": 32, "data/bptt": 35, "data/tokenizer": "treebank", "trainer/precision": "32-true",
                "export/format": "none"}  # fmt: skip
    for key, value in expected.items():
        assert runs.hparams[key] == value, key
    assert runs.hparams["data/vocab_size"] == cli.datamodule.vocab_size and "model/sample_length" not in runs.hparams
    assert sorted(runs.hparams)[:5] == ["Batch", "Corpus", "Memory strategies", "Optimizer", "Precision"]  # shown first
    assert runs.figures["best_val_ppl"] == pytest.approx(min(e.value for e in events.Scalars("val/ppl")), rel=1e-6)
    assert runs.figures["peak_memory_mib"] > 100  # process peak RSS (torch alone is ~400 MiB)


def test_a_model_defined_outside_the_package_trains_by_class_path_and_learns(tiny_corpus, tmp_path, monkeypatch):
    """The GRU of tests/gru_model.py, by class path only (one file, no subclass), trains on the tiny corpus to well
    below its unigram baseline."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.source", str(tiny_corpus), "--data.tokenizer", "whitespace", "--data.min_freq", "1", "--data.batch_size", "4",
            "--data.eval_batch_size", "2", "--data.bptt", "8", "--trainer.max_epochs", "6"]
    cli = build_cli(["fit", *QUIET, "--model.network", "gru_model.GRUNetwork", *SMALL, *data])
    assert type(cli.model).__name__ == "LanguageModel" and isinstance(cli.model.network.gru, torch.nn.GRU)
    ppl, unigram = float(cli.trainer.callback_metrics["val/ppl"]), cli.datamodule.unigram_perplexity("valid")
    assert ppl < unigram / 2, f"GRU validation perplexity {ppl:.2f} does not beat the unigram baseline {unigram:.2f} by 2x"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_parses(config, capsys):
    """Presets stack on default.yaml; print_config parses and validates without building anything."""
    stack = [] if config.name == "default.yaml" or config.parent.name == "configs" else ["-c", str(ROOT / "configs/default.yaml")]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *stack, "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: lm_lightning" in capsys.readouterr().out


def test_default_recipe_equals_the_command_line_defaults(capsys):
    """`python -m lm_lightning fit` and `fit -c configs/default.yaml` must be the same run."""

    def resolved(args):
        with pytest.raises(SystemExit):
            main(["fit", *args, "--print_config"])
        config = yaml.safe_load(capsys.readouterr().out)
        config.pop("config", None)
        return config

    assert resolved([]) == resolved(["-c", str(ROOT / "configs/default.yaml")])


def test_help_documents_the_arguments(capsys):
    for args, expected in [
        (["fit", "--help"], ["--data", "--model", "--checkpoint.monitor", "--trainer.precision"]),
        (["fit", "--model.help", "LanguageModel"], ["--model.network", "The network to train", "--model.optimizer"]),
        (["fit", "--model.network.help", "LSTMNetwork"], ["--network.tie_weights", "Share the embedding and decoder", "--network.hidden_dim"]),
        (["fit", "--data.help", "TokenDataModule"], ["--data.bptt", "Window length", "--data.source", "nltk:<corpus>"]),
    ]:
        with pytest.raises(SystemExit):
            main(args)
        out = " ".join(capsys.readouterr().out.split())
        for text in expected:
            assert text in out, f"{text!r} not in `{' '.join(args)}`"


def test_bad_input_gives_one_sentence_and_exit_status_2_without_traceback(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "lm_lightning", "fit", "--data.source", str(empty)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {empty} is empty: a language model needs text to train on."
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda d: str(d / "nope.txt"), "does not exist"),
        (lambda d: (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50) and str(d / "latin1.txt"), "is not UTF-8 text"),
        (lambda d: "wikitext-103", "Unknown data source 'wikitext-103'"),
        (lambda d: (d / "short.txt").write_text("\n".join(f"line {i} here ." for i in range(60))) and str(d / "short.txt"), "fewer than one window needs"),
    ],
    ids=["missing", "not-utf8", "unknown-name", "too-short"],
)
def test_bad_data_sources(tmp_path, monkeypatch, capsys, make_source, message):
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    source = make_source(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--data.source", source, "--data.cache_dir", str(cache), *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "lightning_logs").exists()  # failed before any run folder or checkpoint
    leftovers = [p for p in cache.rglob("*") if p.name.endswith(".tmp")] if cache.exists() else []
    assert leftovers == []


def test_the_end_of_fit_names_the_best_checkpoint_and_the_command_that_tests_it(tmp_path, monkeypatch, capsys):
    """The last two lines of a fit, run as printed (from the folder the fit ran in): the test perplexity comes back.
    No advertisement for a cloud logger and no deprecation notice from the libraries reach the console."""
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(ROOT / "configs/presets/debug.yaml"), *QUIET, *SMALL])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    best = re.fullmatch(r"Best checkpoint: (lightning_logs/version_0/checkpoints/best-\S+\.ckpt) \(val ppl ([0-9.]+)\)\.", lines[-2])
    assert best is not None, lines[-2:]
    command = lines[-1].removeprefix("Test it: python -m lm_lightning ").split()
    assert command == ["test", "-c", "lightning_logs/version_0/config.yaml", "--ckpt_path", best.group(1)]
    for noise in ("💡 Tip", "litlogger", "LeafSpec", "deprecated"):
        assert noise not in captured.out + captured.err
    main([*command, *QUIET])
    assert "test/ppl" in capsys.readouterr().out


def test_predict_onto_a_full_disk_prints_the_samples_and_ends_in_one_sentence(small_disk, capsys):
    """generated.txt on a full disk (a 16 KiB tmpfs, filled): the samples are on screen, the file is not half-written."""
    from types import SimpleNamespace

    from lm_lightning.callbacks import GenerationWriter
    from lm_lightning.errors import LMInputError

    disk = small_disk(16)
    with pytest.raises(OSError):
        (disk / "filler").write_bytes(b"x" * 32768)
    writer = GenerationWriter(output_path=str(disk / "generated.txt"))
    trainer = SimpleNamespace(is_global_zero=True, log_dir=str(disk))
    samples = [{"prompt": "the", "text": "the cat sat " * 400}]
    with pytest.raises(LMInputError, match=r"^The disk holding .* is full, so generated.txt was not written \(the samples"):
        writer.write_on_epoch_end(trainer, None, [samples], [])
    assert "the cat sat" in capsys.readouterr().out
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]
