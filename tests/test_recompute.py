"""Activation recomputation (LSTMNetwork.recompute_segments, configs/memory/recompute.yaml): the plain gradients,
the same dropout masks in the recomputation, and less memory kept by the forward pass."""

from pathlib import Path

import pytest
import torch
from conftest import val_ppl

from lm_lightning.cli import build_cli
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import nll
from lm_lightning.measure import allocated_bytes
from lm_lightning.networks import LSTMNetwork, lstm
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def loss_and_grads(network, ids, targets, segments: int, seed: int = 0):
    network.recompute_segments = segments
    network.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    logits, (h, c) = network(ids)
    loss = nll(logits, targets)
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
    monkeypatch.setattr(lstm, "checkpoint", lambda function, *args, **kwargs: function(*args))  # keep everything
    kept = loss_and_grads(network, ids, targets, 5)
    assert_same(recomputed, kept, rtol=0, atol=0)
    assert not torch.equal(kept[0], loss_and_grads(network, ids, targets, 5, seed=1)[0])  # the masks matter


def test_evaluation_and_no_grad_run_the_plain_lstm():
    network = LSTMNetwork(60, 24, 24, 2, dropout=0.2)
    network.recompute_segments = 5
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        network.train()
        assert not network(ids)[0].requires_grad
    network.eval()
    assert torch.equal(network(ids)[0], network(ids)[0])


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="needs glibc's mallinfo2 (Linux)")
def test_recomputation_keeps_less_for_backward():
    """20 streams x 35 steps, 2 x 256 LSTM, 50 words (so the LSTM dominates): what the forward pass leaves allocated."""
    torch.manual_seed(0)
    network = LSTMNetwork(50, 256, 256, 2, dropout=0.0).train()
    ids, targets = torch.randint(0, 50, (20, 35)), torch.randint(0, 50, (20, 35))

    def kept(segments: int) -> int:
        network.recompute_segments = segments
        before = allocated_bytes(torch.device("cpu"))
        loss = nll(network(ids)[0], targets)
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
    common += ["--model.embedding_dim", "48", "--model.hidden_dim", "48", "--model.dropout", "0", *FAST]

    plain = build_cli(["fit", *common])
    recomputed = build_cli(["fit", *common, "-c", str(ROOT / "configs/memory/recompute.yaml")])
    assert recomputed.model.network.recompute_segments == 5 and plain.model.network.recompute_segments == 0
    assert val_ppl(recomputed) == pytest.approx(val_ppl(plain), rel=1e-4)


def test_a_negative_segment_count_is_one_sentence():
    """(A network without recompute_segments is refused in tests/test_chunked_loss.py, with the chunked loss's case.)"""
    with pytest.raises(LMInputError, match=r"^--model.recompute_segments must be >= 0, got -2: give .* 5"):
        LanguageModel(vocab_size=50, recompute_segments=-2)
