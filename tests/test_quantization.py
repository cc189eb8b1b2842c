"""Quantization-aware finishing: fake quantization really reaches the LSTM, the schedule, checkpoints and resume,
the export's perplexity, the preset, and bad arguments."""

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.testing import assert_close

from lm_lightning.callbacks.export import Export
from lm_lightning.callbacks.quantization import QuantizationAwareFinishing
from lm_lightning.cli import build_cli, main
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import perplexity
from lm_lightning.export.fake_quantization import FakeQuantizedLSTM, disable_fake_quantization, enable_fake_quantization
from lm_lightning.export.loader import load_exported
from lm_lightning.export.quantization import fake_quantize
from lm_lightning.networks import LSTMNetwork
from lm_lightning.networks.lstm import StackedLSTM
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ["-c", str(ROOT / "configs/presets/debug.yaml")]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = ["--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32", "--model.network.num_layers", "1", "--model.sample_length", "0"]
QAT = ["--trainer.callbacks+=lm_lightning.callbacks.quantization.QuantizationAwareFinishing"]


def _plain_copy_with(lstm: nn.LSTM, weights: dict[str, torch.Tensor]) -> nn.LSTM:
    plain = nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers, batch_first=True)
    with torch.no_grad():
        for name in plain._flat_weights_names:
            getattr(plain, name).copy_(weights.get(name, getattr(lstm, name)))
    return plain


def test_fake_quantization_really_changes_the_lstm_output_also_under_pruning():
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 32, 2, batch_first=True)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        reference, _ = lstm(x)
        enable_fake_quantization(lstm, bits=4, group_size=16)
        assert type(lstm) is FakeQuantizedLSTM
        quantized, _ = lstm(x)
        weights = {n: fake_quantize(getattr(lstm, n), 4, 16) for n in lstm._flat_weights_names if n.startswith("weight")}
        expected, _ = _plain_copy_with(lstm, weights)(x)
    assert (quantized - reference).abs().max() > 1e-3  # not silently ignored
    assert_close(quantized, expected, rtol=0, atol=0)  # and exactly the quantized weights, biases left in float

    # Pruning's forward pre-hook replaces the weight attribute at every call; quantization applies after it.
    prune.l1_unstructured(lstm, "weight_hh_l0", amount=0.5)
    with torch.no_grad():
        lstm.weight_hh_l0_orig.mul_(1.5)  # an optimizer step after the hook last ran
        pruned, _ = lstm(x)
        effective = lstm.weight_hh_l0_orig * lstm.weight_hh_l0_mask
        expected, _ = _plain_copy_with(lstm, {**weights, "weight_hh_l0": fake_quantize(effective, 4, 16)})(x)
    assert_close(pruned, expected, rtol=0, atol=0)
    disable_fake_quantization(lstm)
    assert type(lstm) is nn.LSTM and not hasattr(lstm, "weight_fake_quantizer")


def test_switching_keeps_parameters_state_dict_tying_and_passes_gradients():
    torch.manual_seed(0)
    net = LSTMNetwork(50, 32, 32, 1, dropout=0.0, tie_weights=True)
    params = dict(net.named_parameters())
    keys = list(net.state_dict())
    enable_fake_quantization(net, bits=8)
    assert dict(net.named_parameters()) == params  # the same objects: the optimizer keeps training them
    assert list(net.state_dict()) == keys  # checkpoints load into a plain network
    assert net.decoder.weight is net.embedding.weight
    copy.deepcopy(net)  # EMA/SWA-style copies still work
    logits, _ = net(torch.randint(0, 50, (2, 9)))
    logits.logsumexp(-1).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name  # straight-through: gradients reach every weight
    disable_fake_quantization(net)
    assert [type(m) for m in (net.embedding, net.lstm, net.decoder)] == [nn.Embedding, StackedLSTM, nn.Linear]


def _scalars(run: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def _fit(workdir: Path, args: list[str]):
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        return build_cli(["fit", *DEBUG, *QUIET, *SMALL, *args])
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """2 epochs of 6 steps, int4 QAT in the last epoch, the export step at the end (with QAT's bits)."""
    workdir = tmp_path_factory.mktemp("qat")
    args = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6", *QAT]
    args += ["--trainer.callbacks.bits", "4", "--trainer.callbacks.group_size", "16", "--trainer.callbacks.last_epochs", "1"]
    return workdir, _fit(workdir, args)


def test_qat_runs_the_last_epoch_and_the_export_reproduces_it(qat_run):
    workdir, cli = qat_run
    run = workdir / "lightning_logs" / "version_0"
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareFinishing))
    assert callback.started_at == 6
    assert _scalars(run, "qat/active") == [0.0] * 6 + [1.0] * 6
    report = next(c for c in cli.trainer.callbacks if isinstance(c, Export)).report
    assert Path(report["folder"]) == run / "export" and (run / "export" / "vocab.json").is_file()
    assert report["bits"] == 4  # the export follows QAT's bits
    assert _scalars(run, "export/test_ppl") == [pytest.approx(report["test_ppl"], rel=1e-6)]
    assert _scalars(run, "export/bytes") == [report["bytes"]]
    assert report["tensors"]["lstm.weight_hh_l0"]["format"] == "int4"

    # The fake-quantized network (what trained and validated in the last epoch) scores what the export scores:
    # bit-identical weights, so only summation order could differ (stated tolerance 1e-6 relative).
    network = cli.model.network
    assert type(network.lstm) is StackedLSTM  # back to plain modules after fit
    test_batches = cli.datamodule.test_dataloader()
    float_ppl = perplexity(network, test_batches, max_batches=2)
    enable_fake_quantization(network, 4, 16)
    fake_ppl = perplexity(network, test_batches, max_batches=2)
    disable_fake_quantization(network)
    assert report["test_ppl"] == pytest.approx(fake_ppl, rel=1e-6)
    assert abs(fake_ppl - float_ppl) > 1e-3 * float_ppl  # quantization is visible at this size
    assert perplexity(load_exported(report["folder"]), test_batches, max_batches=2) == pytest.approx(fake_ppl, rel=1e-6)


