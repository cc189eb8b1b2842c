"""The chunked loss (lm_lightning/chunked_loss.py): the plain path's loss and gradients, without the full logits, with
every strategy that touches the decoder (tied weights, pruning, fake quantization, bf16) and in a real fit."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune
from conftest import val_ppl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.profiler import ProfilerActivity, profile

from lm_lightning.callbacks import ChunkedLoss, allocator, chunked_loss
from lm_lightning.cli import build_cli
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import nll
from lm_lightning.export.fake_quantization import enable_fake_quantization
from lm_lightning.memory.measure import allocated_bytes
from lm_lightning.memory.monitor import MemoryMonitor
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def network_and_batch(vocab: int = 300, tie: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    network = LSTMNetwork(vocab, 32, 32, 2, dropout=0.0, tie_weights=tie)
    ids = torch.randint(0, vocab, (4, 9))
    targets = torch.randint(0, vocab, (4, 9))
    return network, ids, targets


def loss_and_grads(network, ids, targets, chunk_size: int, upstream: float = 0.37):
    """Loss and every parameter's gradient, the loss scaled as the system scales it (divisor, accumulation)."""
    network.zero_grad(set_to_none=True)
    if chunk_size:
        features, _ = network.features(ids)
        total = chunked_loss.chunked_nll(features, network.decoder, targets, chunk_size)
    else:
        logits, _ = network(ids)
        total = nll(logits, targets)
    (total * upstream).backward()
    return total.detach(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 36, 1000])
@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_and_gradients_equal_the_plain_path(chunk_size, tie):
    """36 tokens in the window: chunks of 1, 7 (a ragged last chunk), 16, all at once, and more than there are."""
    network, ids, targets = network_and_batch(tie=tie)
    assert_same(loss_and_grads(network, ids, targets, chunk_size), loss_and_grads(network, ids, targets, 0))


def test_the_fallback_without_torchs_function_equals_the_plain_path(monkeypatch):
    """Where torch has no linear_cross_entropy, each chunk's logits are recomputed in the backward pass instead."""
    network, ids, targets = network_and_batch()
    plain = loss_and_grads(network, ids, targets, 0)
    monkeypatch.delattr(F, "linear_cross_entropy")
    assert not hasattr(chunked_loss.F, "linear_cross_entropy")
    assert_same(loss_and_grads(network, ids, targets, 7), plain)


def test_chunked_loss_sees_the_pruned_decoder_and_trains_only_unpruned_weights():
    """torch.nn.utils.prune sets ``weight = weight_orig * mask`` in a forward pre-hook, which the chunked loss runs
    too: same loss, and the gradient reaches ``weight_orig`` through the mask (zero where pruned)."""
    network, ids, targets = network_and_batch(tie=False)
    torch_prune.l1_unstructured(network.decoder, "weight", amount=0.6)
    chunked = loss_and_grads(network, ids, targets, 7)
    assert_same(chunked, loss_and_grads(network, ids, targets, 0))
    mask = network.decoder.weight_mask
    assert (chunked[1]["decoder.weight_orig"][mask == 0] == 0).all() and (chunked[1]["decoder.weight_orig"] != 0).any()


@pytest.mark.parametrize("bits", [8, 4])
def test_chunked_loss_uses_the_fake_quantized_decoder(bits):
    """QAT swaps the decoder for torchao's FakeQuantizedLinear, which quantizes in its forward: the chunked loss
    multiplies by the same quantized weight (tied to the fake-quantized embedding here)."""
    network, ids, targets = network_and_batch(tie=True)
    float_loss = loss_and_grads(network, ids, targets, 0)[0]
    enable_fake_quantization(network, bits, group_size=16)
    chunked = loss_and_grads(network, ids, targets, 5)
    assert_same(chunked, loss_and_grads(network, ids, targets, 0))
    assert chunked[0] != float_loss  # quantization did change the loss the chunks computed


