"""`estimate` for a GPU run: the caching allocator's rules, one small configuration's peak derived here by hand, the
command on a machine without CUDA (labels, --budget, --fastest refused), and on a CUDA machine the prediction held to
torch's own counters within 10%."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator

from lm_lightning.errors import LMInputError
from lm_lightning.memory.cuda_allocator import CachingAllocator, round_size, segment_size
from lm_lightning.memory.cuda_estimate import is_gpu_run, requested_accelerator, search
from lm_lightning.memory.cuda_plan import CudaPlan, GpuRun, cublas_workspace_bytes
from lm_lightning.memory.cuda_steps import plan

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
GPU = ["--trainer.accelerator", "gpu"]


def test_allocator_rounds_to_512_bytes_and_sizes_segments_by_pool():
    assert [round_size(n) for n in (1, 512, 513, 1000)] == [512, 512, 1024, 1024]
    # Small pool (<= 1 MiB): 2 MiB segments. Large: 20 MiB below 10 MiB, else the request rounded up to 2 MiB.
    assert [segment_size(n) for n in (512, MiB, MiB + 512, 10 * MiB - 512, 10 * MiB, 10 * MiB + 512)] == [
        2 * MiB, 2 * MiB, 20 * MiB, 20 * MiB, 10 * MiB, 12 * MiB,
    ]  # fmt: skip
    a = CachingAllocator()
    for i in range(4):  # three 600 KiB blocks share a 2 MiB segment, the fourth needs another
        a.malloc(f"small{i}", 600 * 1024)
    assert (a.allocated, a.reserved) == (4 * 600 * 1024, 2 * 2 * MiB)
    a.malloc("x", 3 * MiB)  # a 20 MiB segment, split: 17 MiB stays free for the next large request
    a.malloc("y", 3 * MiB)
    assert a.reserved == 24 * MiB
    a.free("x")
    a.free("y")  # the two blocks merge with the free rest: 20 MiB free again
    a.malloc("z", 15 * MiB)
    assert a.reserved == 24 * MiB
    # A remainder of 1 MiB or less is not split off a large block: it counts as allocated with it.
    b = CachingAllocator()
    assert b.malloc("split", 10 * MiB + MiB // 2) == 10 * MiB + MiB // 2  # 12 MiB segment, 1.5 MiB split off
    assert b.malloc("whole", 11 * MiB + MiB // 2) == 12 * MiB  # 0.5 MiB left: the whole segment
    assert (b.allocated, b.reserved, b.peak_allocated) == (22 * MiB + MiB // 2, 24 * MiB, 22 * MiB + MiB // 2)


def r(nbytes: int) -> int:
    """The caching allocator's rounding, written out again: up to a multiple of 512 bytes."""
    return -(-nbytes // 512) * 512


# vocab 1000, 2 x 64 tied LSTM, dropout 0.2, 4 streams x 8 steps (32 tokens), AdamW, a 32 MiB cuBLAS workspace.
V, E, H, L, B, T = 1000, 64, 64, 2, 4, 8
N = B * T
SMALL = dict(vocab_size=V, embedding_dim=E, hidden_dim=H, num_layers=L, tie_weights=True, dropout=0.2, batch_size=B, bptt=T)
# Every parameter tensor, rounded on its own (the optimizer's state and temporaries are one tensor per parameter; on
# CUDA StackedLSTM's weights live in one cuDNN buffer per layer, whose sizes here are the same sums since each tensor is
# a multiple of 512 bytes).
LSTM = [4 * H * E * 4, 4 * H * H * 4, 4 * H * 4, 4 * H * 4, 4 * H * H * 4, 4 * H * H * 4, 4 * H * 4, 4 * H * 4]
LAYERS = [sum(LSTM[:4]), sum(LSTM[4:])]  # float32 bytes of each layer's buffer
P = r(V * E * 4) + sum(r(n) for n in LSTM) + r(V * 4)  # embedding (= the tied decoder), LSTM, decoder bias
assert P == 256_000 + 266_240 + 4096 == 526_336 and LAYERS == [133_120, 133_120]
WORKSPACES = 2 * 32 * MiB  # cuBLAS's for the forward and the backward thread
# The small pool (every block here but those two) needs two 2 MiB segments at its peak (2.6-2.8 MB in use, in blocks of
# at most 256,000 B); cuBLAS's 32 MiB each get their own. No cuDNN dropout state: no cuDNN call of the per-layer stack
# drops (get_dropout_state in PyTorch's cudnn/RNN.cpp creates one only for dropout_p > 0).
RESERVED = 2 * 32 * MiB + 2 * 2 * MiB


def test_float32_peak_is_the_optimizer_step_derived_by_hand():
    p = plan(GpuRun(**SMALL, precision="32-true", cublas_workspace=32 * MiB))
    # At AdamW's first step: parameters, gradients (float32; the embedding's holds the tied decoder's with the lookup's
    # added in place, the LSTM's are cuDNN's flat buffer of each layer), exp_avg and exp_avg_sq, and foreach's
    # sqrt(exp_avg_sq) per parameter: 5P. The forward of a later step holds 4P and this window's activations (the
    # log-softmax and logits 2 x 128,000 B, ...): less. The batch's ids and the loss are kept until the step ends.
    params, grads, state, sqrt = P, P, 2 * P, P
    batch = r(N * 8) + r(N * 8) + r(4)  # inputs, targets (int64), the loss
    hidden = 2 * r(L * B * H * 4)  # the (h, c) carried to the next window
    expected = params + grads + state + sqrt + batch + hidden + WORKSPACES
    assert expected == 69_746_176
    assert (p.allocated, p.reserved, p.peak_at) == (expected, RESERVED, "optimizer step: decoder.bias temporary 0")
    assert p.parts["optimizer state"] == state and p.parts["optimizer step temporaries"] == sqrt
    assert sum(p.parts.values()) == p.allocated and p.total == RESERVED + 500 * MiB


def test_mixed_precision_peak_is_the_end_of_the_forward_pass_derived_by_hand():
    p = plan(GpuRun(**SMALL, precision="16-mixed", cublas_workspace=32 * MiB))
    # Float32 master weights, the previous step's float32 gradients (set to None only after this forward pass), AdamW's
    # state: 4P. Then what this window holds when its loss is computed (the LSTM: one cuDNN call per layer):
    # autocast: each layer's weights in a float16 buffer of its own (the same bytes as one buffer for both), the
    # decoder's weight and bias
    copies = sum(r(layer // 2) for layer in LAYERS) + r(V * H * 2) + r(V * 2)
    # the embedding's 1-byte dropout mask; layer 0's float16 input; each layer's float16 output; the output's 1-byte
    # dropout mask; the decoder's float16 input
    saved = r(N * E) + r(N * E * 2) + L * r(N * H * 2) + r(N * H) + r(N * H * 2)
    between = r(N * H) + r(N * H * 2)  # F.dropout between the layers: its 1-byte mask, its float16 output (layer 1's input)
    reserve = L * r(6 * N * H * 2)  # the assumed cuDNN rule, per layer: 6 values per step and stream, none for dropout
    logits = r(N * V * 2) + r(N * V * 4) + r(N * V * 4)  # float16 logits, their float32 copy (nll), the log-softmax
    batch = 2 * r(N * 8) + r(4)  # ids; nll's total weight
    hidden = 4 * r(L * B * H * 2)  # the carried (h, c), sliced and saved by each layer's call, and the new one
    assert (copies, saved, between, reserve, logits) == (263_168, 20_480, 6_144, 49_152, 320_000)
    expected = 4 * P + copies + saved + between + reserve + logits + batch + hidden + WORKSPACES
    assert (p.allocated, p.reserved, p.peak_at) == (expected, RESERVED, "forward: nll total weight")
    assert p.allocated > 5 * P + WORKSPACES  # above the optimizer step's 5P
    parts = ("autocast's half copies of the weights", "dropout between LSTM layers (1-byte masks, outputs)",
             "cuDNN reserve space, one per LSTM layer (assumed rule)")  # fmt: skip
    assert [p.parts[part] for part in parts] == [copies, between, reserve]


def test_cublas_workspace_follows_torch_and_its_environment_variable(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert (cublas_workspace_bytes(9), cublas_workspace_bytes(8), cublas_workspace_bytes(None)) == (32 * MiB, 8_519_680, 32 * MiB)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert cublas_workspace_bytes(8) == 4096 * 1024 * 8


def test_the_accelerator_is_read_from_flags_and_config_files(tmp_path, monkeypatch):
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    config = tmp_path / "gpu.yaml"
    config.write_text("trainer:\n  accelerator: gpu\n")
    assert requested_accelerator(["-c", str(config)]) == "gpu" and is_gpu_run(["--config", str(config)])
    assert not is_gpu_run(["-c", str(config), "--trainer.accelerator=cpu"]) and not is_gpu_run([])
    assert is_gpu_run(["--trainer.accelerator", "cuda"])


def test_auto_is_a_gpu_run_where_lightnings_auto_picks_cuda(monkeypatch):
    """``auto`` asks what ``fit`` asks, Lightning's CUDAAccelerator.is_available, not torch.cuda.is_available: with the
    accelerator pinned unavailable as conftest.py pins it, a GPU machine's in-process estimates stay on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    assert not is_gpu_run(["--trainer.accelerator", "auto"]) and not is_gpu_run([])
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    assert is_gpu_run(["--trainer.accelerator", "auto"]) and is_gpu_run([])


def test_the_budget_search_turns_the_chunked_loss_then_the_micro_batch():
    run = GpuRun(33_278, 200, 200, 2, True, 0.2, 20, 35, "16-mixed", "SGD", 0, 0, cublas_workspace=32 * MiB)
    plain, chunked = plan(run), plan(replace(run, loss_chunk_size=256))
    assert chunked.total < plain.total
    found, _ = search(run, plain.total - 1)
    assert (found.run.streams, found.run.loss_chunk_size, found.total) == (20, 256, chunked.total)
    found, _ = search(run, chunked.total - 1)  # below the chunked loss at 20 streams: a smaller micro-batch
    assert found is not None and found.run.streams < 20 and found.total <= chunked.total - 1
    none, smallest = search(run, 100 * MiB)  # under the CUDA context alone
    assert none is None and smallest.total > 100 * MiB


def corpus(folder: Path, words: int) -> Path:
    """``words`` word types, each three times, 20 to a line: a vocabulary of that size in a few KB."""
    text = " ".join(f"w{i % words}" for i in range(3 * words))
    lines = "\n".join(text[i : i + 120] for i in range(0, len(text), 120)) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text(lines)
    return folder


def args_for(source: Path, *extra: str) -> list[str]:
    data = ["--data.source", str(source), "--data.tokenizer", "whitespace", "--data.min_freq", "1"]
    network = ["--model.network.embedding_dim", "64", "--model.network.hidden_dim", "64", "--model.sample_length", "0"]
    return ["-c", str(ROOT / "configs/default.yaml"), *data, *network, *GPU, *extra]


@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    """A machine without CUDA whatever this one has; nothing may initialize it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: pytest.fail("estimate initialized CUDA"))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)


def test_estimate_of_a_gpu_run_prints_the_gpu_table_without_cuda(no_cuda, tmp_path, capsys):
    from lm_lightning.cli import estimate

    predicted = estimate(
        args_for(corpus(tmp_path / "c", 200), "--trainer.precision", "16-mixed", "--data.batch_size", "4", "--data.bptt", "8")
    )
    out = capsys.readouterr().out
    assert isinstance(predicted, CudaPlan) and predicted.run.precision == "16-mixed" and predicted.run.streams == 4
    assert (
        out.startswith("Predicted GPU memory: ")
        and "a prediction for a CUDA GPU (none here): arithmetic, nothing ran on one" in out
    )
    for label in ("peak allocated (torch.cuda.max_memory_allocated)", "reserved by the caching allocator", "fragmentation",
                  "CUDA context (assumed; outside the allocator)", "host RSS (process baseline, as on CPU)"):  # fmt: skip
        assert label in out
    assert "process RSS, precision" not in out and "Predicted speed" not in out  # no CPU probe claims to be the GPU


def test_a_budget_answers_for_the_gpu(no_cuda, tmp_path, capsys):
    from lm_lightning.cli import estimate

    common = args_for(
        corpus(tmp_path / "c", 5000), "--trainer.precision", "16-mixed", "--data.batch_size", "32", "--data.bptt", "35"
    )
    as_configured = estimate(common)
    found = estimate([*common, "--budget", str(as_configured.total - 1)])
    out = capsys.readouterr().out
    assert (
        found.total <= as_configured.total - 1
        and f"fits on the GPU with {found.total / MiB:.1f} MiB predicted (reserved + context):" in out
    )
    line = next(text for text in out.splitlines() if text.startswith("python -m lm_lightning fit"))
    assert line.startswith("python -m lm_lightning fit " + " ".join(common)) and "--trainer.callbacks+=ChunkedLoss" in line
    estimate([*common, "--budget", "16GiB"])
    assert "Budget 16.0 GiB: fits on the GPU as configured" in capsys.readouterr().out
    estimate([*common, "--budget", "300MiB"])  # under the assumed 500 MiB CUDA context alone
    assert "Budget 300.0 MiB: nothing fits on the GPU. What no setting of the search changes" in capsys.readouterr().out


def test_fastest_and_an_unmodelled_strategy_are_one_sentence_each(no_cuda, tmp_path, monkeypatch, capsys):
    from lm_lightning import cli

    with monkeypatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(cli, "build_cli", lambda *a, **k: pytest.fail("built the run to refuse --fastest"))
        cli.main(["estimate", *GPU, "--budget", "1GiB", "--fastest"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err == [
        "error: --fastest times probe steps on this machine's CPU, not on a GPU: leave it out; --budget SIZE alone answers for the GPU."
    ]
    recomputed = args_for(
        corpus(tmp_path / "c", 50), "--data.batch_size", "4", "--data.bptt", "8", "--trainer.callbacks+=Recomputation"
    )
    with pytest.raises(
        LMInputError, match=r"^estimate's GPU arithmetic models ChunkedLoss and MicroBatchAccumulation, not Recomputation: "
    ):
        cli.estimate(recomputed)


MEASURE = """
import json, sys
import lightning as L, torch
from lm_lightning.data import Batch
from lm_lightning.memory.monitor import MemoryMonitor
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel
V, E, LAYERS, B, T = 50_000, 256, 2, 32, 35
torch.manual_seed(0)
windows = [Batch(torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T)), 0, B, T, float(B * T)) for _ in range(4)]
model = LanguageModel(LSTMNetwork(V, E, E, LAYERS, dropout=0.2, tie_weights=True), optimizer=torch.optim.AdamW, sample_length=0)
trainer = L.Trainer(accelerator="gpu", devices=1, precision=sys.argv[1], max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                    callbacks=[MemoryMonitor(log_every_n_steps=1, summary=False, estimate=False)])  # resets the peaks at fit start
trainer.fit(model, torch.utils.data.DataLoader(windows, batch_size=None))
free, total = torch.cuda.mem_get_info()
print("MEASURED" + json.dumps({"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
      "context": total - free - torch.cuda.memory_reserved(), "major": torch.cuda.get_device_capability()[0]}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_the_prediction_holds_on_a_gpu(precision, tmp_path):
    """Three AdamW steps of a 50k-word, 2 x 256 LSTM (32 x 35 windows) in a fresh process (nothing cached by other
    tests), against the arithmetic for the same run: peak allocated and reserved within 10%; the context is reported."""
    if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, precision], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(re.search(r"MEASURED(.*)", proc.stdout).group(1))
    predicted = plan(
        GpuRun(50_000, 256, 256, 2, True, 0.2, 32, 35, precision, cublas_workspace=cublas_workspace_bytes(measured["major"]))
    )
    report = (
        f"{precision}: allocated {predicted.allocated / MiB:.1f} predicted / {measured['allocated'] / MiB:.1f} MiB measured, "
        f"reserved {predicted.reserved / MiB:.1f} / {measured['reserved'] / MiB:.1f} MiB, CUDA context (assumed "
        f"{predicted.context / MiB:.0f}) measured {measured['context'] / MiB:.0f} MiB\n{predicted.table()}"
    )
    print(report)
    assert predicted.allocated == pytest.approx(measured["allocated"], rel=0.10), report
    assert predicted.reserved == pytest.approx(measured["reserved"], rel=0.10), report