def test_checkpoints_saved_during_qat_load_and_resume_with_qat_on(qat_run):
    workdir, cli = qat_run
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    restored = LanguageModel.load_from_checkpoint(last)
    assert list(restored.state_dict()) == list(LanguageModel(**restored.hparams).state_dict())
    assert_close(restored.network.lstm.weight_hh_l0, cli.model.network.lstm.weight_hh_l0, rtol=0, atol=0)
    # Resume the saved run (its config.yaml holds the callback) for one more epoch, QAT over the last two epochs:
    # the checkpoint was taken inside QAT, so QAT is on from the first resumed step.
    config = workdir / "lightning_logs" / "version_0" / "config.yaml"
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        resumed = build_cli(["fit", "-c", str(config), "--ckpt_path", str(last), "--trainer.max_epochs", "3", "--trainer.callbacks.last_epochs", "2", "--export.enabled", "false"])
    finally:
        os.chdir(cwd)
    callback = next(c for c in resumed.trainer.callbacks if isinstance(c, QuantizationAwareFinishing))
    assert resumed.trainer.global_step == 18 and callback.started_at == 12
    assert _scalars(workdir / "lightning_logs" / "version_1", "qat/active") == [1.0] * 6


def test_last_fraction_switches_on_at_the_right_step(tmp_path):
    args = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "8", *QAT, "--trainer.callbacks.last_fraction", "0.25", "--export.enabled", "false"]
    cli = _fit(tmp_path, args)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareFinishing))
    step = next(c for c in cli.trainer.callbacks if isinstance(c, Export))
    assert callback.start_step == 6 and callback.started_at == 6 and step.report is None
    assert _scalars(tmp_path / "lightning_logs" / "version_0", "qat/active") == [0.0] * 6 + [1.0] * 2
    assert not (tmp_path / "lightning_logs" / "version_0" / "export").exists()


def test_preset_stacks_with_other_presets_in_either_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n      init_args:\n        monitor: val/ppl\n")
    qat = str(ROOT / "configs/memory/qat.yaml")
    for stack in ([str(other), qat], [qat, str(other)]):
        cli = build_cli(["-c", str(ROOT / "configs/default.yaml"), *[a for path in stack for a in ("-c", path)], *QUIET], run=False)
        names = [type(c).__name__ for c in cli.trainer.callbacks]
        assert {"QuantizationAwareFinishing", "EarlyStopping", "TokenThroughput", "LearningRateMonitor"} <= set(names), names


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits must be 8 (int8 per output channel) or 4 (int4 groups), got 5."),
        ({"last_epochs": 0}, "last_epochs must be at least 1 (0 would start QAT after the last epoch), got 0."),
        ({"last_epochs": 2, "last_fraction": 0.5}, "Give last_epochs (2) or last_fraction (0.5), not both."),
        ({"last_fraction": 1.5}, "last_fraction must be in (0, 1] (the final share of training steps), got 1.5."),
        ({"bits": 4, "group_size": 1}, "group_size must be an integer of at least 2, got 1."),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(LMInputError) as error:
        QuantizationAwareFinishing(**kwargs)
    assert str(error.value) == message


def test_bad_arguments_from_the_command_line_fail_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args, message in [
        # Known at construction (jsonargparse wraps it while building trainer.callbacks; the CLI unwraps it).
        (["--trainer.callbacks.bits", "3"], "bits must be 8 (int8 per output channel) or 4 (int4 groups), got 3."),
        # Known once the trainer and network exist: checked in setup, before the first step.
        (["--trainer.callbacks.bits", "4", "--trainer.callbacks.group_size", "24"], "group_size 24 does not divide the input width 32 of embedding.weight: choose a divisor of 32 such as 32."),
        (["--trainer.max_epochs", "2", "--trainer.callbacks.last_epochs", "3"], "last_epochs (3) is more than trainer.max_epochs (2): QAT would start before the first epoch; lower last_epochs."),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *DEBUG, *QUIET, *SMALL, *QAT, *args])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    assert not list(tmp_path.rglob("*.ckpt"))
