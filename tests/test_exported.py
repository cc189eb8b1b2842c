"""An export folder on its own: integer weights resident (export/inference.py), generate / score / next words
(export/commands.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from torch import nn
from torch.nn.utils import prune
from torch.testing import assert_close

from lm_lightning.cli import build_cli, main
from lm_lightning.errors import LMInputError
from lm_lightning.export import integer_matrix
from lm_lightning.export.commands import ExportedModel
from lm_lightning.export.inference import IntegerEmbedding, IntegerLinear, IntegerLSTM, resident_bytes
from lm_lightning.export.integer_matrix import IntegerMatrix
from lm_lightning.export.loader import load_exported
from lm_lightning.export.quantization import dequantize_weight, quantize_weight
from lm_lightning.export.writer import export_model, plain_copy
from lm_lightning.networks import LSTMNetwork


def lstm(vocab=300, width=64, tie=True, seed=0) -> LSTMNetwork:
    torch.manual_seed(seed)
    network = LSTMNetwork(vocab, width, width, 2, 0.0, tie)
    with torch.no_grad():  # trained-looking weights: not all inside the init's small range
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return network.eval()


def float_tensors(network: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(n, t.shape) for n, t in [*network.named_parameters(), *network.named_buffers()] if t.is_floating_point()]


# --- integer modules ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size, width", [(8, 32, 64), (4, 32, 64), (4, 64, 64), (4, 8, 40), (4, 3, 9), (8, 32, 9)])
def test_integer_matrix_rows_and_products_equal_the_dequantized_weight(bits, group_size, width, monkeypatch):
    torch.manual_seed(1)
    weight = torch.randn(37, width)
    codes, scale = quantize_weight(weight, bits, group_size)
    matrix = IntegerMatrix(codes, scale, bits)
    dequantized = dequantize_weight(codes, scale)
    assert torch.equal(matrix.dequantize(), dequantized)
    index = torch.tensor([[3, 0], [36, 3]])
    assert torch.equal(matrix.rows(index), dequantized[index])
    one = torch.randn(1, width)  # generation: one input row
    assert_close(matrix.linear(one), one @ dequantized.T, rtol=1e-5, atol=1e-5)
    # The whole matrix in one block (the LSTM's recurrent matrix, once a window); None when it does not fit.
    assert torch.equal(matrix.dequantized_block(), dequantized)
    x, bias = torch.randn(5, 2, width), torch.randn(37)
    assert_close(matrix.linear(x, bias), x @ dequantized.T + bias, rtol=1e-5, atol=1e-5)
    matrix.block_elements = 4 * width  # several blocks of rows, the last one short: the same result
    assert_close(matrix.linear(x, bias), x @ dequantized.T + bias, rtol=1e-5, atol=1e-5)
    assert_close(matrix.linear(one), one @ dequantized.T, rtol=1e-5, atol=1e-5)
    assert matrix.dequantized_block() is None
    monkeypatch.setattr(integer_matrix, "_SCRATCH", threading.local())  # no buffer yet in this thread
    with torch.inference_mode():  # the reused float buffer, first made under inference mode (Lightning's test) ...
        matrix.linear(x)
    with torch.no_grad():  # ... then written outside it
        assert_close(matrix.linear(x, bias), x @ dequantized.T + bias, rtol=1e-5, atol=1e-5)
    if bits == 8:  # torch's int8 kernel, where a CPU makes it worth switching on: the same result
        matrix.int8_kernel_max_rows = 100
        assert_close(matrix.linear(x, bias), x @ dequantized.T + bias, rtol=1e-5, atol=1e-5)
    if bits == 4:  # from the packed bytes themselves (how a dense int4 export loads): the same matrix
        again = IntegerMatrix(matrix.packed.clone(), scale, 4, width=width)
        assert torch.equal(again.dequantize(), dequantized)
        with pytest.raises(ValueError, match="do not fit"):
            IntegerMatrix(matrix.packed.clone(), scale, 4, width=width + 2)
    # Resident: the codes (int4: two per byte, each row on a byte) and the scales, nothing else.
    packed = width if bits == 8 else math.ceil(width / 2)
    assert sum(b.nbytes for b in matrix.buffers()) == 37 * packed + scale.numel() * 4


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 32)])
def test_a_loaded_integer_export_keeps_integer_weights_and_computes_the_dequantized_networks_logits(tmp_path, tie, bits, group_size):
    network = lstm(tie=tie)
    export_model(network, tmp_path / "e", bits, group_size)
    integer = load_exported(tmp_path / "e")
    floats = load_exported(tmp_path / "e", dequantize=True)
    assert isinstance(integer.embedding, IntegerEmbedding) and isinstance(integer.decoder, IntegerLinear)
    assert isinstance(integer.lstm, IntegerLSTM) and isinstance(floats.lstm, nn.LSTM)
    assert (integer.decoder.weight_q is integer.embedding.weight_q) == tie  # a tied matrix is one set of codes
    # No float weight matrix anywhere: only biases (vectors) and scales are floating.
    assert all(len(shape) == 1 or name.endswith("scale") for name, shape in float_tensors(integer))
    ids = torch.randint(0, 300, (3, 11))
    logits, (h, c) = integer(ids)
    expected, (h_f, c_f) = floats(ids)
    assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert_close(h, h_f, rtol=1e-4, atol=1e-5) and assert_close(c, c_f, rtol=1e-4, atol=1e-5)
    # Carrying the state one token at a time (generation) gives the same logits as the whole window.
    hidden, steps = None, []
    for t in range(ids.size(1)):
        step, hidden = integer(ids[:, t : t + 1], hidden)
        steps.append(step)
    assert_close(torch.cat(steps, dim=1), logits, rtol=1e-4, atol=1e-5)
    # What stays in memory: int8 about a quarter of float32, int4 about an eighth (plus scales: 1/32 at groups of 32).
    share = resident_bytes(integer)["total"] / resident_bytes(floats)["total"]
    assert share <= (0.30 if bits == 8 else 0.18), share


def test_resident_bytes_count_a_tied_matrix_once_and_name_each_layer(tmp_path):
    export_model(lstm(vocab=1000, width=64), tmp_path / "e", 8)
    counts = resident_bytes(load_exported(tmp_path / "e"))
    # embedding: 1000 x 64 codes + 1000 scales; the tied decoder adds only its bias.
    assert counts["embedding"] == 1000 * 64 + 1000 * 4
    assert counts["decoder"] == 1000 * 4
    lstm_codes = 2 * (4 * 64 * 64 * 2)  # two layers, W_ih and W_hh of 256 x 64 each
    assert counts["lstm"] == lstm_codes + 2 * 2 * 256 * 4 + 2 * 256 * 4  # + scales (one per row) + summed biases
    assert counts["total"] == counts["embedding"] + counts["decoder"] + counts["lstm"]


def test_pruned_integer_exports_keep_their_zeros(tmp_path):
    network = lstm()
    prune.l1_unstructured(network.embedding, "weight", amount=0.8)
    export_model(plain_copy(network), tmp_path / "e", 8)
    integer = load_exported(tmp_path / "e")
    assert (integer.embedding.weight_q.codes == 0).float().mean() >= 0.8


def test_a_forks_other_modules_get_float_weights(tmp_path):
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.mix = nn.Embedding(50, 8), nn.Bilinear(8, 8, 8)
            self.decoder = nn.Linear(8, 50)

        def forward(self, ids, hidden=None):
            x = self.embedding(ids)
            return self.decoder(self.mix(x, x)), hidden

    torch.manual_seed(0)
    network = WithConv().eval()
    export_model(network, tmp_path / "e", 8)
    loaded = load_exported(tmp_path / "e", network=WithConv())
    assert isinstance(loaded.embedding, IntegerEmbedding) and isinstance(loaded.mix, nn.Bilinear)
    reference = load_exported(tmp_path / "e", network=WithConv(), dequantize=True)
    ids = torch.randint(0, 50, (2, 5))
    assert_close(loaded(ids)[0], reference(ids)[0], rtol=1e-5, atol=1e-5)
    # A fork training its float module on top of the frozen integer ones: gradients flow through the integer product
    # (several blocks of rows) and equal the dequantized network's.
    loaded.decoder.weight_q.block_elements = 8 * 7
    loaded(ids)[0].square().sum().backward()
    reference(ids)[0].square().sum().backward()
    assert_close(loaded.mix.weight.grad, reference.mix.weight.grad, rtol=1e-4, atol=1e-5)


# --- generate and score from an export folder -------------------------------------------------------
@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A tiny fit on a corpus folder with an int8 export at the end (its test perplexity in the manifest)."""
    root = tmp_path_factory.mktemp("exported")
    lines = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."]
    text = "\n".join(lines * 40) + "\n"
    corpus = write_corpus(root / "corpus", text, text, "\n".join(lines[::-1] * 20) + "\n")
    run = root / "run"
    build_cli(
        [
            "fit", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.source", str(corpus), "--data.cache_dir", str(root / "cache"), "--data.min_freq", "1",
            "--data.batch_size", "4", "--data.eval_batch_size", "2", "--data.bptt", "8",
            "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.sample_length", "0",
            "--export.bits", "8", "--export.folder", str(root / "export"),
        ]
    )  # fmt: skip
    return root / "export", corpus


