"""Right on a GPU (issue 27): each CUDA path made correct or refused in one sentence, checked here on CPU by faking the
device settings, and on a GPU by the tests marked ``cuda`` (``python -m pytest -m cuda``; ``benchmarks/gpu_check.sh``)."""

import re
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import REAL_AVAILABILITY, make_dm
from lightning.fabric.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.nn.utils import prune
from torch.testing import assert_close

from lm_lightning.callbacks import PrecisionGuard, Recomputation, SparseEmbeddingGradients, TokenThroughput
from lm_lightning.callbacks import precision as precision_module
from lm_lightning.callbacks import recompute as recompute_module
from lm_lightning.callbacks import throughput as throughput_module
from lm_lightning.callbacks.recompute import check_recomputable_dropout
from lm_lightning.cli import build_cli
from lm_lightning.errors import LMInputError
from lm_lightning.export.fake_quantization import enable_fake_quantization
from lm_lightning.networks import LSTMNetwork
from lm_lightning.networks import lstm as lstm_module
from lm_lightning.networks.lstm import StackedLSTM
from lm_lightning.storage.preflight import check_sparse_all_reduce
from lm_lightning.systems import LanguageModel
from lm_lightning.systems import base as base_module
from lm_lightning.systems.finite import UncheckedLosses

ROOT = Path(__file__).resolve().parents[1]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda", 0)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def tiny_args(corpus: Path, *extra: str) -> list[str]:
    """A tiny fit's flags (without the subcommand: ``build_cli(..., run=False)`` takes none)."""
    return [
        *QUIET, "--data.source", str(corpus), "--data.batch_size", "4", "--data.bptt", "8", "--data.min_freq", "1",
        "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.dropout", "0.3",
        "--model.sample_length", "0", "--trainer.limit_val_batches", "2", "--trainer.num_sanity_val_steps", "0", *extra,
    ]  # fmt: skip


def on(device: torch.device, precision: str = "32-true") -> SimpleNamespace:
    """The parts of a trainer the checks read, on ``device``."""
    return SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=device))


# --- 1. bf16-mixed and cuDNN's RNN autocast ----------------------------------------------------------------------
def test_bf16_mixed_on_a_cuda_lstm_is_refused_where_autocast_runs_it_in_float16(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: True)
    monkeypatch.setattr(precision_module, "rnn_autocast_dtype", lambda cls, device, dtype: asked.append(cls) or torch.float16)
    system = LanguageModel(LSTMNetwork(50, 8, 8, 2))
    with pytest.raises(LMInputError, match=r"^--trainer.precision bf16-mixed would run network.lstm \(StackedLSTM\) in float16 on this GPU: .* use --trainer.precision 16-mixed"):
        PrecisionGuard().setup(on(CUDA, "bf16-mixed"), system, "fit")
    assert asked == [nn.LSTM]
    PrecisionGuard().setup(on(CUDA, "bf16-mixed"), system, "validate")  # no gradients, nothing to underflow
    PrecisionGuard().setup(on(CUDA, "16-mixed"), system, "fit")  # float16 with a GradScaler: what the sentence advises
    PrecisionGuard().setup(on(torch.device("cpu"), "bf16-mixed"), system, "fit")  # oneDNN's bfloat16 (or the fallback)
    monkeypatch.setattr(precision_module, "rnn_autocast_dtype", lambda cls, device, dtype: torch.bfloat16)
    PrecisionGuard().setup(on(CUDA, "bf16-mixed"), system, "fit")  # a torch whose cuDNN RNN runs bfloat16 is trusted
    monkeypatch.setattr(precision_module, "rnn_autocast_dtype", lambda cls, device, dtype: None)
    with pytest.raises(LMInputError, match=r"cannot run network.lstm \(StackedLSTM\) on this GPU, which has no kernel for it"):
        PrecisionGuard().setup(on(CUDA, "bf16-mixed"), system, "fit")


def test_the_rnn_autocast_probe_reports_the_dtype_autocast_ran():
    assert precision_module.rnn_autocast_dtype(nn.LSTM, torch.device("cpu"), torch.bfloat16) in (torch.bfloat16, torch.float32, None)
    assert precision_module.rnn_autocast_dtype(nn.GRU, torch.device("cpu"), torch.float32) == torch.float32


