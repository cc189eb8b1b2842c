"""Bag-of-words segments: hand-computed CSR batches, sparse = dense parity, a fit that beats the unigram baseline,
clear errors, and the callbacks that apply (precision, memory monitor, accumulation, pruning, quantization-aware
finishing) with the export step."""

import copy
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch
import torch.nn.utils.prune as prune
from conftest import write_corpus
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.testing import assert_close

from lm_lightning.callbacks.precision import bf16_lstm_supported
from lm_lightning.callbacks.quantization import QuantizationAwareFinishing
from lm_lightning.cli import build_cli, main
from lm_lightning.data import segments
from lm_lightning.data.bag import BagDataModule, BagRows, batch_bytes
from lm_lightning.data.batch import Bags
from lm_lightning.data.segments import build_vocabulary, count_matrix
from lm_lightning.data.windows import StreamWindows
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import bag_nll, perplexity
from lm_lightning.export.commands import ExportedModel
from lm_lightning.export.fake_quantization import FakeQuantizedEmbeddingBag, disable_fake_quantization, enable_fake_quantization
from lm_lightning.export.loader import load_exported
from lm_lightning.export.quantization import dequantize_weight, fake_quantize, quantize_weight
from lm_lightning.networks.bag import BagLSTMNetwork
from lm_lightning.networks.lstm import StackedLSTM
from lm_lightning.systems.bag import BagLanguageModel

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# The recipe, not --model/--data class paths: a class switched on the command line keeps the token classes' values
# for arguments of the same name (remove_stopwords: false, tie_weights: true, ...).
BOW = ["-c", str(ROOT / "configs" / "bag_embedded.yaml")]
QAT = ["--trainer.callbacks+=lm_lightning.callbacks.quantization.QuantizationAwareFinishing"]
# Stop words (NLTK's list from ../shared, or scikit-learn's) and punctuation go, Porter stems stay:
# "cats" -> cat, "dogs" -> dog. The blank line separates; "..." and "The and the." come out empty.
HAND_TRAIN = "The cats sat on the mat with the cat.\nA dog sat.\n\n...\nThe dogs and the cats.\nThe and the.\nSat, sat, sat!\nOn the mat.\n"
HAND_VALID = "The bird sat.\nCats!\n"  # "bird" is not in train: <unk>


def hand_datamodule(tmp_path: Path, **kwargs) -> BagDataModule:
    corpus = write_corpus(tmp_path / "hand", HAND_TRAIN, HAND_VALID, HAND_VALID)
    settings = {"min_df": 1, "batch_size": 2, "eval_batch_size": 1, "bptt": 1, "segment": "line", "cache_dir": str(tmp_path / "cache"), **kwargs}
    return BagDataModule(str(corpus), **settings)