def test_score_reproduces_the_perplexity_the_export_measured_when_it_was_written(trained_export, capsys):
    export, corpus = trained_export
    manifest = json.loads((export / "manifest.json").read_text())
    written = manifest["metadata"]["evaluation"]["test_ppl"]
    assert manifest["metadata"]["text"]["kind"] == "tokens" and manifest["metadata"]["text"]["bptt"] == 8
    result = ExportedModel.load(export).score_file(corpus / "test.txt")
    assert result["ppl"] == pytest.approx(written, rel=1e-6) and result["tokens"] == 20 * (8 + 8 + 7)  # words + <eos>
    main(["score", str(export), str(corpus / "test.txt")])
    out = capsys.readouterr().out
    assert f"perplexity {written:.2f}" in out and f"the export measured {written:.2f}" in out
    # The same file under the float (dequantized) network: the same figure up to float rounding.
    assert ExportedModel.load(export, dequantize=True).score_file(corpus / "test.txt")["ppl"] == pytest.approx(written, rel=1e-4)


def test_generate_needs_only_the_export_folder(trained_export, capsys, monkeypatch, tmp_path):
    export, corpus = trained_export
    monkeypatch.chdir(tmp_path)  # no config, corpus or checkpoint reachable from here
    main(["generate", str(export), "--prompt", "the cat", "--max-new-tokens", "12", "--seed", "3", "--num-samples", "2"])
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("the cat") >= 2
    model = ExportedModel.load(export)
    texts = model.generate("the cat", max_new_tokens=12, seed=3, num_samples=2)
    assert texts == model.generate("the cat", max_new_tokens=12, seed=3, num_samples=2)  # the seed fixes the samples
    assert len(texts) == 2 and all(t.startswith("the cat") and len(t) > len("the cat") for t in texts)
    greedy = model.generate("the cat", max_new_tokens=6, temperature=0)
    assert greedy == model.generate("the cat", max_new_tokens=6, temperature=0, seed=99)
    # As predict: unknown words become <unk>, an empty prompt starts after an end of line.
    assert model.encode_prompt("zebras unknown") == [model.vocab.unk_id] * 2
    assert model.encode_prompt("") == [model.vocab.eos_id]
    assert len(model.generate("", max_new_tokens=5)) == 1


