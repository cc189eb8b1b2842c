"""Activation recomputation (callbacks/recompute.py, configs/memory/recompute.yaml): the plain gradients, the same
dropout masks in the recomputation, and less memory kept by the forward pass, for any network that keeps the contract."""

from pathlib import Path

import pytest
import torch
from conftest import val_ppl

from lm_lightning.callbacks import Recomputation
from lm_lightning.callbacks import recompute as recompute_module
from lm_lightning.cli import build_cli
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import allocated_bytes
from lm_lightning.networks import BagLSTMNetwork, LSTMNetwork
from lm_lightning.systems import BagLanguageModel, LanguageModel

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def system_with(network, segments: int) -> LanguageModel:
    system = LanguageModel(network)
    if segments:
        Recomputation(segments).apply(system)
    return system


def loss_and_grads(network, ids, targets, segments: int, seed: int = 0):
    system = system_with(network, segments)
    network.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss, (h, c) = system._nll(ids, targets, None)
    (loss + h.sum() + c.sum()).backward()  # the carried state's gradient path too
    return loss.detach(), (h.detach(), c.detach()), {n: p.grad.clone() for n, p in network.named_parameters()}


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], **tol, msg=name)


@pytest.mark.parametrize("segments", [1, 3, 5, 35, 100])
def test_recomputed_gradients_equal_the_plain_ones(segments):
    """35 time steps: the whole window, uneven segments, 5 of 7, one per step, and more segments than steps."""
    torch.manual_seed(0)
    network = LSTMNetwork(60, 24, 24, 2, dropout=0.0).train()
    ids, targets = torch.randint(0, 60, (4, 35)), torch.randint(0, 60, (4, 35))
    assert_same(loss_and_grads(network, ids, targets, segments), loss_and_grads(network, ids, targets, 0), rtol=1e-5, atol=1e-6)


def test_the_recomputation_redraws_the_forward_passs_dropout_masks(monkeypatch):
    """With dropout between LSTM layers each segment draws its masks as it runs; checkpoint restores the random state
    for the recomputation, so the gradients are those of the same segmented forward kept in memory."""
    torch.manual_seed(0)
    network = LSTMNetwork(60, 24, 24, 3, dropout=0.4).train()
    ids, targets = torch.randint(0, 60, (4, 35)), torch.randint(0, 60, (4, 35))
    recomputed = loss_and_grads(network, ids, targets, 5)
    monkeypatch.setattr(recompute_module, "checkpoint", lambda function, *args, **kwargs: function(*args))  # keep everything
    kept = loss_and_grads(network, ids, targets, 5)
    assert_same(recomputed, kept, rtol=0, atol=0)
    assert not torch.equal(kept[0], loss_and_grads(network, ids, targets, 5, seed=1)[0])  # the masks matter


def test_evaluation_and_no_grad_run_the_plain_network(monkeypatch):
    system = system_with(LSTMNetwork(60, 24, 24, 2, dropout=0.2), 5)
    ids = torch.randint(0, 60, (2, 10))
    monkeypatch.setattr(recompute_module, "checkpoint", None)  # any checkpoint call would fail
    with torch.no_grad():
        system.train()
        assert not system._nll(ids, ids, None)[0].requires_grad


def test_a_gru_network_recomputes_with_the_plain_gradients():
    """Nothing is asked of the network: a fork's GRU is segmented the same way."""
    from gru_model import GRUNetwork

    torch.manual_seed(0)
    network = GRUNetwork(40, 16, 16, 2).train()
    ids, targets = torch.randint(0, 40, (3, 20)), torch.randint(0, 40, (3, 20))

    def grads(segments):
        network.zero_grad(set_to_none=True)
        loss, h = system_with(network, segments)._nll(ids, targets, None)
        (loss + h.sum()).backward()
        return loss.detach(), {n: p.grad.clone() for n, p in network.named_parameters()}

    plain, recomputed = grads(0), grads(4)
    torch.testing.assert_close(recomputed[0], plain[0], rtol=1e-5, atol=1e-6)
    for name in plain[1]:
        torch.testing.assert_close(recomputed[1][name], plain[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="needs glibc's mallinfo2 (Linux)")
def test_recomputation_keeps_less_for_backward():
    """20 streams x 35 steps, 2 x 256 LSTM, 50 words (so the LSTM dominates): what the forward pass leaves allocated."""
    torch.manual_seed(0)
    network = LSTMNetwork(50, 256, 256, 2, dropout=0.0).train()
    ids, targets = torch.randint(0, 50, (20, 35)), torch.randint(0, 50, (20, 35))

    def kept(segments: int) -> int:
        system = system_with(network, segments)
        before = allocated_bytes(torch.device("cpu"))
        loss = system._nll(ids, targets, None)[0]
        held = allocated_bytes(torch.device("cpu")) - before
        loss.backward()
        return held

    plain, recomputed = kept(0), kept(5)
    boundary = 5 * 20 * 7 * 256 * 4 + 20 * 35 * 256 * 4  # each segment's input, and the LSTM output the decoder keeps (measured: 26.8 MB kept without, 2.1 MB with)
    assert recomputed < plain / 2 and recomputed < 2.5 * boundary, (plain, recomputed, boundary)


def test_a_fit_with_recomputation_follows_the_plain_fit(tmp_path, monkeypatch):
    """The preset in a real fit without dropout: validation perplexity equal to the plain run's to float rounding."""
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6"]
    common += ["--model.network.embedding_dim", "48", "--model.network.hidden_dim", "48", "--model.network.dropout", "0", *FAST]

    plain = build_cli(["fit", *common])
    recomputed = build_cli(["fit", *common, "-c", str(ROOT / "configs/memory/recompute.yaml")])
    assert recomputed.model.window_runner.segments == 5 and plain.model.window_runner is None
    assert val_ppl(recomputed) == pytest.approx(val_ppl(plain), rel=1e-4)


def test_a_bad_segment_count_and_the_bag_path_are_one_sentence(tmp_path):
    with pytest.raises(LMInputError, match=r"^Recomputation segments must be a positive integer, got -2: give e.g. 5.$"):
        Recomputation(-2)
    with pytest.raises(LMInputError, match=r"^Recomputation cuts token windows in time; the bag path"):
        Recomputation(5).apply(BagLanguageModel(BagLSTMNetwork(50)))