def test_a_csr_batch_equals_the_hand_computed_one(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lm_lightning.data.bag"):
        dm = hand_datamodule(tmp_path)
        # Train counts: sat 1+1+3 = 5, cat 2+1 = 3, dog 2, mat 2; ordered by count, then alphabetically.
        assert dm.vocab.itos == ["<unk>", "sat", "cat", "dog", "mat"]
    assert "Dropped from train: 2 of its line segments were empty after preprocessing (1 held only stop words)" in caplog.text
    # Segments s0..s4 = {cat:2 sat mat}, {dog sat}, {dog cat}, {sat:3}, {mat}: 2 streams [s0 s1] [s2 s3], s4 cut off.
    dm.setup("fit")
    batch = next(iter(dm.datasets["train"]))
    inputs, targets = batch.inputs, batch.targets
    assert (batch.first_stream, batch.num_streams, batch.length, batch.num_items) == (0, 2, 1, 2)
    assert batch.divisor == 3 + 2  # the words of the target segments s1 and s3
    assert_close(inputs.indices, torch.tensor([1, 2, 4, 2, 3], dtype=torch.int32), rtol=0, atol=0)  # s0, s2
    assert_close(inputs.offsets, torch.tensor([0, 3, 5], dtype=torch.int32), rtol=0, atol=0)
    assert_close(inputs.counts, torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0]), rtol=0, atol=0)
    assert_close(targets.indices, torch.tensor([1, 3, 1], dtype=torch.int32), rtol=0, atol=0)  # s1, s3
    assert_close(targets.offsets, torch.tensor([0, 2, 3], dtype=torch.int32), rtol=0, atol=0)
    assert_close(targets.counts, torch.tensor([1.0, 1.0, 3.0]), rtol=0, atol=0)
    assert inputs.streams == 2 and inputs.num_segments == 2
    assert_close(inputs.to_dense(5), torch.tensor([[[0.0, 1, 2, 0, 1]], [[0.0, 0, 1, 1, 0]]]), rtol=0, atol=0)
    # Never a dense batch x vocabulary matrix: only 1-D ids, offsets and counts reach the model.
    assert all(t.dim() == 1 and t.numel() < 5 * inputs.num_segments for t in (*inputs[:3], *targets[:3]))
    assert dm.counts("valid").toarray().tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]]  # bird -> <unk>
    # Add-one unigram over train (1, 6, 4, 3, 3)/17 on valid's only next segment {cat}: perplexity 17/4.
    assert dm.unigram_perplexity("valid") == pytest.approx(17 / 4, rel=1e-12)


def test_a_literal_unk_in_the_text_is_the_unk_column():
    vocab = build_vocabulary([["<unk>", "cat"], ["cat", "<unk>", "<unk>"]], min_df=1, max_vocab_size=None)  # PTB has "<unk>"
    assert vocab.itos == ["<unk>", "cat"]
    assert count_matrix([["<unk>", "dog", "cat"]], vocab).toarray().tolist() == [[2, 1]]


def test_cache_hit_gives_the_same_counts(tmp_path, caplog):
    first = hand_datamodule(tmp_path)
    with caplog.at_level(logging.INFO, logger="lm_lightning.data.bag"):
        second = hand_datamodule(tmp_path)
        assert second.vocab == first.vocab
    assert "cache hit" in caplog.text
    for split in ("train", "valid", "test"):
        assert (second.counts(split) != first.counts(split)).nnz == 0


def test_batch_bytes_of_sparse_and_dense_batches(tmp_path):
    dm = hand_datamodule(tmp_path)
    # 5 train segments with 9 nonzeros: 1.8 per segment. A batch of 2 x 1 segments: 2 * 1.8 * (4 + 4) bytes of
    # ids and counts + 3 int32 offsets = 40.8 bytes, against 2 x 5 float32 = 40 bytes dense (a 5-word vocabulary!).
    b = batch_bytes(dm.counts("train"), 2, 1)
    assert (b["sparse_bytes"], b["dense_bytes"]) == (pytest.approx(40.8), 40)
    # At 10,000 words, 32 x 35 segments of 4 distinct words each: 39.4 KiB instead of 44.8 MB.
    big = batch_bytes(scipy.sparse.random(100, 10_000, density=4e-4, format="csr", random_state=0), 32, 35)
    assert (big["sparse_bytes"], big["dense_bytes"]) == (32 * 35 * 4 * 8 + (32 * 35 + 1) * 4, 32 * 35 * 10_000 * 4)


def random_bags(streams: int, time: int, vocab: int, seed: int) -> Bags:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randint(0, 3, (streams * time, vocab), generator=g) * (torch.rand(streams * time, vocab, generator=g) < 0.2)
    dense[1] = 0  # an empty segment
    rows, cols = dense.nonzero(as_tuple=True)
    offsets = torch.zeros(streams * time + 1, dtype=torch.int32)
    offsets[1:] = torch.bincount(rows, minlength=streams * time).cumsum(0)
    return Bags(cols.int(), offsets, dense[rows, cols].float(), streams)


