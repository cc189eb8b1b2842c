"""MemoryMonitor: byte counts equal hand-computed values, hooks never outlive a step, presets stack with precision."""

import resource
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lm_lightning.callbacks.precision import PrecisionGuard
from lm_lightning.cli import build_cli
from lm_lightning.data import Batch
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import SavedTensorBytes, human_bytes
from lm_lightning.memory.monitor import MemoryMonitor
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = ["--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32", "--model.network.num_layers", "1", "--model.sample_length", "0"]
BATCH, TIME = 3, 5


def window(inputs: torch.Tensor, targets: torch.Tensor) -> Batch:
    """A whole (BATCH, TIME) window, as the data modules yield it."""
    return Batch(inputs, targets, first_stream=0, num_streams=BATCH, length=TIME, divisor=BATCH * TIME)


def tiny_model(**kwargs) -> LanguageModel:
    """vocab 50, embedding 8, hidden 8, one layer, untied, no dropout, Adam: 1,426 float32 parameters in 7 tensors."""
    return LanguageModel(LSTMNetwork(50, 8, 8, 1, dropout=0.0, tie_weights=False), optimizer=torch.optim.Adam, sample_length=0, **kwargs)


def saved_by_graph_walk(loss: torch.Tensor, exclude: list[torch.Tensor]) -> int:
    """Independent of the hooks: walk the autograd graph and read each node's ``_saved_*`` tensors."""
    skip = {(str(t.device), t.untyped_storage().data_ptr()) for t in exclude}
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor):
                        key = (str(t.device), t.untyped_storage().data_ptr())
                        if key not in skip:
                            storages[key] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory):
    """Three Adam steps of the tiny model on (3, 5) batches, measured at every step."""
    torch.manual_seed(0)
    batches = [window(torch.randint(0, 50, (BATCH, TIME)), torch.randint(0, 50, (BATCH, TIME))) for _ in range(3)]
    model, monitor = tiny_model(), MemoryMonitor(log_every_n_steps=1, summary=False)
    log_dir = tmp_path_factory.mktemp("monitor")
    trainer = L.Trainer(
        max_steps=3, logger=TensorBoardLogger(log_dir, name="", version=0), callbacks=[monitor], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer, model, monitor, log_dir / "version_0", batches


def test_saved_tensor_bytes_counts_each_storage_once_and_skips_excluded_tensors():
    w = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4, requires_grad=True)
    with SavedTensorBytes(exclude=[w]) as saved:
        h = x @ w  # mm saves x (5*4*4 = 80 B) and w (excluded)
        a = h.sigmoid()  # saves its output a: 5*3*4 = 60 B
        b = a.t().exp()  # exp saves its output, a new 60 B storage (a.t() is a view of a)
        c = a[1:] * a[:, :2].sum()  # mul saves a[1:] (a view of a: no new bytes) and the 4 B sum
    assert (saved.bytes, saved.num_packed, saved.active) == (80 + 60 + 60 + 4, 6, False)
    (b.sum() + c.sum()).backward()  # the detached aliases the hooks keep give the same gradient as no hooks
    with_hooks = x.grad.clone()
    x.grad = None
    h = x @ w
    a = h.sigmoid()
    (a.t().exp().sum() + (a[1:] * a[:, :2].sum()).sum()).backward()
    torch.testing.assert_close(with_hooks, x.grad, rtol=0, atol=0)


def test_saved_tensor_bytes_keeps_autograds_check_for_in_place_changes():
    x = torch.randn(4, requires_grad=True)
    with SavedTensorBytes():
        y = x.sigmoid()
    with torch.no_grad():
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_params_grads_and_adam_state_bytes_equal_hand_computed_values(tiny_fit):
    trainer, model, monitor, _, _ = tiny_fit
    numel = 50 * 8 + (4 * 8 * 8) * 2 + (4 * 8) * 2 + (8 * 50 + 50)  # embedding, LSTM weights and biases, decoder
    assert numel == sum(p.numel() for p in model.parameters()) == 1426
    assert [h["step"] for h in monitor.history] == [1, 2, 3]
    for h in monitor.history:
        assert h["memory/params_bytes"] == h["memory/grads_bytes"] == 4 * numel
        # Adam: exp_avg and exp_avg_sq like each parameter, plus one float32 `step` scalar tensor per parameter tensor.
        assert h["memory/optimizer_bytes"] == 2 * 4 * numel + 4 * 7