def test_chunked_loss_under_bf16_autocast_is_computed_in_float32():
    """Under bf16-mixed the plain path's decoder matmul runs in bfloat16; the chunked loss runs in float32 (torch's op
    is not on autocast's lists), so the two agree to bfloat16's precision and the chunked one to float32's exact value."""
    network, ids, targets = network_and_batch()
    features, _ = network.features(ids)
    exact = nll(network.decoder(features), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = nll(network.decoder(features), targets)
        chunked = chunked_loss.chunked_nll(features, network.decoder, targets, 7)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, exact, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked, bf16_logits, rtol=1e-2, atol=0.0)


def held_bytes(fn) -> int:
    """Bytes allocated during ``fn()`` and still held when it returns: what the forward pass keeps for backward."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn()
    held = sum(event.self_cpu_memory_usage for event in prof.events())
    loss.backward()
    return held


def test_chunked_loss_holds_no_logits_between_forward_and_backward():
    """At WikiText-2's vocabulary (33,278) and one 20 x 35 window, the plain loss keeps its log-softmax (tokens x
    vocabulary float32, 93 MB) for backward. The chunked loss keeps the gradients it computed in the forward pass: the
    decoder's weight gradient (parameter-sized; the plain path allocates it in backward) and the input gradient."""
    torch.manual_seed(0)
    tokens, width, vocab = 700, 200, 33_278
    decoder = torch.nn.Linear(width, vocab)
    features = torch.randn(tokens, width, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    plain = held_bytes(lambda: nll(decoder(features), targets))
    chunked = held_bytes(lambda: chunked_loss.chunked_nll(features, decoder, targets, 256))
    logits_bytes, weight_grad_bytes = tokens * vocab * 4, (vocab * width + vocab) * 4
    assert plain >= logits_bytes
    activations = chunked - weight_grad_bytes  # the input gradient: tokens x width floats, and a few scalars
    assert 0 <= activations <= 2 * tokens * width * 4
    assert plain / max(activations, 1) >= 100  # the target is 10x
    assert chunked <= plain / 3


def test_a_fit_with_the_chunked_loss_follows_the_plain_fit(tmp_path, monkeypatch):
    """The preset in a real fit (dropout on, AdamW, clipping, 2 epochs): validation perplexity equal to the plain run's
    up to float summation order, and the setting is the command line's when resuming (not the checkpoint's)."""
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6"]
    common += ["--model.network.embedding_dim", "48", "--model.network.hidden_dim", "48", *FAST]

    plain = build_cli(["fit", *common])
    chunked = build_cli(["fit", *common, "-c", str(ROOT / "configs/memory/chunked_loss.yaml")])
    assert chunked.model.loss_head.chunk_size == 256 and plain.model.loss_head is None
    assert val_ppl(chunked) == pytest.approx(val_ppl(plain), rel=1e-4)

    last = Path(plain.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = build_cli(["fit", *common, "--trainer.max_epochs", "3", "--trainer.callbacks+=ChunkedLoss", "--trainer.callbacks.chunk_size", "64", "--ckpt_path", str(last)])
    assert resumed.model.loss_head.chunk_size == 64 and resumed.trainer.current_epoch == 3


def test_a_network_without_the_output_layer_hook_is_one_sentence_and_trains_plainly():
    """The chunked loss needs the contract's optional features() and decoder; a fork's network without them is refused
    before training, and trains with the plain loss."""
    from gru_model import BareGRUNetwork

    system = LanguageModel(BareGRUNetwork(50))
    with pytest.raises(LMInputError, match=r"^ChunkedLoss needs a network with a features\(\) method and an nn.Linear decoder .* BareGRUNetwork lacks them"):
        ChunkedLoss(64).apply(system)
    ids = torch.randint(0, 50, (2, 5))
    assert torch.isfinite(system._nll(ids, ids, None)[0])


def test_a_bad_chunk_size_is_one_sentence():
    with pytest.raises(LMInputError, match=r"^ChunkedLoss chunk_size must be a positive number of tokens, got -1: give e.g. 256.$"):
        ChunkedLoss(-1)


def test_the_chunked_loss_composes_with_every_other_strategy(tmp_path, monkeypatch):
    """bf16 + accumulation + pruning + QAT (configs/memory/all.yaml) and the chunked loss in one fit: 16 micro-batches
    of 8 streams are 4 optimizer steps, with finite losses and a validation perplexity below the uniform guess."""
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"),
         "-c", str(ROOT / "configs/memory/all.yaml"), "-c", str(ROOT / "configs/memory/chunked_loss.yaml"),
         "--trainer.limit_train_batches", "16", "--model.network.embedding_dim", "64", "--model.network.hidden_dim", "64", *FAST]
    )  # fmt: skip
    assert cli.model.loss_head.chunk_size == 256 and cli.trainer.global_step == 4
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert all(torch.isfinite(torch.tensor(losses))) and 1 < events.Scalars("val/ppl")[-1].value < 2 * cli.datamodule.vocab_size


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="needs glibc's mallinfo2 (Linux)")
def test_the_memory_monitor_sees_what_the_chunked_loss_keeps(tmp_path, monkeypatch):
    """Saved-tensor hooks cannot see the gradients torch's chunked loss computes in the forward pass;
    ``memory/retained_bytes`` (the allocator's count) does. With a 1,500-word vocabulary and 8 x 35 windows the plain
    loss keeps its float32 log-softmax (1.7 MB) for backward; the chunked one the decoder's weight gradient instead."""
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"), *FAST]
    common += ["-c", str(ROOT / "configs/memory/monitor.yaml"), "--model.network.embedding_dim", "64", "--model.network.hidden_dim", "64"]
    common += ["--data.batch_size", "8", "--trainer.callbacks.log_every_n_steps", "1", "--model.sample_length", "0"]

    def measured(*extra: str) -> tuple[dict, int]:
        cli = build_cli(["fit", *common, *extra])
        monitor = next(c for c in cli.trainer.callbacks if isinstance(c, MemoryMonitor))
        return monitor.history[-1], cli.datamodule.vocab_size

    plain, vocab = measured()
    chunked, _ = measured("--trainer.callbacks+=ChunkedLoss", "--trainer.callbacks.chunk_size", "64")
    log_softmax, weight_grad = 8 * 35 * vocab * 4, vocab * 64 * 4
    assert plain["memory/activations_bytes"] >= log_softmax
    assert plain["memory/retained_bytes"] >= 0.95 * plain["memory/activations_bytes"]
    assert chunked["memory/activations_bytes"] <= plain["memory/activations_bytes"] - log_softmax  # hooks: "nothing"
    assert chunked["memory/retained_bytes"] >= chunked["memory/activations_bytes"] + weight_grad  # the allocator: the gradient


