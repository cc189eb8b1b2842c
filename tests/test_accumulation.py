"""Gradient accumulation over stream micro-batches: the same optimizer steps as whole batches, less memory.

Parity runs train in float64 (``--trainer.precision 64-true``) with SGD, dropout 0 and gradient clipping at 0.1,
below the gradient norms of the first steps (~0.17), so clipping must act on the accumulated gradient too. "The
same step" is held to ``atol=1e-12``: the only difference left is the order in which micro-batch gradients are summed.
"""

import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.testing import assert_close

from lm_lightning.cli import build_cli, main
from lm_lightning.data.batch import Batch
from lm_lightning.data.windows import StreamWindows
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel

ACCUMULATION = "lm_lightning.callbacks.accumulation.MicroBatchAccumulation"
EXACT = {"rtol": 0.0, "atol": 1e-12}  # float64, summation order only
LOGGED = {"rtol": 1e-6, "atol": 0.0}  # TensorBoard stores scalars as float32
BATCH_SIZE, BPTT = 8, 13  # the tiny corpus: 86 tokens per stream -> 7 windows, the last one 7 tokens long


def base_args(corpus: Path) -> list[str]:
    return [
        "--data.source", str(corpus), "--data.min_freq", "1", "--data.batch_size", str(BATCH_SIZE),
        "--data.eval_batch_size", "4", "--data.bptt", str(BPTT),
        "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.num_layers", "2", "--model.network.dropout", "0",
        "--model.sample_length", "0", "--model.optimizer", "SGD", "--model.optimizer.lr", "1",
        "--trainer.precision", "64-true", "--trainer.gradient_clip_val", "0.1", "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "3",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


class Probe(L.Callback):
    """Records what Lightning and the model see: per epoch and per training batch."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, int]] = []  # (micro-batches Lightning counts, accumulate_grad_batches)
        self.batches: list[tuple[int, int, int]] = []  # (epoch, streams, first stream)
        self.initial: dict[str, torch.Tensor] = {}
        self.log_dir = Path()
        self.stepping_batches = 0
        self.val_batches: set[tuple[int, ...]] = set()  # (first stream, streams, rows of inputs)

    def on_train_start(self, trainer, pl_module):
        self.log_dir = Path(trainer.log_dir).resolve()
        self.stepping_batches = trainer.estimated_stepping_batches
        self.initial = {k: v.detach().clone() for k, v in pl_module.network.state_dict().items()}

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append((trainer.num_training_batches, trainer.accumulate_grad_batches))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val_batches.add((batch.first_stream, batch.num_streams, batch.inputs.size(0)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert batch.inputs.size(0) == batch.targets.size(0) == batch.num_streams
        self.batches.append((trainer.current_epoch, batch.num_streams, batch.first_stream))


def train(workdir: Path, corpus: Path, *extra: str) -> tuple[L.Trainer, LanguageModel, Probe]:
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    try:
        os.chdir(workdir)
        cli = build_cli([*base_args(corpus), *extra], run=False)
        probe = Probe()
        cli.trainer.callbacks.append(probe)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        os.chdir(cwd)
    return cli.trainer, cli.model, probe


def parameters(model: LanguageModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.network.state_dict().items()}


def scalars(probe: Probe, tag: str) -> list[float]:
    events = EventAccumulator(str(probe.log_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def test_one_optimizer_step_over_micro_batches_equals_one_whole_batch_step(tiny_corpus, tmp_path):
    plain, plain_model, plain_probe = train(tmp_path / "plain", tiny_corpus, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1")
    acc, acc_model, probe = train(
        tmp_path / "acc", tiny_corpus, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        f"--trainer.callbacks+={ACCUMULATION}", "--trainer.callbacks.micro_batch_size", "2",
    )  # fmt: skip
    assert plain.global_step == acc.global_step == 1
    assert probe.batches == [(0, 2, 0), (0, 2, 2), (0, 2, 4), (0, 2, 6)]  # the 4 stream groups of window 0
    assert_close(probe.initial, plain_probe.initial, rtol=0, atol=0)  # same seed, same start
    assert probe.initial["decoder.weight"].dtype == torch.float64
    moved = max(float((parameters(plain_model)[k] - plain_probe.initial[k]).abs().max()) for k in probe.initial)
    assert moved > 1e-3  # the step is real, so equality below means something
    assert_close(parameters(acc_model), parameters(plain_model), **EXACT)
    # train/loss is the whole batch's per-token mean, not the last micro-batch's
    assert_close(scalars(probe, "train/loss"), scalars(plain_probe, "train/loss"), **LOGGED)


def test_schedule_and_short_last_window_keep_every_step_exact(tiny_corpus, tmp_path):
    """Two full epochs of 7 windows (not divisible by 2 or 4, the last one short): k = 2, then k = 4."""
    plain, plain_model, plain_probe = train(tmp_path / "plain", tiny_corpus, "--trainer.max_epochs", "2")
    acc, acc_model, probe = train(
        tmp_path / "acc", tiny_corpus, "--trainer.max_epochs", "2",
        f"--trainer.callbacks+={ACCUMULATION}", "--trainer.callbacks.micro_batch_size", "4",
        "--trainer.callbacks.schedule", "{1: 2}",
    )  # fmt: skip
    assert plain.global_step == acc.global_step == 14  # one optimizer step per window, as without accumulation
    assert plain_probe.stepping_batches == probe.stepping_batches == 14  # what configure_optimizers would read
    assert probe.val_batches == {(0, 4, 4)}  # validation keeps whole windows of eval_batch_size streams
    # Lightning counts (progress bar, len) the micro-batches of each epoch with that epoch's k
    assert probe.epochs == [(7 * 2, 2), (7 * 4, 4)]
    assert [b[:2] for b in probe.batches] == [(0, 4)] * 14 + [(1, 2)] * 28
    assert [b[2] for b in probe.batches[:4]] == [0, 4] * 2 and [b[2] for b in probe.batches[14:22]] == [0, 2, 4, 6] * 2
    assert_close(parameters(acc_model), parameters(plain_model), **EXACT)
    assert_close(scalars(probe, "train/loss"), scalars(plain_probe, "train/loss"), **LOGGED)
    assert_close(scalars(probe, "val/ppl"), scalars(plain_probe, "val/ppl"), **LOGGED)  # evaluation is untouched
    assert scalars(probe, "accumulation/steps") == [2.0, 4.0] and scalars(probe, "accumulation/micro_batch_size") == [4.0, 2.0]
    assert acc.accumulate_grad_batches == 1  # handed back after fit


def test_micro_batches_are_the_stream_groups_of_each_window_and_eval_is_untouched():
    ids = np.arange(2 * 4 * 12 + 5)
    whole = list(StreamWindows(ids, batch_size=4, bptt=5, rank=1, world_size=2))
    size = {"value": 2}
    micro = StreamWindows(ids, batch_size=4, bptt=5, rank=1, world_size=2, micro_batch_size=lambda: size["value"])
    items = list(micro)
    assert len(micro) == len(items) == 2 * len(whole) == 6  # 3 windows (the last 1 token long) x 2 groups
    for w, window in enumerate(whole):  # rank 1's rows, cut into groups [0:2] and [2:4] of each window
        assert window.first_stream == 0 and window.num_streams == 4
        group = items[2 * w : 2 * w + 2]
        assert [i.first_stream for i in group] == [0, 2] and [i.num_streams for i in group] == [2, 2]
        assert torch.equal(torch.cat([group[0].inputs, group[1].inputs]), window.inputs)
        assert torch.equal(torch.cat([group[0].targets, group[1].targets]), window.targets)
    size["value"] = 1  # read again at the next epoch
    assert len(micro) == len(list(micro)) == 12


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trainer.callbacks.micro_batch_size", "0"], "micro_batch_size must be a positive integer, got 0."),
        (["--trainer.callbacks.micro_batch_size", "3"], "micro_batch_size 3 must divide --data.batch_size 8: use one of [1, 2, 4, 8]"),
        (["--trainer.callbacks.micro_batch_size", "16"], "micro_batch_size 16 must divide --data.batch_size 8"),
        (["--trainer.callbacks.micro_batch_size", "2", "--trainer.callbacks.schedule", "{2: 5}"], "micro_batch_size 5 (schedule, epoch 2) must divide"),
        (["--trainer.callbacks.micro_batch_size", "2", "--trainer.callbacks.schedule", "{-1: 4}"], "schedule keys are epochs counted from 0"),
        (["--trainer.callbacks.micro_batch_size", "2", "--trainer.accumulate_grad_batches", "4"], "--trainer.accumulate_grad_batches 4 conflicts"),
        (
            ["--trainer.callbacks.micro_batch_size", "2", "--trainer.callbacks+=GradientAccumulationScheduler", "--trainer.callbacks.scheduling", "{0: 2}"],
            "remove the GradientAccumulationScheduler callback",
        ),
    ],
    ids=["zero", "not-a-divisor", "larger-than-batch", "bad-schedule-size", "bad-schedule-epoch", "trainer-accumulation", "second-scheduler"],
)
def test_bad_arguments_fail_at_start_up_with_one_sentence(tiny_corpus, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *base_args(tiny_corpus), f"--trainer.callbacks+={ACCUMULATION}", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    # setup() runs after Lightning opens the TensorBoard run folder, but before config.yaml or any step
    assert not [p.name for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".yaml")]


def test_saved_activations_shrink_with_the_micro_batch():
    """Bytes autograd keeps for backward in one training step: whole batch of 32 streams vs micro-batch of 8."""
    torch.manual_seed(0)
    model = LanguageModel(LSTMNetwork(1000, embedding_dim=64, hidden_dim=64, num_layers=2, dropout=0.0)).train()
    weights = {p.data_ptr() for p in model.parameters()}

    def saved_bytes(streams: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.data_ptr() not in weights:  # weights are saved whatever the batch; activations are what scales
                total += t.numel() * t.element_size()
            return t

        model._reset_hidden("train")  # a fresh (zero) state of the right width
        ids = torch.randint(0, 1000, (streams, 36))
        batch = Batch(ids[:, :-1], ids[:, 1:], first_stream=0, num_streams=streams, length=35, divisor=streams * 35)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model._loss(batch, "train")
        loss.backward()
        return total

    whole, micro = saved_bytes(32), saved_bytes(8)
    print(f"saved for backward: batch 32 -> {whole} bytes, micro-batch 8 -> {micro} bytes ({whole / micro:.2f}x)")
    assert 3.9 < whole / micro <= 4.0
