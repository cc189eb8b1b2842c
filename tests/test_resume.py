"""Exact resume: runs SIGKILLed at four points and resumed with --ckpt_path end bit for bit where an uninterrupted run
ends (dropout on, same seed), also with pruning, quantization-aware finishing and micro-batch accumulation.

Each run is ``lm_lightning.cli.main`` in its own process, forked from a server process that imported the CLI once
(multiprocessing's forkserver): a real process that a real SIGKILL ends (``tests/kill_switch.py``), without paying
Python's ~6 s import of Lightning for each of the nine runs here. ``test_checkpoints.py`` kills a genuine
``python -m lm_lightning fit`` subprocess.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import kill_switch
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.storage.checkpoints import restore_rng_states, rng_state

KILLED = -signal.SIGKILL
RUN = [
    "--data.tokenizer", "whitespace", "--data.min_freq", "1", "--data.batch_size", "4", "--data.bptt", "8",
    "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.num_layers", "1", "--model.network.dropout", "0.3",
    "--model.sample_length", "4", "--trainer.max_epochs", "3", "--trainer.log_every_n_steps", "5",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--checkpoint.save_top_k", "-1",  # keep every epoch's checkpoint, to compare intermediate states too
]  # fmt: skip
KILL = "--trainer.callbacks+=kill_switch.KillAt"
# The memory strategies of configs/memory/all.yaml, without bf16 (no fast bf16 LSTM kernel on most CPUs) and without
# the memory monitor (it only reads): pruning masks, QAT and the accumulation schedule all carry over a resume.
STRATEGIES = [
    "--trainer.callbacks+=lm_lightning.callbacks.MicroBatchAccumulation", "--trainer.callbacks.micro_batch_size", "2",
    "--trainer.callbacks+=lm_lightning.callbacks.MagnitudePruning", "--trainer.callbacks.sparsity", "0.5",
    "--trainer.callbacks+=lm_lightning.callbacks.QuantizationAwareFinishing", "--trainer.callbacks.bits", "8",
    "--trainer.callbacks.last_epochs", "1", "--export.enabled", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lm_lightning.cli", "kill_switch"])
    return context


@pytest.fixture
def fit(forkserver, tiny_corpus, tmp_path):
    """``fit(version, *args)``: one `fit` run as its own process; returns its exit code (``-SIGKILL`` when killed)."""
    base = ["fit", "--data.source", str(tiny_corpus), "--data.cache_dir", str(tmp_path / "cache"), *RUN]

    def run(version: str, *args: str, kill_in_prepare: bool = False) -> int:
        argv = [*base, "--trainer.logger.init_args.version", version, *args]
        log = tmp_path / f"{version}.log"
        process = forkserver.Process(target=kill_switch.run_cli, args=(argv, str(tmp_path), str(log), kill_in_prepare))
        process.start()
        process.join(timeout=300)
        assert process.exitcode is not None, f"run {version} hung:\n{log.read_text()[-3000:]}"
        return process.exitcode

    return run


def checkpoints(tmp_path: Path, version: str) -> Path:
    return tmp_path / "lightning_logs" / version / "checkpoints"


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"global_step": torch.tensor(checkpoint["global_step"]), **checkpoint["state_dict"]}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by up to {(a[name] - b[name]).abs().max():.3g}"


def scalars(tmp_path: Path, version: str, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(tmp_path / "lightning_logs" / version))
    events.Reload()
    return {s.step: s.value for s in events.Scalars(tag)}


def test_killed_at_four_points_and_resumed_ends_bit_for_bit_where_an_uninterrupted_run_ends(fit, tmp_path):
    # One chain of kills, each resumed from what the one before left: (1) while the token cache is written, (2) in
    # the middle of epoch 1, (3) during epoch 1's validation, (4) inside the write of last.ckpt after epoch 2.
    assert fit("prepare", KILL, "--trainer.callbacks.point", "prepare", kill_in_prepare=True) == KILLED
    assert not (tmp_path / "lightning_logs").exists()  # no checkpoint yet: start again from scratch

    mid_epoch = [KILL, "--trainer.callbacks.point", "train_batch", "--trainer.callbacks.epoch", "1"]
    assert fit("mid_epoch", *mid_epoch, "--trainer.callbacks.batch", "10") == KILLED
    first = checkpoints(tmp_path, "mid_epoch") / "last.ckpt"
    assert weights(first)["global_step"] == 22  # epoch 0, the last one completed

    in_validation = [KILL, "--trainer.callbacks.point", "validation", "--trainer.callbacks.epoch", "1"]
    assert fit("in_validation", "--ckpt_path", str(first), *in_validation) == KILLED
    assert not checkpoints(tmp_path, "in_validation").exists()

    in_save = [KILL, "--trainer.callbacks.point", "save", "--trainer.callbacks.epoch", "2"]
    assert fit("in_save", "--ckpt_path", str(first), *in_save) == KILLED
    interrupted = checkpoints(tmp_path, "in_save")
    leftovers = [p for p in interrupted.iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written temporary file

    assert fit("resumed", "--ckpt_path", str(interrupted / "last.ckpt")) == 0
    assert fit("uninterrupted") == 0

    expected = checkpoints(tmp_path, "uninterrupted")
    # The last.ckpt the killed save did not replace is the complete epoch-1 state, equal to the uninterrupted run's.
    assert_bitwise_equal(weights(interrupted / "last.ckpt"), weights(expected / "best-epoch01-step44.ckpt"))
    assert_bitwise_equal(weights(checkpoints(tmp_path, "resumed") / "last.ckpt"), weights(expected / "last.ckpt"))
    assert not leftovers[0].exists()  # removed by the next run that started from that folder
    for tag in ("val/ppl", "train/loss"):
        after_resume = scalars(tmp_path, "resumed", tag)
        assert after_resume and after_resume == {s: v for s, v in scalars(tmp_path, "uninterrupted", tag).items() if s >= 44}


def test_resume_keeps_pruning_masks_qat_and_the_accumulation_schedule(fit, tmp_path):
    # Killed in the middle of the last epoch, after pruning started (epoch 1) and while QAT is on (epoch 2).
    kill = [KILL, "--trainer.callbacks.point", "train_batch", "--trainer.callbacks.epoch", "2", "--trainer.callbacks.batch", "21"]
    assert fit("killed", *STRATEGIES, *kill) == KILLED
    assert fit("resumed", *STRATEGIES, "--ckpt_path", str(checkpoints(tmp_path, "killed") / "last.ckpt")) == 0
    assert fit("uninterrupted", *STRATEGIES) == 0

    resumed, expected = (weights(checkpoints(tmp_path, v) / "last.ckpt") for v in ("resumed", "uninterrupted"))
    assert_bitwise_equal(resumed, expected)
    for name in ("network.embedding.weight", "network.lstm.weight_ih_l0", "network.lstm.weight_hh_l0"):
        assert float((expected[name] == 0).float().mean()) == 0.5  # pruned to the target, masks kept across the resume
    resumed_ppl, expected_ppl = scalars(tmp_path, "resumed", "val/ppl"), scalars(tmp_path, "uninterrupted", "val/ppl")
    assert max(resumed_ppl) == max(expected_ppl) and resumed_ppl[max(resumed_ppl)] == expected_ppl[max(expected_ppl)]


def test_rng_states_round_trip_through_a_weights_only_checkpoint_per_rank(tmp_path):
    """Each rank gets its own generators back (torch, numpy, python), from a file torch.load(weights_only=True) reads."""

    def draws() -> tuple:
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    states, expected = [], []
    for seed in (1, 2):  # rank 0 and rank 1 of a 2-process run
        torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
        states.append(rng_state())
        expected.append(draws())
    torch.save({"rng_states": states}, tmp_path / "rng.ckpt")
    loaded = torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng_states"]
    for rank in (1, 0):
        restore_rng_states(loaded, SimpleNamespace(world_size=2, global_rank=rank))
        assert draws() == expected[rank]
    with pytest.warns(UserWarning, match="holds the random-number state of 2 rank"):
        restore_rng_states(loaded, SimpleNamespace(world_size=3, global_rank=2))