def test_bad_export_inputs_get_one_sentence(trained_export, tmp_path, capsys):
    export, corpus = trained_export
    for args, expected in [
        (["score", str(export), str(tmp_path / "missing.txt")], "missing.txt does not exist: give the text file to score."),
        (["generate", str(export), "--temperature", "-1"], "--temperature must be >= 0"),
        (["generate", str(export), "--num-samples", "0"], "--num-samples must be a positive integer"),
        (["generate", str(tmp_path)], "is not a readable lm_lightning export"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
    short = tmp_path / "short.txt"
    short.write_text("the cat\n")
    with pytest.raises(LMInputError, match="fewer than one evaluation window needs"):
        ExportedModel.load(export).score_file(short)
    blank = tmp_path / "blank.txt"
    blank.write_text(". . .\n" * 0 + "   \n")
    with pytest.raises(LMInputError, match="empty"):
        ExportedModel.load(export).score_file(blank)
    # An export written without a datamodule has a network but no way to read text: said so, with the fix.
    export_model(lstm(), tmp_path / "bare", 8)
    with pytest.raises(LMInputError, match="not how to read text"):
        ExportedModel.load(tmp_path / "bare")


def test_the_inference_benchmark_measures_every_export_and_scores_what_was_written(trained_export, tmp_path):
    """benchmarks/inference.py on a tiny export, two rounds: every figure of the README's inference table is there,
    the speed runs of both rounds are in the median, and score equals the perplexity written with the export."""
    export, corpus = trained_export
    out = tmp_path / "bench.json"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks/inference.py"), "--test-file", str(corpus / "test.txt"), "--tokens", "5",
         "--repeats", "2", "--rounds", "2", "--out", str(out), f"a={export}", f"b={export}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(out.read_text())
    assert list(rows) == ["a", "b"] and "| b |" in result.stdout
    for row in rows.values():
        assert len(row["tokens_per_s_runs"]) == 4 and row["tokens_per_s"] > 0
        assert row["test_ppl"] == pytest.approx(row["test_ppl_when_written"], rel=1e-6)
        assert row["resident_bytes"]["total"] == sum(v for k, v in row["resident_bytes"].items() if k != "total")
        assert row["peak_rss_bytes"] >= row["rss_loaded_bytes"] > row["rss_baseline_bytes"] > 0
