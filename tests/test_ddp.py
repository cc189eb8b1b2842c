"""DDP in the suite: ``python -m lm_lightning fit`` on 2 CPU processes (gloo) against 1 process at the same global batch.

Two subprocess runs, started together and shared by every test here: 2 ranks x 2 streams and 1 process x 4 streams,
dropout 0, 2 epochs. Each train token is a word of its own, so a token id names its position in the corpus, and
``batch_recorder.BatchRecorder`` writes what every rank read. A hang (a rank waiting for a collective another rank
never joins) fails the run at its time limit instead of blocking CI.

``ddp_spawn`` pickles the trainer, the system and the data module into each rank's process: a third fit checks it
against the ``ddp`` run, and a quick test (not slow) that those objects pickle at all.
"""

import json
import math
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.lightning_cli import build_cli
from lm_lightning.systems.base import seed_dropout_per_rank

# The fits are marked one by one, not the module: the pickling test below takes seconds and guards ddp_spawn in
# `make test-fast` too. ~40 s for the ddp and 1-process fits on a busy 2-core machine; still part of CI.
slow = pytest.mark.slow

TIME_LIMIT = 150  # seconds per run; ~40 s on a busy 2-core machine, most of it starting 3 Python processes
TRAIN_WORDS = 400  # + <eos>: 401 tokens = 4 streams of 100 (1 token dropped), 20 windows of bptt 5 per epoch
VALID_WORDS = 404  # + <eos>: 405 tokens, not a multiple of the 4 streams: 1 token dropped, by both runs alike
COMMON = [
    "fit",
    "--data.tokenizer", "whitespace",
    "--data.min_freq", "1",
    "--data.bptt", "5",
    "--model.network.embedding_dim", "16",
    "--model.network.hidden_dim", "16",
    "--model.network.num_layers", "1",
    "--model.network.dropout", "0",
    "--model.sample_length", "0",
    "--trainer.max_epochs", "2",
    "--trainer.log_every_n_steps", "1",
    "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.callbacks+=batch_recorder.BatchRecorder",
]  # fmt: skip
RUNS = {
    "ddp": ["--data.batch_size", "2", "--data.eval_batch_size", "2", "--trainer.strategy", "ddp", "--trainer.devices", "2"],
    "single": ["--data.batch_size", "4", "--data.eval_batch_size", "4", "--trainer.devices", "1"],
}
# The ddp run's settings under ddp_spawn, with the treebank tokenizer: the one whose splitter was a lambda that could
# not be pickled. On these words ("w0 w1 ...") it gives the tokens of the whitespace split, so the same ids.
SPAWN = ["--data.batch_size", "2", "--data.eval_batch_size", "2", "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2",
         "--data.tokenizer", "treebank"]  # fmt: skip


