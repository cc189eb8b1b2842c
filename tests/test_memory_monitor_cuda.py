"""MemoryMonitor on a CUDA run: each rank's allocator counters logged under rank-tagged names, hp/peak_memory_mib as the
peak reserved memory, the start-of-fit prediction or one line saying why there is none. On CPU the CUDA counters are
faked with unittest.mock; on a CUDA machine a real fit checks them against torch."""

import logging
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.data import Batch
from lm_lightning.memory.measure import peak_memory_mib
from lm_lightning.memory.monitor import MemoryMonitor
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
# What the fake CUDA allocator reports: allocated, reserved and their peaks.
FAKE = {
    "memory_allocated": 300 * MiB,
    "memory_reserved": 512 * MiB,
    "max_memory_allocated": 700 * MiB,
    "max_memory_reserved": 896 * MiB,
}
TAGS = ("allocated", "reserved", "peak_allocated", "peak_reserved", "fragmentation")


def windows(count: int = 3, vocab: int = 50) -> list[Batch]:
    torch.manual_seed(0)
    return [Batch(torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (3, 5)), 0, 3, 5, 15.0) for _ in range(count)]


def fit(monitor: MemoryMonitor, log_dir, **trainer_args) -> L.Trainer:
    model = LanguageModel(LSTMNetwork(50, 8, 8, 1, dropout=0.0, tie_weights=False), optimizer=torch.optim.Adam, sample_length=0)
    trainer = L.Trainer(
        max_steps=3, logger=TensorBoardLogger(log_dir, name="", version=0), callbacks=[monitor], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **trainer_args,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(windows(), batch_size=None))
    return trainer


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_cuda_counters_are_logged_per_rank_in_mib(tmp_path, caplog):
    """A CPU fit that the monitor takes for a CUDA one: torch.cuda's counters faked, the real logging path."""
    fakes = {name: mock.patch(f"torch.cuda.{name}", return_value=value) for name, value in FAKE.items()}
    reset = mock.patch("torch.cuda.reset_peak_memory_stats")
    with (
        mock.patch.object(MemoryMonitor, "_cuda", staticmethod(lambda module: True)),
        reset as reset_peaks,
        caplog.at_level(logging.INFO),
    ):
        for fake in fakes.values():
            fake.start()
        try:
            monitor = MemoryMonitor(log_every_n_steps=1, summary=False)
            trainer = fit(monitor, tmp_path)
        finally:
            for fake in fakes.values():
                fake.stop()
    reset_peaks.assert_called_once()  # the peaks are this fit's
    expected = {"allocated": 300.0, "reserved": 512.0, "peak_allocated": 700.0, "peak_reserved": 896.0, "fragmentation": 212.0}
    logged = scalars(tmp_path / "version_0")
    for tag in TAGS:
        assert logged[f"memory/rank0/cuda_{tag}_mib"] == [(step, expected[tag]) for step in (1, 2, 3)], tag
    assert monitor.history[-1]["memory/rank0/cuda_fragmentation_mib"] == 212.0
    # The token data module is what the arithmetic reads windows from: without one, the monitor says so, once.
    assert "MemoryMonitor: no CUDA prediction: the arithmetic needs the token data module and an optimizer." in caplog.text
    assert "peak CUDA reserved" in monitor.summary_table(trainer) and "896.0 MiB" in monitor.summary_table(trainer)


def test_every_rank_is_gathered_and_tagged_with_its_rank():
    monitor = MemoryMonitor()
    two_ranks = SimpleNamespace(strategy=SimpleNamespace(all_gather=lambda t: torch.stack([t, t + 1])))
    with mock.patch("lm_lightning.memory.monitor.cuda_memory", return_value=dict(zip(TAGS, (1, 2, 3, 4, 1)))):
        metrics = monitor._cuda_metrics(two_ranks, torch.device("cpu"))
    assert metrics["memory/rank0/cuda_reserved_mib"] == 2 / MiB and metrics["memory/rank1/cuda_reserved_mib"] == 1 + 2 / MiB
    assert sorted(metrics) == sorted(f"memory/rank{r}/cuda_{tag}_mib" for r in (0, 1) for tag in TAGS)


def test_hp_peak_memory_on_a_gpu_is_the_peak_reserved_memory():
    """Reserved, not allocated: what the process took from the device, and what runs out."""
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)), callbacks=[])
    with mock.patch("torch.cuda.max_memory_reserved", return_value=896 * MiB) as reserved:
        assert peak_memory_mib(trainer) == 896.0
    reserved.assert_called_once_with(torch.device("cuda", 0))


def test_the_prediction_on_a_gpu_is_the_arithmetic(tmp_path, tiny_corpus, monkeypatch):
    """Given the token data module and the fit's optimizer, the monitor's prediction is cuda_estimate.py's arithmetic
    for the trainer's own precision (never probe steps on the CPU)."""
    from lm_lightning.cli import build_cli
    from lm_lightning.memory.cuda_estimate import predict_in_fit

    monkeypatch.chdir(tmp_path)
    data = ["--data.source", str(tiny_corpus), "--data.min_freq", "1", "--data.batch_size", "4", "--data.bptt", "8"]
    network = ["--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.sample_length", "0"]
    cli = build_cli(["-c", str(ROOT / "configs/default.yaml"), *data, *network], run=False)
    config = cli.model.configure_optimizers()
    # What predict_in_fit reads of a started fit's trainer, for a 16-mixed run on one GPU.
    trainer = SimpleNamespace(datamodule=cli.datamodule, optimizers=[config["optimizer"] if isinstance(config, dict) else config],
                              precision="16-mixed", world_size=1, callbacks=cli.trainer.callbacks, accumulate_grad_batches=1)  # fmt: skip
    plan, reason = predict_in_fit(trainer, cli.model)
    assert reason == "" and (plan.run.optimizer, plan.run.precision, plan.run.streams, plan.run.bptt) == (
        "AdamW",
        "16-mixed",
        4,
        8,
    )
    assert plan.table().startswith("Predicted GPU memory: ")
    trainer.precision = "64-true"
    assert predict_in_fit(trainer, cli.model) == (None, "no CUDA prediction: estimate's GPU arithmetic covers --trainer.precision "
                                                  "32-true, 16-mixed, bf16-mixed, 16-true, bf16-true, not 64-true: pick one of those.")  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_fit_logs_the_allocators_counters(tmp_path):
    monitor = MemoryMonitor(log_every_n_steps=1, summary=False, estimate=False)
    trainer = fit(monitor, tmp_path, accelerator="gpu", devices=1)
    logged = scalars(tmp_path / "version_0")
    for row in monitor.history:
        assert row["memory/rank0/cuda_fragmentation_mib"] == pytest.approx(
            row["memory/rank0/cuda_reserved_mib"] - row["memory/rank0/cuda_allocated_mib"]
        )
        assert row["memory/rank0/cuda_peak_reserved_mib"] >= row["memory/rank0/cuda_peak_allocated_mib"] > 0
    assert len(logged["memory/rank0/cuda_peak_reserved_mib"]) == 3
    # hp/peak_memory_mib: the peak reserved memory of this fit (the monitor reset the peaks when it started).
    assert logged["hp/peak_memory_mib"][-1][1] == pytest.approx(torch.cuda.max_memory_reserved() / MiB)
    assert trainer.strategy.root_device.type == "cuda"