@pytest.mark.parametrize("bag_weighting, tie_weights", [("sum", False), ("mean", False), ("sum", True)])
def test_sparse_and_dense_inputs_give_the_same_loss_and_gradients(bag_weighting, tie_weights):
    """Float32 with a different summation order (EmbeddingBag vs a matmul): held to 1e-5 relative, 1e-6 absolute."""
    torch.manual_seed(0)
    net = BagLSTMNetwork(23, embedding_dim=16, hidden_dim=16 if tie_weights else 12, num_layers=2, dropout=0.0, tie_weights=tie_weights, bag_weighting=bag_weighting)
    inputs, targets = random_bags(3, 4, 23, seed=1), random_bags(3, 4, 23, seed=2)
    grads = []
    for x, y in ((inputs, targets), (inputs.to_dense(23), targets.to_dense(23))):
        net.zero_grad()
        logits, _ = net(x)
        loss = bag_nll(logits, y) / targets.words()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    (sparse_loss, sparse_grads), (dense_loss, dense_grads) = grads
    assert_close(sparse_loss, dense_loss, rtol=1e-5, atol=1e-6)
    for name in sparse_grads:
        assert_close(sparse_grads[name], dense_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sparse_grads["embedding.weight"].abs().sum() > 0


def test_count_weighted_nll_equals_a_hand_computation():
    logits = torch.tensor([[[0.0, math.log(2), math.log(3)]]])  # p = 1/6, 2/6, 3/6
    targets = Bags(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2.0, 1.0]), 1)
    assert bag_nll(logits, targets).item() == pytest.approx(-(2 * math.log(1 / 6) + math.log(3 / 6)), rel=1e-6)


@pytest.fixture(scope="module")
def bag_fit(tmp_path_factory):
    """The tiny corpus, 3 lines in a fixed order, so a segment tells the next one: a short fit, shared by tests."""
    workdir = tmp_path_factory.mktemp("bag_fit")
    lines = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."]
    corpus = write_corpus(workdir / "tiny", *(["\n".join(lines * 30) + "\n"] * 3))
    cwd = Path.cwd()
    try:
        os.chdir(workdir)
        args = ["fit", *BOW, *QUIET, "--data.source", str(corpus), "--data.segment", "line", "--data.batch_size", "4", "--data.eval_batch_size", "2",
                "--data.bptt", "6", "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.dropout", "0", "--trainer.max_epochs", "8",
                "--model.optimizer.lr", "0.03", "--trainer.log_every_n_steps", "5"]  # fmt: skip
        cli = build_cli(args)
    finally:
        os.chdir(cwd)
    return workdir / "lightning_logs" / "version_0", cli


def test_a_short_fit_beats_the_unigram_baseline(bag_fit):
    _, cli = bag_fit
    metrics = cli.trainer.callback_metrics
    unigram = float(metrics["val/unigram_ppl"])
    assert unigram == pytest.approx(cli.datamodule.unigram_perplexity("valid"), rel=1e-5)  # the same target words
    # Unigram over {cat sat mat dog log}: 4.77; knowing the next line's words gives (3^3 * 3^3 * 2^2)^(1/8) = 2.71.
    assert unigram == pytest.approx(4.77, abs=0.01)
    assert float(metrics["val/ppl"]) < 3.0  # 2.80 measured


def test_tensorboard_has_ppl_beside_the_unigram_baseline_and_next_words(bag_fit):
    run, _ = bag_fit
    events = EventAccumulator(str(run))
    events.Reload()
    assert len(events.Scalars("val/ppl")) == len(events.Scalars("val/unigram_ppl")) == 8  # one per epoch
    assert {"train/loss", "train/ppl", "train/tokens_per_sec", "hp/best_val_ppl"} <= set(events.Tags()["scalars"])
    assert "samples/next_words/text_summary" in events.Tags()["tensors"]