def test_the_lean_preset_is_the_chunked_loss_with_its_memory_measured(tmp_path, monkeypatch):
    """configs/memory/lean.yaml on a recipe: the chunked loss (so the plain run's perplexities), glibc's mmap threshold
    fixed at 4 MiB (recorded here, not applied: it would last for the rest of the test session; tests/test_allocator.py
    checks its effect in a process of its own) and the memory monitor, which predicts the peak at fit start and
    measures it."""
    calls = []

    class FakeGlibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(allocator, "_glibc", FakeGlibc)
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6"]
    common += ["--model.network.embedding_dim", "48", "--model.network.hidden_dim", "48", *FAST]
    plain = build_cli(["fit", *common])
    lean = build_cli(["fit", *common, "-c", str(ROOT / "configs/memory/lean.yaml")])
    assert lean.model.loss_head.chunk_size == 256
    assert val_ppl(lean) == pytest.approx(val_ppl(plain), rel=1e-4)
    assert calls == [(allocator.M_MMAP_THRESHOLD, 4 * 2**20), (allocator.M_TRIM_THRESHOLD, 4 * 2**20), ("trim", 0)]
    [monitor] = [c for c in lean.trainer.callbacks if isinstance(c, MemoryMonitor)]
    assert monitor.log_every_n_steps == 50 and monitor.predicted is not None and monitor.history
    assert 0.5 < monitor.predicted.peak / max(h["memory/peak_bytes"] for h in monitor.history) < 2
