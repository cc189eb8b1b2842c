"""Adaptive input and adaptive softmax (networks/adaptive.py, callbacks/adaptive_*.py): the loss is exactly -log p of
the full distribution, the layers tie, every cluster gets a gradient, the defaults, the refusals."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import val_ppl

from lm_lightning.callbacks import AdaptiveSoftmax, ChunkedLoss
from lm_lightning.callbacks.adaptive import check_frequency_order
from lm_lightning.cli import build_cli
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import nll
from lm_lightning.networks import LSTMNetwork
from lm_lightning.networks.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax, default_cutoffs, install
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = ["-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"), *FAST,
        "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32"]  # fmt: skip
ADAPTIVE = ["-c", str(ROOT / "configs/memory/adaptive.yaml")]


def adaptive_network(vocab: int = 400, cutoffs=(40, 160), tie: bool = True, dim: int = 32, seed: int = 0) -> LSTMNetwork:
    torch.manual_seed(seed)
    network = LSTMNetwork(vocab, dim, dim, 2, dropout=0.0, tie_weights=tie)
    install(network, "decoder", AdaptiveLogSoftmax(vocab, dim, list(cutoffs)))
    install(network, "embedding", AdaptiveEmbedding(vocab, dim, list(cutoffs)))
    return network


def test_the_distribution_is_normalized_and_the_loss_is_exactly_its_negative_log_likelihood():
    """Every row of forward()'s probabilities sums to 1, and nll() (cluster by cluster) equals -log p(target) read from
    the full distribution, in value and in every parameter's gradient."""
    network = adaptive_network()
    torch.manual_seed(1)
    ids, targets = torch.randint(0, 400, (3, 11)), torch.randint(0, 400, (3, 11))
    targets[0, :4] = torch.tensor([0, 39, 40, 399])  # both edges of each cluster
    features, _ = network.features(ids)
    log_probs = network.decoder(features)
    assert log_probs.shape == (3, 11, 400)
    torch.testing.assert_close(log_probs.double().exp().sum(-1), torch.ones(3, 11, dtype=torch.float64), rtol=0, atol=1e-6)

    def grads(loss):
        network.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n: p.grad.clone() for n, p in network.named_parameters()}

    full = -log_probs.gather(-1, targets.unsqueeze(-1)).sum()
    clustered = network.decoder.nll(features, targets)
    torch.testing.assert_close(clustered, full, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(nll(log_probs, targets), full, rtol=1e-6, atol=1e-4)  # the plain path, on log-probs
    a, b = grads(clustered), grads(full)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_every_cluster_takes_part_in_every_step_even_without_targets():
    """Targets all in the head: the tails still get (zero) gradients, so DDP's reducer never waits for a missing one."""
    network = adaptive_network()
    ids, targets = torch.randint(0, 400, (2, 5)), torch.randint(0, 40, (2, 5))
    features, _ = network.features(ids)
    network.decoder.nll(features, targets).backward()
    assert all(p.grad is not None for p in network.parameters())
    assert all(float(t[0].weight.grad.abs().sum()) == 0 for t in network.decoder.tails)


def test_the_tied_layers_share_their_word_matrices_and_hold_a_fraction_of_the_full_ones():
    network = adaptive_network(vocab=4000, cutoffs=(240, 1200), dim=64)
    embedding, softmax = network.embedding, network.decoder
    assert softmax.shortlist.weight is embedding.embeddings[0].weight
    assert all(t[1].weight is e.weight for t, e in zip(softmax.tails, list(embedding.embeddings)[1:]))
    assert [e.weight.shape for e in embedding.embeddings] == [(240, 64), (960, 16), (2800, 4)]
    shared = {id(p) for p in embedding.parameters()} & {id(p) for p in softmax.parameters()}
    assert len(shared) == 3
    distinct = {id(p): p for p in network.parameters()}.values()
    words = sum(p.numel() for p in distinct) - sum(p.numel() for p in network.lstm.parameters())
    # word matrices 240x64 + 960x16 + 2800x4, head bias and cluster rows, projections up and down: 17.5% of 4000x64+4000
    assert words == 240 * 64 + 960 * 16 + 2800 * 4 + 240 + (2 * 64 + 2) + 2 * (16 * 64 + 4 * 64) == 44850


@pytest.mark.parametrize(("vocab", "expected"), [(33278, [2000, 10000]), (10000, [600, 3000]), (2458, [150, 740]), (20, [10])])
def test_default_cutoffs_are_six_and_thirty_percent_of_the_vocabulary(vocab, expected):
    assert default_cutoffs(vocab) == expected


@pytest.mark.parametrize("cutoffs", [[100, 50], [0, 10], [10, 400], [10.5], "2000,10000"])
def test_bad_cutoffs_are_one_sentence(cutoffs):
    with pytest.raises(LMInputError, match=r"^(AdaptiveSoftmax cutoffs|cutoffs) .* does not cut .*\(or leave it out for the default\)\.$"):
        AdaptiveSoftmax(cutoffs=cutoffs).restructure(LanguageModel(LSTMNetwork(400, 16, 16, 1, 0.0, False)))


def test_a_vocabulary_not_sorted_by_frequency_is_refused():
    counts = np.array([5, 9, 50, 40, 30, 2, 1, 1, 0, 0])
    check_frequency_order(counts, [5, 7], "AdaptiveSoftmax")  # sorted: fine
    counts[8] = 45
    with pytest.raises(LMInputError, match=r"^AdaptiveSoftmax needs a vocabulary sorted by frequency, .*word id 8 \(45 training tokens\) is in a rarer cluster than id 6 \(1\)"):
        check_frequency_order(counts, [5, 7], "AdaptiveSoftmax")


def test_a_fit_with_the_preset_trains_validates_and_resumes_exactly(tmp_path, monkeypatch):
    """The preset in a real fit (dropout on, clipping): the loss head is the clustered one, the network tied, validation
    below the uniform guess, and 1 epoch + resume ends with the weights of 2 epochs straight."""
    monkeypatch.chdir(tmp_path)
    common = [*TINY, *ADAPTIVE, "--trainer.limit_train_batches", "6", "--model.sample_length", "8"]
    straight = build_cli(["fit", *common, "--trainer.max_epochs", "2"])
    network = straight.model.network
    assert isinstance(network.decoder, AdaptiveLogSoftmax) and network.decoder.shortlist.weight is network.embedding.embeddings[0].weight
    assert 1 < val_ppl(straight)[-1] < 0.5 * straight.datamodule.vocab_size
    first = build_cli(["fit", *common, "--trainer.max_epochs", "1"])
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    resumed = build_cli(["fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("order", ["chunked first", "adaptive first"])
def test_the_chunked_loss_and_the_adaptive_softmax_refuse_each_other(order):
    system = LanguageModel(LSTMNetwork(400, 16, 16, 1, 0.0, False))
    first, second = (ChunkedLoss(), AdaptiveSoftmax()) if order == "chunked first" else (AdaptiveSoftmax(), ChunkedLoss())
    first.apply(system)
    with pytest.raises(LMInputError, match=r"leave one of the two out\.$"):
        second.apply(system)


def test_refusals_before_training_are_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cases = [
        ([*ADAPTIVE, "-c", str(ROOT / "configs/memory/chunked_loss.yaml")], r"leave one of the two out\."),
        (["-c", str(ROOT / "configs/bag_embedded.yaml"), *ADAPTIVE], r"the bag path reads bags of words"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            from lm_lightning.cli import main

            main(["fit", *TINY, *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and pytest.importorskip("re").search(message, err), err


def test_one_side_alone_unties_the_network_and_says_so(tmp_path, monkeypatch, caplog):
    """Each preset alone on the tied default network: the other side keeps its full matrix, untied (a line says so),
    and the run trains: validation falls from epoch to epoch, below the uniform guess."""
    monkeypatch.chdir(tmp_path)
    for preset, other in (("adaptive_softmax", "embedding"), ("adaptive_input", "decoder")):
        caplog.clear()
        cli = build_cli(["fit", *TINY, "-c", str(ROOT / f"configs/memory/{preset}.yaml"), "--trainer.limit_train_batches", "8", "--trainer.max_epochs", "2"])
        first, second = val_ppl(cli)[-2:]
        assert second < first < cli.datamodule.vocab_size, (preset, first, second)
        network = cli.model.network
        assert list(network.replaced_modules) == ["decoder" if preset == "adaptive_softmax" else "embedding"]
        assert not {id(p) for p in network.embedding.parameters()} & {id(p) for p in network.decoder.parameters()}
        assert getattr(network, other).weight.shape == (cli.datamodule.vocab_size, 32)  # the full matrix, its own
        assert f"the {other} keeps its full matrix, untied" in caplog.text


def test_the_adaptive_layers_compose_with_every_other_strategy(tmp_path, monkeypatch):
    """bf16 + accumulation (4 x 8 streams) + pruning + QAT (configs/memory/all.yaml) + recomputation + the adaptive pair
    in one fit: 4 optimizer steps with finite losses, the clustered loss head under the recomputed features, the
    pruned matrices the adaptive ones, and an int8 sparse export at the end."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", *TINY, *ADAPTIVE, "-c", str(ROOT / "configs/memory/all.yaml"), "-c", str(ROOT / "configs/memory/recompute.yaml"),
         "--trainer.limit_train_batches", "16"]
    )  # fmt: skip
    assert cli.trainer.global_step == 4 and cli.model.window_runner is not None
    assert type(cli.model.loss_head).__name__ == "AdaptiveNLL"
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    assert all(np.isfinite([e.value for e in events.Scalars("train/loss")]))
    assert 1 < events.Scalars("val/ppl")[-1].value < cli.datamodule.vocab_size
    tails = cli.model.network.decoder.tails
    assert float((tails[0][1].weight == 0).float().mean()) > 0.5  # pruning reached the tail's word matrix
    assert (Path(cli.trainer.log_dir) / "export" / "manifest.json").is_file()
