"""The network and the system: hidden-state carry, learning, generation, construction errors."""

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lm_lightning.data import Batch, TokenDataModule
from lm_lightning.errors import LMInputError
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel


def test_carrying_hidden_state_across_windows_equals_one_long_pass():
    """Truncated BPTT must not change the forward computation: only where gradients stop."""
    torch.manual_seed(0)
    net = LSTMNetwork(vocab_size=50, embedding_dim=16, hidden_dim=16, num_layers=2, dropout=0.0).eval()
    ids = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        full, _ = net(ids)
        pieces, hidden = [], None
        for start in range(0, 40, 7):  # 7 does not divide 40: the last window is shorter
            logits, hidden = net(ids[:, start : start + 7], hidden)
            pieces.append(logits)
    assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-6)


def test_system_carries_and_detaches_hidden_state_between_windows():
    torch.manual_seed(0)
    model = LanguageModel(LSTMNetwork(30, embedding_dim=8, hidden_dim=8, num_layers=1, dropout=0.0)).eval()
    ids = torch.randint(0, 30, (2, 21))
    windows = [Batch(ids[:, s : s + 5], ids[:, s + 1 : s + 6], first_stream=0, num_streams=2, length=5, divisor=2 * 5) for s in range(0, 20, 5)]
    with torch.no_grad():
        losses = [model._loss(w, "val") * w.targets.numel() for w in windows]
        logits, _ = model(ids[:, :-1])
        whole = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), ids[:, 1:].reshape(-1), reduction="sum")
    assert_close(sum(losses), whole, rtol=1e-6, atol=1e-5)
    model.train()
    model._loss(windows[0], "train")
    h, c = model._hidden["train/0"]  # the state of the stream group starting at stream 0 (here: the whole window)
    assert h.grad_fn is None and c.grad_fn is None and not h.requires_grad  # graph cut between windows
    model.on_train_epoch_start()
    assert not [key for key in model._hidden if key.startswith("train/")]  # each epoch starts from a zero state


def test_tied_weights_share_one_matrix_and_save_parameters():
    tied = LSTMNetwork(vocab_size=1000, embedding_dim=32, hidden_dim=32, tie_weights=True)
    untied = LSTMNetwork(vocab_size=1000, embedding_dim=32, hidden_dim=32, tie_weights=False)
    assert tied.decoder.weight.data_ptr() == tied.embedding.weight.data_ptr()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(untied) - count(tied) == 1000 * 32


def test_forget_gate_bias_starts_at_one():
    net = LSTMNetwork(vocab_size=10, embedding_dim=4, hidden_dim=4, num_layers=2)
    for layer in range(2):
        bias = getattr(net.lstm, f"bias_ih_l{layer}")
        assert torch.all(bias[4:8] == 1.0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"embedding_dim": 16, "hidden_dim": 32, "tie_weights": True}, "tie_weights"),
        ({"dropout": 1.5}, "dropout"),
        ({"vocab_size": 1}, "vocab_size"),
    ],
)
def test_bad_model_arguments_fail_at_construction(kwargs, words):
    args = {"vocab_size": 20, **kwargs}
    with pytest.raises(LMInputError, match=words):
        LSTMNetwork(**args)


def test_bad_generation_arguments_fail_at_construction():
    with pytest.raises(LMInputError, match="temperature"):
        LanguageModel(LSTMNetwork(10), temperature=-1)
    with pytest.raises(LMInputError, match="top_k"):
        LanguageModel(LSTMNetwork(10), top_k=0)


def test_model_overfits_a_tiny_text(tiny_corpus, tmp_path):
    """A model that cannot memorise 20 distinct tokens has a bug in its data path or loss."""
    L.seed_everything(0)
    dm = TokenDataModule(source=str(tiny_corpus), batch_size=4, eval_batch_size=4, bptt=10, min_freq=1, cache_dir=str(tmp_path / "cache"))
    model = LanguageModel(LSTMNetwork(dm.vocab_size, embedding_dim=32, hidden_dim=32, num_layers=1, dropout=0.0), sample_length=0, optimizer=lambda p: torch.optim.Adam(p, lr=2e-2))
    trainer = L.Trainer(
        max_epochs=12,
        check_val_every_n_epoch=100,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm)
    ppl = trainer.validate(model, dm, verbose=False)[0]["val/ppl"]
    # The text is a fixed cycle of 3 lines; the only uncertainty left is which line follows "the"/"a".
    assert ppl < 1.6, ppl
    assert ppl < dm.unigram_perplexity("valid") / 5


def test_generation_is_reproducible_and_respects_top_k():
    torch.manual_seed(0)
    model = LanguageModel(LSTMNetwork(40, embedding_dim=8, hidden_dim=8, num_layers=1))
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 20, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (1, 23) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)
    model.train()
    greedy = model.generate(prompt, 10, temperature=0)
    assert model.training  # generate() switches to eval for sampling and restores the mode afterwards
    with torch.no_grad():
        logits, _ = model.eval()(prompt)
    assert greedy[0, 3] == logits[0, -1].argmax()  # greedy = argmax given the prompt's carried state
    with torch.no_grad():
        top5 = set()
        for seed in range(30):
            out = model.generate(prompt, 1, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(seed))
            top5.add(int(out[0, -1]))
        allowed = set(torch.topk(logits[0, -1], 5).indices.tolist())
    assert top5 <= allowed and len(top5) > 1  # sampled, but never outside the top 5