@requires_cuda
def test_bf16_mixed_on_cuda_is_refused_or_runs_the_lstm_in_bfloat16(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = precision_module.rnn_autocast_dtype(nn.LSTM, CUDA, torch.bfloat16)
    args = tiny_args(tiny_corpus, "--trainer.max_steps", "3", "--trainer.precision", "bf16-mixed", "--trainer.accelerator", "gpu", "--trainer.devices", "1")
    if ran != torch.bfloat16:
        with pytest.raises(LMInputError, match="bf16-mixed would run network.lstm"):
            build_cli(["fit", *args])
        return
    guard = next(c for c in build_cli(["fit", *args]).trainer.callbacks if isinstance(c, PrecisionGuard))
    assert guard.report["modules"]["network.lstm"]["output"] == "bfloat16"


# --- 2. recomputation: the masks between layers from the generator checkpoint restores --------------------------
def grads(module: nn.Module, x: torch.Tensor, seed: int = 0):
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    output, (h, c) = module(x)
    (output.square().sum() + h.sum() + c.sum()).backward()
    return output.detach(), h.detach(), c.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_same(a, b, **tolerance):
    for first, second in zip(a[:3], b[:3]):
        assert_close(first, second, **tolerance)
    for name in a[3]:
        assert_close(a[3][name], b[3][name], **tolerance, msg=name)


def test_the_per_layer_lstm_is_the_fused_one_with_its_parameters_and_masks(monkeypatch):
    torch.manual_seed(0)
    stacked, x = StackedLSTM(12, 12, 3, dropout=0.4, batch_first=True).train(), torch.randn(4, 9, 12)
    fused = nn.LSTM(12, 12, 3, dropout=0.4, batch_first=True).train()
    fused.load_state_dict(stacked.state_dict())  # the same names: checkpoints and exports load either way
    # On CPU torch's kernel applies `dropout` between layers as F.dropout does: the same masks, to the last bit.
    assert_same(grads(stacked, x), grads(fused, x), rtol=0, atol=0)
    assert not torch.equal(grads(stacked, x)[0], grads(stacked, x, seed=1)[0])  # the masks are drawn, and matter
    # Without the masks: the per-layer arithmetic against the fused LSTM at dropout 0.
    monkeypatch.setattr(lstm_module.F, "dropout", lambda x, p, training: x)
    fused.dropout = 0.0
    assert_same(grads(stacked, x), grads(fused, x), rtol=0, atol=0)


def test_the_per_layer_lstm_runs_the_weights_of_qat_and_pruning():
    torch.manual_seed(0)
    net, x = LSTMNetwork(30, 8, 8, 2, dropout=0.3).train(), torch.randn(2, 5, 8)
    prune.l1_unstructured(net.lstm, "weight_hh_l1", amount=0.5)
    enable_fake_quantization(net, 8)
    plain = StackedLSTM(8, 8, 2, dropout=0.3, batch_first=True).train()
    with torch.no_grad():
        for name, _ in plain.named_parameters():  # the weights QAT computes with: pruned, then fake-quantized
            weight = getattr(net.lstm, name)
            setattr(plain, name, nn.Parameter(net.lstm.weight_fake_quantizer(weight) if name.startswith("weight") else weight.clone()))
    assert_close(grads(net.lstm, x)[0], grads(plain, x)[0], rtol=0, atol=0)


def recompute_grads(network: nn.Module, ids: torch.Tensor, seed: int = 0):
    system = LanguageModel(network)
    Recomputation(4).apply(system)
    network.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, (h, c) = system._nll(ids, ids, None)
    (loss + h.sum() + c.sum()).backward()
    return loss.detach(), h.detach(), c.detach(), {n: p.grad.clone() for n, p in network.named_parameters()}


def test_recomputed_gradients_equal_the_kept_ones_only_with_masks_from_the_restored_generator(monkeypatch):
    torch.manual_seed(0)
    network, ids = LSTMNetwork(40, 16, 16, 3, dropout=0.4).train(), torch.randint(0, 40, (3, 24))
    recomputed = recompute_grads(network, ids)
    with monkeypatch.context() as keep:
        keep.setattr(recompute_module, "checkpoint", lambda function, *args, **kwargs: function(*args))
        kept = recompute_grads(network, ids)
    assert_same(recomputed, kept, rtol=0, atol=0)
    # What cuDNN does on a GPU, played on CPU: masks from a state of its own, which checkpoint does not restore.
    own_state = torch.Generator().manual_seed(0)
    monkeypatch.setattr(lstm_module, "F", SimpleNamespace(dropout=lambda x, p, training: x * (torch.rand(x.shape, generator=own_state) >= p) / (1 - p)))
    wrong = recompute_grads(network, ids)
    assert not torch.allclose(wrong[3]["lstm.weight_ih_l0"], kept[3]["lstm.weight_ih_l0"])  # the test would see it


def test_recomputation_refuses_a_fused_rnn_with_dropout_between_layers_on_cuda_only(monkeypatch):
    from gru_model import GRUNetwork

    fork = GRUNetwork(30, 8, 8, 2)
    fork.gru.dropout = 0.3
    check_recomputable_dropout(fork, torch.device("cpu"))  # CPU: torch's generator draws those masks
    check_recomputable_dropout(LSTMNetwork(30, 8, 8, 2, dropout=0.3), CUDA)  # the template's StackedLSTM
    fork.gru.dropout = 0.0
    check_recomputable_dropout(fork, CUDA)
    fork.gru.dropout = 0.3
    with pytest.raises(LMInputError, match=r"^Recomputation cannot redraw the dropout between the layers of gru \(GRU, num_layers 2, dropout 0.3\) on CUDA"):
        Recomputation(2).setup(on(CUDA), LanguageModel(fork), "fit")


@requires_cuda
def test_on_cuda_the_per_layer_lstm_matches_the_fused_one_and_recomputes_its_masks(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 arithmetic on both paths
    torch.manual_seed(0)
    stacked, x = StackedLSTM(32, 32, 3, dropout=0.4, batch_first=True).to(CUDA).train(), torch.randn(4, 20, 32, device=CUDA)
    fused = nn.LSTM(32, 32, 3, batch_first=True).to(CUDA).train()
    fused.load_state_dict(stacked.state_dict())
    buffers = [{w.untyped_storage().data_ptr() for w in stacked._flat_weights[4 * k : 4 * k + 4]} for k in range(3)]
    assert [len(b) for b in buffers] == [1, 1, 1] and len(set.union(*buffers)) == 3  # one cuDNN buffer per layer
    with monkeypatch.context() as no_masks, warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not part of single contiguous chunk")  # no copy of the weights per call
        no_masks.setattr(lstm_module.F, "dropout", lambda x, p, training: x)
        assert_same(grads(stacked, x), grads(fused, x), rtol=1e-5, atol=1e-6)  # per layer or fused: another algorithm
    network, ids = LSTMNetwork(40, 32, 32, 3, dropout=0.4).to(CUDA).train(), torch.randint(0, 40, (3, 24), device=CUDA)
    recomputed = recompute_grads(network, ids)
    monkeypatch.setattr(recompute_module, "checkpoint", lambda function, *args, **kwargs: function(*args))
    # Same kernels on the same inputs; a wrong mask would change these gradients by their own size, not by 1e-6.
    assert_same(recomputed, recompute_grads(network, ids), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(recompute_grads(network, ids, seed=1)[3]["lstm.weight_ih_l1"], recomputed[3]["lstm.weight_ih_l1"])


# --- 3. exact resume on a GPU ---------------------------------------------------------------------------------
@requires_cuda
def test_a_resumed_cuda_run_ends_with_the_uninterrupted_runs_weights(tiny_corpus, tmp_path, monkeypatch):
    gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.deterministic", "warn", "--model.network.num_layers", "2"]
    args = tiny_args(tiny_corpus, *gpu, "--trainer.limit_train_batches", "6")
    weights = {}
    for name, runs in (("whole", [["--trainer.max_epochs", "2"]]), ("resumed", [["--trainer.max_epochs", "1"], ["--trainer.max_epochs", "2"]])):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        for i, extra in enumerate(runs):
            resume = ["--ckpt_path", "lightning_logs/version_0/checkpoints/last.ckpt"] if i else []
            cli = build_cli(["fit", *args, *extra, *resume])
        weights[name] = {k: v.cpu() for k, v in cli.model.state_dict().items()}
    for key, value in weights["whole"].items():
        assert torch.equal(value, weights["resumed"][key]), key


# --- 4. sparse gradients and NCCL -----------------------------------------------------------------------------
def ddp_trainer(strategy, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=list(callbacks), logger=False, enable_checkpointing=False)


def test_sparse_gradients_under_ddp_over_nccl_are_refused_and_over_gloo_kept(monkeypatch):
    model = LanguageModel(LSTMNetwork(30, 8, 8, 1, tie_weights=False))
    check_sparse_all_reduce(ddp_trainer("ddp", [SparseEmbeddingGradients()]), model)  # CPU processes: gloo
    check_sparse_all_reduce(ddp_trainer(DDPStrategy(process_group_backend="nccl")), model)  # dense gradients
    sentence = r"^Sparse embedding gradients cannot train under --trainer.strategy ddp on GPUs: its process group \(nccl\)"
    with pytest.raises(LMInputError, match=sentence):
        check_sparse_all_reduce(ddp_trainer(DDPStrategy(process_group_backend="nccl"), [SparseEmbeddingGradients()]), model)
    trainer = ddp_trainer("ddp")  # on GPUs, where Lightning's default backend is nccl:
    monkeypatch.setattr(DDPStrategy, "root_device", property(lambda self: CUDA))
    model.network.embedding.sparse = True  # a fork's network may build its embedding sparse
    with pytest.raises(LMInputError, match=sentence):
        check_sparse_all_reduce(trainer, model)


def test_the_nccl_refusal_comes_before_any_run_folder(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tiny_args(tiny_corpus, "-c", str(ROOT / "configs/memory/sparse_gradients.yaml"), "--model.network.tie_weights", "false",
                     "--model.optimizer", "SGD", "--model.optimizer.lr", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                     "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy", "--trainer.strategy.process_group_backend", "nccl")  # fmt: skip
    with pytest.raises(LMInputError, match="cannot train under --trainer.strategy ddp on GPUs"):
        build_cli(["fit", *args])
    assert not (tmp_path / "lightning_logs").exists()


# --- 6. the suite pins the CPU where it means the CPU ---------------------------------------------------------
def test_a_cli_test_trains_on_cpu_even_where_cuda_is_available(tiny_corpus, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert REAL_AVAILABILITY[CUDAAccelerator].__func__()  # unpinned, Lightning's `auto` would now pick the GPU
    cli = build_cli(tiny_args(tiny_corpus), run=False)
    assert isinstance(cli.trainer.accelerator, CPUAccelerator) and cli.trainer.strategy.root_device.type == "cpu"
    assert subprocess.run(["sh", "-c", 'test "${CUDA_VISIBLE_DEVICES-unset}" = ""']).returncode == 0  # subprocesses see no GPU
    marked = {item.name for item in request.session.items if item.get_closest_marker("cuda")}
    skipped_without_cuda = {
        item.name for item in request.session.items if item.path == request.path and any(m.kwargs.get("reason") == "needs CUDA" for m in item.iter_markers("skipif"))
    }  # fmt: skip
    assert skipped_without_cuda and skipped_without_cuda <= marked and request.node.name not in marked


# --- 7. no wait for the GPU at every micro-batch --------------------------------------------------------------
def test_the_nan_check_reads_once_per_optimizer_step_where_reading_waits(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(base_module, "reading_waits", lambda device: True)  # as on a GPU
    read, real_check = [], UncheckedLosses.check
    monkeypatch.setattr(UncheckedLosses, "check", lambda self, trainer: (read.append(len(self.losses)), real_check(self, trainer))[1])
    poison = ["--trainer.callbacks+=kill_switch.PoisonAt", "--trainer.callbacks.epoch", "0", "--trainer.callbacks.batch", "5"]
    cli = build_cli(tiny_args(tiny_corpus, "--trainer.accumulate_grad_batches", "2", "--trainer.max_epochs", "1", *poison), run=False)
    with pytest.raises(LMInputError, match=r"^The training loss is nan at step 2 \(epoch 0, batch 5\): lower the learning rate"):
        cli.trainer.fit(cli.model, cli.datamodule)
    assert read == [2, 2, 2]  # three optimizer steps of two micro-batches: three reads, not six
    assert torch.isfinite(cli.model.network.decoder.bias).all()  # stopped before the step that would spread the NaN


def test_throughput_waits_for_the_gpu_only_when_it_logs(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    waits, real_update = [], L.pytorch.callbacks.ThroughputMonitor._update
    monkeypatch.setattr(throughput_module, "_on_gpu", lambda trainer: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: waits.append("sync"))
    monkeypatch.setattr(L.pytorch.callbacks.ThroughputMonitor, "_update", lambda self, *a: (waits.append("read"), real_update(self, *a))[1])
    cli = build_cli(["fit", *tiny_args(tiny_corpus, "--trainer.limit_train_batches", "8", "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "4")])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, TokenThroughput))
    assert waits.count("read") == 4 and waits.count("sync") == 4  # 2 readings per epoch, validation's start and end twice
    assert monitor.tokens_per_sec > 0


def test_loaders_pin_their_batches_on_cuda_only(corpus_dir, tmp_path):
    (dm := make_dm(corpus_dir, tmp_path / "cache")).setup("fit")
    assert not dm.train_dataloader().pin_memory  # no trainer: no device to copy to
    dm.trainer = on(CUDA)
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    dm.trainer = on(torch.device("cpu"))
    assert not dm.train_dataloader().pin_memory


# --- 8. benchmarks/gpu_check.sh ---------------------------------------------------------------------------------
def test_gpu_check_parses_and_names_presets_that_exist():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    presets = set(re.findall(r"configs/[\w/]+\.yaml", script.read_text()))
    assert {"configs/presets/debug.yaml", "configs/memory/recompute.yaml"} <= presets
    assert all((ROOT / p).is_file() for p in presets), sorted(p for p in presets if not (ROOT / p).is_file())