def test_validate_from_the_saved_config_and_checkpoint_matches_fit(bag_fit, tmp_path, monkeypatch):
    run, fit_cli = bag_fit
    monkeypatch.chdir(tmp_path)
    best = run / "checkpoints" / Path(fit_cli.trainer.checkpoint_callback.best_model_path).name
    validate = build_cli(["validate", "-c", str(run / "config.yaml"), *QUIET, "--ckpt_path", str(best)])
    assert float(validate.trainer.callback_metrics["val/ppl"]) == pytest.approx(float(fit_cli.trainer.checkpoint_callback.best_model_score), rel=1e-5)
    assert BagLanguageModel.load_from_checkpoint(best).network.bag_weighting == "sum"  # re-created from its own arguments


def test_predict_lists_the_likeliest_next_words(bag_fit, tmp_path, monkeypatch, capsys):
    run, _ = bag_fit
    monkeypatch.chdir(tmp_path)
    build_cli(["predict", "-c", str(run / "config.yaml"), *QUIET, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.prompt", "A cat and a dog."])
    listed = capsys.readouterr().out.split("likeliest words of the next segment: ")[1].splitlines()[0].split(", ")
    assert {item.split()[0] for item in listed[:3]} == {"cat", "sat", "mat"}  # after "cat dog" comes "cat sat mat"


def test_errors_name_the_input_and_the_fix(tmp_path, monkeypatch):
    stop = write_corpus(tmp_path / "stop", "The and the.\nOf a the.\n" * 20, "A cat.\n" * 20, "A cat.\n" * 20)
    with pytest.raises(LMInputError, match=r"train split of 'stop' has no words after preprocessing: 40 of its line segments .*\(40 held only stop words\); set --data.remove_stopwords false"):
        _ = BagDataModule(str(stop), segment="line", cache_dir=str(tmp_path / "c")).vocab
    empty = write_corpus(tmp_path / "empty", "A cat sat.\n" * 40, "...\n--\n" * 20, "A cat.\n" * 40)
    with pytest.raises(LMInputError, match=r"valid split of 'empty' has no words after preprocessing: 40 of its line segments .*\(0 held only stop words\); check the text"):
        _ = BagDataModule(str(empty), segment="line", cache_dir=str(tmp_path / "c")).vocab
    with pytest.raises(LMInputError, match=r"The vocabulary is empty: no word occurs in 1000 or more of the 5 train segments \(--data.min_df\): lower --data.min_df"):
        _ = hand_datamodule(tmp_path, min_df=1000).vocab
    with pytest.raises(LMInputError, match=r"valid split has 2 non-empty segments, fewer than one window needs .* = 3 x 1 x 2 = 6\): lower --data.eval_batch_size or"):
        _ = hand_datamodule(tmp_path, eval_batch_size=3).vocab
    monkeypatch.setattr(segments, "punkt_available", lambda: False)
    with pytest.raises(LMInputError, match=r"--data.segment sentence needs NLTK's Punkt .* or use --data.segment line or window"):
        hand_datamodule(tmp_path, segment="sentence")
    assert hand_datamodule(tmp_path, segment="auto").segment == "line"


def test_bad_input_on_the_command_line_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "hand", HAND_TRAIN, HAND_VALID, HAND_VALID)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *BOW, *QUIET, "--data.source", str(corpus), "--data.min_df", "1000"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: The vocabulary is empty")
    assert not (tmp_path / "lightning_logs").exists()


def short_fit(tmp_path: Path, corpus: Path, *extra: str):
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        args = ["fit", *BOW, *QUIET, "--data.source", str(corpus), "--data.segment", "line", "--data.batch_size", "4", "--data.eval_batch_size", "2",
                "--data.bptt", "6", "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.dropout", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.log_every_n_steps", "1", *extra]  # fmt: skip
        return build_cli(args)
    finally:
        os.chdir(cwd)


def test_bf16_mixed_and_the_memory_monitor_run_with_bags(tiny_corpus, tmp_path, capsys):
    cli = short_fit(tmp_path, tiny_corpus, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed",
                    "--trainer.callbacks+=lm_lightning.callbacks.precision.PrecisionGuard",
                    "--trainer.callbacks+=lm_lightning.memory.monitor.MemoryMonitor", "--trainer.callbacks.log_every_n_steps", "1")  # fmt: skip
    guard, monitor = (next(c for c in cli.trainer.callbacks if type(c).__name__ == name) for name in ("PrecisionGuard", "MemoryMonitor"))
    # bfloat16 where oneDNN has a bfloat16 LSTM kernel; float32 where the guard had to turn oneDNN off (test_precision.py).
    assert guard.report["modules"]["network.lstm"]["output"] == ("bfloat16" if bf16_lstm_supported() else "float32")
    assert guard.report["modules"]["network.decoder"]["output"] == "bfloat16" and guard.report["loss"] == "float32"
    assert guard.report["modules"]["network.embedding"]["output"] == "float32"  # embedding_bag is not an autocast op
    assert len(monitor.history) == 4 and all(h["memory/activations_bytes"] > 0 for h in monitor.history)
    assert math.isfinite(float(cli.trainer.callback_metrics["val/ppl"]))
    assert "Memory: 4 measured batch(es), precision bf16-mixed" in capsys.readouterr().out


def test_micro_batch_accumulation_takes_the_same_steps_as_whole_windows(tmp_path):
    """Float64 and SGD as in test_accumulation.py. The streams' micro-batches hold different numbers of words (lines of
    3, 3, 2 and 6 words, a stream every 25 lines), which checks the divisor that makes their mean loss the window's."""
    lines = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog .", "cats and dogs sat on logs and mats all day ."]
    corpus = write_corpus(tmp_path / "uneven", *(["\n".join(lines * 25) + "\n"] * 3))
    exact = ["--trainer.max_epochs", "1", "--trainer.precision", "64-true", "--model.optimizer", "SGD", "--model.optimizer.lr", "1",
             "--trainer.limit_val_batches", "1"]  # fmt: skip
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    whole = short_fit(tmp_path / "a", corpus, *exact)
    micro = short_fit(tmp_path / "b", corpus, *exact, "--trainer.callbacks+=lm_lightning.callbacks.accumulation.MicroBatchAccumulation",
                      "--trainer.callbacks.micro_batch_size", "1")  # fmt: skip
    assert micro.trainer.global_step == whole.trainer.global_step == 4
    for (name, a), b in zip(whole.model.network.state_dict().items(), micro.model.network.state_dict().values()):
        assert_close(b, a, rtol=0, atol=1e-12, msg=name)


def quantized_copy(network: nn.Module, bits: int, group_size: int) -> nn.Module:
    """A plain copy of ``network`` whose weight matrices are ``dequantize(quantize(w))``: what QAT should compute with."""
    plain = copy.deepcopy(network)
    with torch.no_grad():
        for param in plain.parameters():  # a tied matrix is one Parameter: quantized once
            if param.dim() == 2:
                param.copy_(dequantize_weight(*quantize_weight(param, bits, group_size)))
    return plain.eval()


@pytest.mark.parametrize("mode, padding_idx, include_last_offset", [("sum", None, True), ("mean", 0, False), ("max", 3, True)])
def test_the_fake_quantized_embedding_bag_keeps_every_setting_and_quantizes_the_pruned_weight(mode, padding_idx, include_last_offset):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(23, 16, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)
    segments = random_bags(3, 4, 23, seed=1)
    args = (segments.indices, segments.offsets if include_last_offset else segments.offsets[:-1])
    counts = segments.counts if mode == "sum" else None  # per_sample_weights: mode "sum" only
    with torch.no_grad():
        reference = bag(*args, per_sample_weights=counts)
        expected = quantized_copy(bag, 4, 8)(*args, per_sample_weights=counts)
        enable_fake_quantization(bag, bits=4, group_size=8)
        assert type(bag) is FakeQuantizedEmbeddingBag
        quantized = bag(*args, per_sample_weights=counts)
    assert (quantized - reference).abs().max() > 1e-3  # not silently ignored
    assert_close(quantized, expected, rtol=0, atol=0)  # and exactly the quantized weight

    # Pruning's forward pre-hook replaces the weight attribute at every call; quantization applies after it.
    prune.l1_unstructured(bag, "weight", amount=0.5)
    with torch.no_grad():
        bag.weight_orig.mul_(1.5)  # an optimizer step after the hook last ran
        pruned = bag(*args, per_sample_weights=counts)
        plain = nn.EmbeddingBag(23, 16, mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)
        plain.weight.copy_(fake_quantize(bag.weight_orig * bag.weight_mask, 4, 8))
        assert_close(pruned, plain(*args, per_sample_weights=counts), rtol=0, atol=0)
    disable_fake_quantization(bag)
    assert type(bag) is nn.EmbeddingBag and not hasattr(bag, "weight_fake_quantizer")


def test_switching_the_bag_network_keeps_parameters_state_dict_tying_and_passes_gradients():
    torch.manual_seed(0)
    net = BagLSTMNetwork(23, embedding_dim=16, hidden_dim=16, num_layers=1, dropout=0.0, tie_weights=True)
    segments = random_bags(3, 4, 23, seed=1)
    params, keys = dict(net.named_parameters()), list(net.state_dict())
    expected, _ = quantized_copy(net, 8, 32)(segments)
    enable_fake_quantization(net, bits=8)
    assert [type(m).__name__ for m in (net.embedding, net.lstm, net.decoder)] == [
        "FakeQuantizedEmbeddingBag", "FakeQuantizedStackedLSTM", "FakeQuantizedLinear"
    ]  # fmt: skip
    assert dict(net.named_parameters()) == params  # the same objects: the optimizer keeps training them
    assert list(net.state_dict()) == keys  # checkpoints load into a plain network
    assert net.decoder.weight is net.embedding.weight
    copy.deepcopy(net)  # EMA/SWA-style copies still work
    logits, _ = net(segments)
    assert_close(logits, expected, rtol=0, atol=0)
    logits.logsumexp(-1).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name  # straight-through: gradients reach every weight
    disable_fake_quantization(net)
    assert [type(m) for m in (net.embedding, net.lstm, net.decoder)] == [nn.EmbeddingBag, StackedLSTM, nn.Linear]
    BagLSTMNetwork(23, embedding_dim=16, hidden_dim=16, num_layers=1, dropout=0.0, tie_weights=True).load_state_dict(net.state_dict())


@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 8)])  # int4 groups of 8 divide the width 16
def test_qat_on_bags_trains_the_last_epoch_and_the_export_reproduces_it(tiny_corpus, tmp_path, bits, group_size):
    cli = short_fit(tmp_path, tiny_corpus, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
                    *QAT, "--trainer.callbacks.bits", str(bits), "--trainer.callbacks.group_size", str(group_size),
                    "--trainer.callbacks.last_epochs", "1")  # fmt: skip
    qat = next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareFinishing))
    assert qat.started_at == 3
    events = EventAccumulator(str(tmp_path / cli.trainer.log_dir))  # short_fit ran in tmp_path
    events.Reload()
    assert [e.value for e in events.Scalars("qat/active")] == [0.0] * 3 + [1.0] * 3
    report = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Export").report
    assert report["bits"] == bits and report["tensors"]["embedding.weight"]["format"] == f"int{bits}"  # QAT's bits

    # The fake-quantized network computes with exactly dequantize(quantize(w)), and the loaded export with the same.
    network = cli.model.network
    assert type(network.embedding) is nn.EmbeddingBag  # back to plain modules after fit
    inputs = next(iter(cli.datamodule.test_dataloader())).inputs
    with torch.no_grad():
        plain, _ = network.eval()(inputs)
        expected, _ = quantized_copy(network, bits, group_size)(inputs)
        enable_fake_quantization(network, bits, group_size)
        fake, _ = network(inputs)
        exported, _ = load_exported(report["folder"])(inputs)
    assert not torch.equal(fake, plain)  # quantization is visible
    assert_close(fake, expected, rtol=0, atol=0)
    assert_close(exported, fake, rtol=0, atol=1e-6)
    # The export's test perplexity is the fit's own test loop on the fake-quantized network.
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert report["test_ppl"] == pytest.approx(float(cli.trainer.callback_metrics["test/ppl"]), rel=1e-4)
    # The export alone names the likeliest next words, as the fake-quantized system does from its datamodule.
    alone = ExportedModel.load(report["folder"])
    assert type(alone.network.embedding) is nn.EmbeddingBag  # the network's own module, float32 weights
    prompt = cli.datamodule.hparams.prompt
    words = alone.next_words(prompt, 5)
    expected_words = cli.model.next_words(cli.datamodule.prompt_bags(), 5)
    assert ", ".join(f"{w} {p:.3f}" for w, p in words) == expected_words
    with pytest.raises(LMInputError, match="bag-of-words model: generate needs a token model"):
        alone.generate("the cat")