def test_activation_bytes_equal_an_independent_walk_of_the_autograd_graph(tiny_fit):
    _, _, monitor, _, batches = tiny_fit
    reference = tiny_model()
    loss = reference._loss(batches[0], "train")  # the same (3, 5) forward as the training step, from a zero state
    # The summed NLL is divided by batch.divisor, a Python number: autograd keeps it as an 8-byte 0-dim "wrapped number"
    # tensor, which PyTorch never hands to saved-tensor hooks (torch/csrc/autograd/saved_variable.cpp: "Avoid wrapped
    # numbers from being leaked to the user"). The walk sees it, no hook can: it is left out of the comparison.
    divisor = loss.grad_fn._saved_other
    assert divisor.dim() == 0 and float(divisor) == batches[0].divisor
    expected = saved_by_graph_walk(loss, [*reference.parameters(), batches[0].inputs, batches[0].targets, divisor])
    # At least the float32 log-probabilities (15 x 50) and the LSTM's input and output (5 x 3 x 8 each) are in it.
    assert expected >= 4 * (BATCH * TIME * 50 + 2 * BATCH * TIME * 8)
    assert [h["memory/activations_bytes"] for h in monitor.history] == [expected] * 3  # carried state: same bytes


def test_tensorboard_scalars_and_cpu_peak(tiny_fit):
    _, _, monitor, log_dir, _ = tiny_fit
    events = EventAccumulator(str(log_dir))
    events.Reload()
    for name in ["params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "peak_bytes"]:
        logged = [(e.step, e.value) for e in events.Scalars(f"memory/{name}")]
        assert logged == [(h["step"], pytest.approx(h[f"memory/{name}"], rel=1e-6)) for h in monitor.history]
    peaks = [h["memory/peak_bytes"] for h in monitor.history]
    # ru_maxrss is KiB on Linux: converted to bytes, a process with torch loaded is well above 50 MiB.
    assert peaks == sorted(peaks) and all(p % 1024 == 0 and p > 50 * 2**20 for p in peaks)
    # The process's high-water resident set only grows: VmHWM on Linux (ru_maxrss elsewhere, and it lags VmHWM).
    status = Path("/proc/self/status")
    hwm = next((int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None) if status.exists() else None
    assert peaks[-1] <= (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def test_summary_table_is_one_screen_with_readable_units(tiny_fit):
    trainer, _, monitor, _, _ = tiny_fit
    table = monitor.summary_table(trainer)
    lines = table.splitlines()
    # One more line, "kept by the forward pass", where the allocator counts bytes in use (glibc).
    assert len(lines) == 6 + ("memory/retained_bytes" in monitor.history[0])
    assert lines[0].startswith("Memory: 3 measured batch(es), precision 32-true, cpu")
    assert lines[1].split() == ["parameters", "5.6", "KiB"] and lines[3].split() == ["optimizer", "state", "11.2", "KiB"]
    assert [human_bytes(n) for n in (512, 5704, 3 * 2**20, 5 * 2**30)] == ["512 B", "5.6 KiB", "3.0 MiB", "5.0 GiB"]


def test_hooks_are_removed_when_a_step_raises(tmp_path):
    class Failing(LanguageModel):
        def training_step(self, batch, batch_idx):
            self.network(batch.inputs)  # saved tensors are packed, then the step fails before backward
            self.hooks = next(c for c in self.trainer.callbacks if isinstance(c, MemoryMonitor))._saved
            raise RuntimeError("boom")

    model = Failing(LSTMNetwork(50, 8, 8, 1, dropout=0.0, tie_weights=False), sample_length=0)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[MemoryMonitor(1), PrecisionGuard()], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    ids = torch.randint(0, 50, (BATCH, TIME))
    batches = [window(ids, ids)]
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    packed = model.hooks.num_packed
    assert packed > 0 and not model.hooks.active
    torch.randn(3, requires_grad=True).sigmoid().sum().backward()
    assert model.hooks.num_packed == packed  # no longer called
    assert all(not m._forward_hooks for m in model.modules())  # PrecisionGuard's dtype hooks are gone too


def test_bad_interval_fails_at_construction():
    with pytest.raises(LMInputError, match="log_every_n_steps must be a positive integer, got 0"):
        MemoryMonitor(log_every_n_steps=0)


def test_presets_stack_and_precision_composes_with_the_monitor(tiny_corpus, tmp_path, monkeypatch, capsys):
    """-c bf16.yaml -c monitor.yaml: both callbacks (each appended once), bf16 autocast, memory measured and printed."""
    monkeypatch.chdir(tmp_path)
    presets = [str(ROOT / f"configs/{name}.yaml") for name in ("presets/debug", "memory/bf16", "memory/monitor")]
    data = ["--data.source", str(tiny_corpus), "--data.batch_size", "4", "--data.bptt", "8", "--data.min_freq", "1"]
    cli = build_cli(["fit", *[a for p in presets for a in ("-c", p)], *QUIET, *SMALL, *data])
    guards = [c for c in cli.trainer.callbacks if isinstance(c, PrecisionGuard)]
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, MemoryMonitor)]
    assert len(guards) == len(monitors) == 1 and cli.trainer.precision == "bf16-mixed"
    assert guards[0].report["modules"]["network.decoder"] == {"params": "float32", "output": "bfloat16"}
    history = monitors[0].history
    assert len(history) == 1 and history[0]["step"] == 1  # debug.yaml runs 5 batches; the preset measures every 10th
    params = sum(p.numel() for p in cli.model.parameters())  # tied: the shared matrix once
    assert history[0]["memory/params_bytes"] == history[0]["memory/grads_bytes"] == 4 * params  # float32 master weights
    assert history[0]["memory/activations_bytes"] > 0
    out = capsys.readouterr().out
    assert "Memory: 1 measured batch(es), precision bf16-mixed, cpu" in out and "peak process RSS" in out
    events = EventAccumulator(cli.trainer.log_dir)
    events.Reload()
    assert {"memory/activations_bytes", "memory/peak_bytes"} <= set(events.Tags()["scalars"])
    assert "precision/summary/text_summary" in events.Tags()["tensors"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_is_the_allocators_peak(tmp_path):
    monitor = MemoryMonitor(log_every_n_steps=1, summary=False)
    batches = [window(torch.randint(0, 50, (BATCH, TIME)), torch.randint(0, 50, (BATCH, TIME)))] * 2
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=2, default_root_dir=tmp_path, callbacks=[monitor], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model = tiny_model()
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert 0 < monitor.history[-1]["memory/peak_bytes"] <= torch.cuda.max_memory_allocated()  # reset at fit start
    last = monitor.history[-1]
    # cuDNN flattens the LSTM weights (and their gradients) into one buffer each; allow for its alignment padding.
    assert last["memory/params_bytes"] == last["memory/grads_bytes"] and 4 * 1426 <= last["memory/params_bytes"] < 4 * 1426 + 4096


def test_a_callback_given_twice_by_stacked_presets_runs_once_the_last_one(tiny_corpus, tmp_path, monkeypatch, caplog):
    """-c monitor.yaml (every 10 batches) -c lean.yaml (every 50): one monitor, lean's — as any setting given twice."""
    monkeypatch.chdir(tmp_path)
    presets = ["-c", str(ROOT / "configs/memory/monitor.yaml"), "-c", str(ROOT / "configs/memory/lean.yaml")]
    with caplog.at_level("INFO"):
        cli = build_cli([*presets, "--data.source", str(tiny_corpus), "--data.batch_size", "4", *QUIET, *SMALL], run=False)
    [monitor] = [c for c in cli.trainer.callbacks if isinstance(c, MemoryMonitor)]
    assert monitor.log_every_n_steps == 50
    assert "MemoryMonitor given more than once (stacked presets): using the last one given." in caplog.text
