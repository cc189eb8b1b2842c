"""An export folder on its own: loaded back as the float32 network (export/loader.py), generate / score / next words
(export/commands.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import write_corpus
from torch import nn
from torch.nn.utils import prune
from torch.testing import assert_close

from lm_lightning.cli import build_cli, main
from lm_lightning.errors import LMInputError
from lm_lightning.export.commands import ExportedModel
from lm_lightning.export.fake_quantization import enable_fake_quantization
from lm_lightning.export.loader import load_exported
from lm_lightning.export.quantization import fake_quantize
from lm_lightning.export.writer import export_model, plain_copy
from lm_lightning.networks import LSTMNetwork
from lm_lightning.networks.lstm import StackedLSTM


def lstm(vocab=300, width=64, tie=True, seed=0) -> LSTMNetwork:
    torch.manual_seed(seed)
    network = LSTMNetwork(vocab, width, width, 2, 0.0, tie)
    with torch.no_grad():  # trained-looking weights: not all inside the init's small range
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return network.eval()


# --- an int8/int4 export loaded back ----------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 32)])
def test_a_loaded_integer_export_is_the_fake_quantized_network_in_float32(tmp_path, tie, bits, group_size):
    network = lstm(tie=tie)
    export_model(network, tmp_path / "e", bits, group_size)
    loaded = load_exported(tmp_path / "e")
    # The network's own modules, float32 throughout: ready to finish or fine-tune.
    assert [type(m) for m in (loaded.embedding, loaded.lstm, loaded.decoder)] == [nn.Embedding, StackedLSTM, nn.Linear]
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert (loaded.decoder.weight is loaded.embedding.weight) == tie  # a tied matrix is one tensor again
    expected_network = copy.deepcopy(network)
    enable_fake_quantization(expected_network, bits, group_size)
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, (h, c) = loaded(ids)
        expected, (h_q, c_q) = expected_network(ids)
        assert (expected - network(ids)[0]).abs().max() > 1e-4  # the rounding is visible: the comparison means something
    # Bit-identical weights (codes x scales) through the same float ops: float rounding at most.
    assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert_close(h, h_q, rtol=1e-6, atol=1e-6) and assert_close(c, c_q, rtol=1e-6, atol=1e-6)


def test_pruned_integer_exports_keep_their_zeros(tmp_path):
    network = lstm()
    prune.l1_unstructured(network.embedding, "weight", amount=0.8)
    export_model(plain_copy(network), tmp_path / "e", 8)
    loaded = load_exported(tmp_path / "e")
    assert (loaded.embedding.weight == 0).float().mean() >= 0.8  # symmetric codes: 0 dequantizes to exactly 0


def test_a_forks_network_gets_its_own_modules_back_and_fine_tunes(tmp_path):
    class WithBilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.mix = nn.Embedding(50, 8), nn.Bilinear(8, 8, 8)
            self.decoder = nn.Linear(8, 50)

        def forward(self, ids, hidden=None):
            x = self.embedding(ids)
            return self.decoder(self.mix(x, x)), hidden

    torch.manual_seed(0)
    network = WithBilinear().eval()
    export_model(network, tmp_path / "e", 8)
    loaded = load_exported(tmp_path / "e", network=WithBilinear())
    assert isinstance(loaded.mix, nn.Bilinear) and all(p.dtype == torch.float32 for p in loaded.parameters())
    # Every floating matrix went through the rule (the bilinear 3-D weight is stored as it is).
    expected = copy.deepcopy(network)
    with torch.no_grad():
        for module in (expected.embedding, expected.decoder):
            module.weight.copy_(fake_quantize(module.weight, 8))
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    assert_close(loaded(ids)[0], expected(ids)[0], rtol=1e-6, atol=1e-6)
    # A fork fine-tuning the loaded export: gradients reach every weight, as in any float network.
    loaded.train()
    loaded(ids)[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.parameters())


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