def _scalars(run: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run / "lightning_logs" / "version_0"))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def _fit_side_by_side(root: Path, runs: dict[str, list[str]], extra: list[str] = ()) -> dict:
    """The fits of ``runs`` started together: ``{name: {"ranks": [rank0, ...], "dir": ...}}``."""
    words = [f"w{i}" for i in range(max(TRAIN_WORDS, VALID_WORDS))]
    (root / "corpus").mkdir()
    for split, count in (("train", TRAIN_WORDS), ("valid", VALID_WORDS), ("test", 50)):
        (root / "corpus" / f"{split}.txt").write_text(" ".join(words[:count]) + "\n")
    started = {}
    for name, args in runs.items():
        (root / name).mkdir()
        # A session of its own, so that a hung run's rank processes can all be killed at once.
        with open(root / name / "output.txt", "w") as log:
            started[name] = subprocess.Popen(
                [sys.executable, "-m", "lm_lightning", *COMMON, "--data.source", str(root / "corpus"), *args, *extra],
                cwd=root / name, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
    for name, process in started.items():
        try:
            process.wait(timeout=TIME_LIMIT)
        except subprocess.TimeoutExpired:
            for other in started.values():
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"the {name} fit did not finish within {TIME_LIMIT} s (a hang?): {(root / name / 'output.txt').read_text()[-3000:]}")
        assert process.returncode == 0, (root / name / "output.txt").read_text()[-3000:]
    return {
        name: {"dir": root / name, "ranks": [json.loads(p.read_text()) for p in sorted((root / name / "batches").glob("rank*.json"))]}
        for name in runs
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both fits, run side by side: ``{"ddp": {"ranks": [rank0, rank1], "dir": ...}, "single": {...}}``."""
    return _fit_side_by_side(tmp_path_factory.mktemp("ddp"), RUNS)


@slow
def test_validation_perplexity_equals_one_process_at_the_same_global_batch(runs):
    (rank0, rank1), (single,) = runs["ddp"]["ranks"], runs["single"]["ranks"]
    assert [rank0["world_size"], rank1["world_size"], single["world_size"]] == [2, 2, 1]
    assert rank0["metrics"]["val/ppl"] == rank1["metrics"]["val/ppl"]  # the metric is reduced over both ranks
    assert rank0["metrics"]["val/ppl"] == pytest.approx(single["metrics"]["val/ppl"], rel=1e-6)
    ddp, one = _scalars(runs["ddp"]["dir"], "val/ppl"), _scalars(runs["single"]["dir"], "val/ppl")
    assert len(ddp) == len(one) == 2 and ddp == pytest.approx(one, rel=1e-6)
    assert 1 < one[-1] < TRAIN_WORDS * 2  # a real perplexity, not a constant of an empty split


@slow
def test_each_rank_reads_its_own_streams_and_no_token_twice_in_an_epoch(runs):
    (rank0, rank1), (single,) = runs["ddp"]["ranks"], runs["single"]["ranks"]
    assert len(rank0["train"]) == len(rank1["train"]) == len(single["train"]) == 40  # 20 windows x 2 epochs
    for epoch in (0, 1):
        seen = [np.array(t).ravel() for rank in (rank0, rank1) for e, t in rank["train"] if e == epoch]
        seen = np.concatenate(seen)
        assert len(seen) == len(set(seen.tolist())) == 4 * 99  # 4 streams x (100 - 1) targets, each once
    # Rank r's streams are the 1-process run's streams 2r and 2r + 1, window for window: the same global batch.
    for (e0, t0), (e1, t1), (e, t) in zip(rank0["train"], rank1["train"], single["train"]):
        assert e0 == e1 == e and t0 + t1 == t


@slow
def test_train_loss_is_the_mean_over_ranks_and_equals_one_process(runs):
    rank0, rank1 = runs["ddp"]["ranks"]
    logged, one = _scalars(runs["ddp"]["dir"], "train/loss"), _scalars(runs["single"]["dir"], "train/loss")
    assert len(logged) == len(one) == 40
    mean = [(a + b) / 2 for a, b in zip(rank0["rank_loss"], rank1["rank_loss"])]
    assert logged == pytest.approx(mean, rel=1e-6)  # reduced across ranks...
    assert max(abs(a - b) / b for a, b in zip(logged, rank0["rank_loss"])) > 1e-3  # ...not rank 0's own loss
    assert logged == pytest.approx(one, rel=1e-5)
    assert _scalars(runs["ddp"]["dir"], "train/ppl") == pytest.approx([math.exp(x) for x in logged], rel=1e-6)


@slow
def test_a_split_that_does_not_divide_among_ranks_gives_every_rank_the_same_windows(runs):
    # 405 validation tokens for 2 ranks x 2 streams: split by tokens, ranks would hold 203 and 202 and need different
    # numbers of windows, so one would wait for the other at the metric's all-reduce; StreamWindows gives each rank
    # 2 streams of 101 (the last token dropped), and both runs finished (the fixture's time limit).
    (rank0, rank1), (single,) = runs["ddp"]["ranks"], runs["single"]["ranks"]
    assert (VALID_WORDS + 1) % 4 and len(rank0["val"]) == len(rank1["val"]) == len(single["val"]) == 2 * 20
    for (e0, t0), (e1, t1), (e, t) in zip(rank0["val"], rank1["val"], single["val"]):
        assert e0 == e1 == e and t0 + t1 == t  # the same validation tokens as one process, none twice


@slow
def test_each_rank_draws_its_own_dropout_masks_and_rank0_those_of_one_process(runs):
    (rank0, rank1), (single,) = runs["ddp"]["ranks"], runs["single"]["ranks"]
    assert rank0["next_uniforms"] == single["next_uniforms"]
    assert rank1["next_uniforms"] != rank0["next_uniforms"]
    # The rule: torch's generator restarted at fit start at the run's seed (0 here) plus the global rank.
    state = torch.get_rng_state()
    try:
        for rank, record in ((0, rank0), (1, rank1)):
            torch.manual_seed(0)
            seed_dropout_per_rank(rank)
            assert torch.rand(4).tolist() == record["next_uniforms"]
    finally:
        torch.set_rng_state(state)


@slow
def test_the_adaptive_layers_train_under_ddp_as_in_one_process(tmp_path):
    """Adaptive input + softmax (tied): a tail cluster without targets on a rank still takes part in the gradient
    all-reduce (no hang: DDP runs without find_unused_parameters), and validation equals one process's."""
    adaptive = ["-c", str(Path(__file__).resolve().parents[1] / "configs/memory/adaptive.yaml"), "--trainer.callbacks.cutoffs", "[50,200]"]
    runs = _fit_side_by_side(tmp_path, RUNS, adaptive)
    ddp, one = _scalars(runs["ddp"]["dir"], "val/ppl"), _scalars(runs["single"]["dir"], "val/ppl")
    assert len(ddp) == len(one) == 2 and ddp == pytest.approx(one, rel=1e-5)
    assert 1 < one[-1] < TRAIN_WORDS * 2
    for name in ("ddp", "single"):  # trained as adaptive layers (the tails' matrices are in the checkpoint)
        last = runs[name]["dir"] / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        state = torch.load(last, weights_only=True)["state_dict"]
        assert state["network.decoder.tails.1.1.weight"].shape == (202, 1)  # words 200-401 in 16 // 4**2 = 1 dimension


@slow
def test_ddp_spawn_trains_and_validates_as_ddp(runs, tmp_path):
    spawned = _fit_side_by_side(tmp_path, {"spawn": SPAWN})["spawn"]
    assert [(r["rank"], r["world_size"]) for r in spawned["ranks"]] == [(0, 2), (1, 2)]
    for spawn_rank, ddp_rank in zip(spawned["ranks"], runs["ddp"]["ranks"]):
        assert spawn_rank["train"] == ddp_rank["train"] and spawn_rank["val"] == ddp_rank["val"]
    assert _scalars(spawned["dir"], "val/ppl") == pytest.approx(_scalars(runs["ddp"]["dir"], "val/ppl"), rel=1e-6)
    # The console lines come from rank 0 alone (rank-zero hooks in the spawned processes), each once.
    output = (spawned["dir"] / "output.txt").read_text()
    assert [output.count(line) for line in ("Training: 2 epochs", "epoch 1/2 ·", "epoch 2/2 ·", "Best checkpoint:")] == [1] * 4


@pytest.mark.parametrize("recipe", [None, "configs/bag_embedded.yaml"], ids=["tokens", "bags"])
def test_the_trainer_system_and_data_module_pickle_for_ddp_spawn(recipe, tiny_corpus, tmp_path, monkeypatch):
    """What ``ddp_spawn`` sends to each rank's process, set up as a rank has it: a lambda or an open handle anywhere
    in it fails the launch (a lambda in the Preprocessor once did, reached also through the system's optimizer)."""
    config = ["-c", str(Path(__file__).resolve().parents[1] / recipe)] if recipe else []
    monkeypatch.chdir(tmp_path)
    small = ["--data.batch_size", "2", "--data.eval_batch_size", "2", "--data.bptt", "4",
             "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16"]  # fmt: skip
    cli = build_cli([*config, "--data.source", str(tiny_corpus), *small], run=False)
    cli.datamodule.setup("fit")
    trainer, model, datamodule = pickle.loads(pickle.dumps((cli.trainer, cli.model, cli.datamodule)))
    assert datamodule.preprocessor("The cat, sat.") == cli.datamodule.preprocessor("The cat, sat.")
    assert len(datamodule.datasets["train"]) == len(cli.datamodule.datasets["train"])
    torch.testing.assert_close(model.state_dict(), cli.model.state_dict(), rtol=0, atol=0)