def test_pruning_qat_and_the_export_step_apply_to_bags_together(tiny_corpus, tmp_path):
    cli = short_fit(tmp_path, tiny_corpus, "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.callbacks+=lm_lightning.callbacks.pruning.MagnitudePruning", "--trainer.callbacks.sparsity", "0.5",
                    *QAT, "--trainer.callbacks.last_epochs", "1")  # fmt: skip
    network = cli.model.network
    for weight in (network.embedding.weight, network.lstm.weight_ih_l0, network.lstm.weight_hh_l0, network.decoder.weight):
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert next(c for c in cli.trainer.callbacks if isinstance(c, QuantizationAwareFinishing)).started_at == cli.trainer.global_step // 2
    # One export, sparse and int8: symmetric quantization keeps the pruned zeros, stored as a bit mask or indices.
    export = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Export")
    manifest = json.loads((Path(export.report["folder"]) / "manifest.json").read_text())
    assert {"pruning", "qat"} <= set(manifest["metadata"]["strategies"]) and manifest["bits"] == 8
    # (The 6 x 16 embedding and decoder stay dense: at that size a mask's header entry costs more than it saves.)
    assert export.report["tensors"]["lstm.weight_hh_l0"]["format"] == "int8+bitmask"
    for name, trained in network.state_dict().items():
        if trained.dim() == 2:
            assert manifest["tensors"][name]["nnz"] == int(quantize_weight(trained, 8)[0].count_nonzero()) <= trained.numel() // 2, name
    # A checkpoint saved during QAT loads into a plain BagLanguageModel; fake-quantized again, it computes what the
    # loaded export computes and scores what the export step reported (summation order aside: 1e-5 relative).
    restored = BagLanguageModel.load_from_checkpoint(tmp_path / cli.trainer.log_dir / "checkpoints" / "last.ckpt")
    assert list(restored.state_dict()) == list(BagLanguageModel(**restored.hparams).state_dict())
    assert type(restored.network.embedding) is nn.EmbeddingBag
    enable_fake_quantization(restored.network, 8)
    inputs = next(iter(cli.datamodule.test_dataloader())).inputs
    with torch.no_grad():
        assert_close(load_exported(export.report["folder"])(inputs)[0], restored.network.eval()(inputs)[0], rtol=0, atol=1e-6)
    assert export.report["test_ppl"] == pytest.approx(perplexity(restored.network, cli.datamodule.test_dataloader()), rel=1e-5)


def test_stream_windows_of_bags_carry_every_segment_once(tmp_path):
    counts = hand_datamodule(tmp_path).counts("train")
    windows = StreamWindows(BagRows(counts), batch_size=1, bptt=2)
    batches = list(windows)
    targets = [b.targets.to_dense(5)[0] for b in batches]
    assert len(windows) == 2 and [t.shape[0] for t in targets] == [2, 2] == [b.length for b in batches]
    assert_close(torch.cat(targets).numpy(), counts.toarray()[1:].astype(np.float32), rtol=0, atol=0)  # s1..s4 in order
    assert windows.num_targets == int(counts[1:].sum()) == sum(b.divisor for b in batches)
