"""A forked network (the GRU of tests/gru_model.py, built directly) through QAT, the integer export, loading it back
and `generate`, with nothing in lm_lightning naming it: the same numbers as the template's LSTM gets."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gru_model import GRUNetwork
from torch import nn
from torch.testing import assert_close

from lm_lightning.data import TokenDataModule
from lm_lightning.deploy.layout import sealed_manifest
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import perplexity
from lm_lightning.export.commands import ExportedModel
from lm_lightning.export.fake_quantization import disable_fake_quantization, enable_fake_quantization, quantized_weights
from lm_lightning.export.loader import load_exported
from lm_lightning.export.quantization import fake_quantize
from lm_lightning.export.writer import export_model, export_network

ROOT = Path(__file__).resolve().parents[1]
GROUP = 16  # divides embedding_dim 32 and hidden_dim 48
IDS = torch.randint(0, 80, (3, 17), generator=torch.Generator().manual_seed(1))


def gru() -> GRUNetwork:
    torch.manual_seed(0)
    net = GRUNetwork(80, 32, 48, 2).eval()
    with torch.no_grad():
        net.decoder.bias.uniform_(-0.1, 0.1)
    return net


def fake_quantized(net: nn.Module, bits: int) -> nn.Module:
    quantized = copy.deepcopy(net)
    enable_fake_quantization(quantized, bits, GROUP)
    return quantized


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_on_a_gru_trains_and_its_fake_quantized_weights_are_the_export_bit_for_bit(tmp_path, bits):
    net = gru()
    assert set(quantized_weights(net, bits, GROUP)) == {"embedding", "gru", "decoder"}
    qat = fake_quantized(net, bits)
    assert type(qat.gru).__name__ == "FakeQuantizedGRU" and isinstance(qat.gru, nn.GRU)
    # Straight-through: a training step reaches every GRU weight.
    qat.train()
    qat(IDS)[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qat.gru.parameters())
    qat.eval()

    export_model(net, tmp_path / "export", bits=bits, group_size=GROUP)
    loaded = load_exported(tmp_path / "export")
    for name, weight in net.gru.named_parameters():  # the weights QAT trained are the exported ones, exactly
        expected = fake_quantize(weight, bits, GROUP) if name.startswith("weight") else weight
        assert_close(getattr(loaded.gru, name), expected, rtol=0, atol=0)
    # torch's CPU GRU takes another kernel when a weight requires grad (results ~1e-7 apart); the fake-quantized
    # weights, made under no_grad, do not: compare the same kernel on both sides.
    loaded.requires_grad_(False)
    with torch.no_grad():
        expected_logits = qat(IDS)[0]
        assert (expected_logits - net(IDS)[0]).abs().max() > 1e-4  # the rounding is visible: the comparison means something
        assert_close(loaded(IDS)[0], expected_logits, rtol=0, atol=0)
    disable_fake_quantization(qat)
    assert type(qat.gru) is nn.GRU and list(qat.state_dict()) == list(net.state_dict())


@pytest.mark.parametrize("bits", [8, 4])
def test_an_integer_gru_export_rebuilt_from_its_class_path_matches_the_fake_quantized_network(tmp_path, bits):
    net = gru()
    export_model(net, tmp_path / "export", bits=bits, group_size=GROUP)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["network"] == {"class": "GRUNetwork", "class_path": "gru_model.GRUNetwork", "config": net.config}
    loaded = load_exported(tmp_path / "export")  # rebuilt from the class path: no instance passed
    assert type(loaded) is GRUNetwork and type(loaded.gru) is nn.GRU
    assert all(p.dtype == torch.float32 for p in loaded.parameters())

    with torch.no_grad():
        expected = fake_quantized(net, bits)(IDS)[0]
        # The same weights; the loaded GRU's require grad, which picks another CPU kernel: float rounding only.
        assert_close(loaded(IDS)[0], expected, rtol=1e-5, atol=1e-6)
        # Carrying the hidden state step by step (generation) gives the window's logits.
        hidden, steps = None, []
        for t in range(IDS.shape[1]):
            logits, hidden = loaded(IDS[:, t : t + 1], hidden)
            steps.append(logits)
        assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-6)


def test_any_module_of_an_instance_gets_its_dequantized_weight(tmp_path):
    net = gru()
    net.embedding = nn.Embedding(80, 32, padding_idx=0)  # a lookup with settings of its own: kept as they are
    export_model(net, tmp_path / "export", bits=8)
    # Into an instance: the class path would build the plain GRUNetwork.
    loaded = load_exported(tmp_path / "export", network=copy.deepcopy(net))
    assert type(loaded.embedding) is nn.Embedding and loaded.embedding.padding_idx == 0
    assert_close(loaded.embedding.weight, fake_quantize(net.embedding.weight, 8), rtol=0, atol=0)


def test_a_class_path_that_cannot_be_imported_or_is_not_a_module_is_one_sentence(tmp_path):
    export_model(gru(), tmp_path / "export", bits=8)
    manifest_path = tmp_path / "export" / "manifest.json"
    for class_path, message in [
        ("not_installed_anywhere.GRUNetwork", "cannot be imported here (ModuleNotFoundError"),
        ("os.system", "names builtin_function_or_method 'system', not an nn.Module subclass"),
    ]:
        manifest = json.loads(manifest_path.read_text())
        manifest["network"]["class_path"] = class_path
        manifest_path.write_text(sealed_manifest(manifest))  # sealed anew: the class path's own check is tested
        with pytest.raises(LMInputError) as error:
            load_exported(tmp_path / "export")
        text = str(error.value)
        assert message in text and "\n" not in text and text.startswith(str(tmp_path / "export")), text


@pytest.fixture
def gru_export(tiny_corpus, tmp_path):
    """An int8 export of a GRU briefly trained on the tiny corpus, with its vocabulary and how it reads text."""
    dm = TokenDataModule(source=str(tiny_corpus), batch_size=4, eval_batch_size=2, bptt=8, min_freq=1, cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    torch.manual_seed(0)
    net = GRUNetwork(dm.vocab_size, 16, 16, 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-2)
    for _ in range(2):
        hidden = None
        for batch in dm.train_dataloader():
            logits, hidden = net(batch.inputs, hidden)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            hidden = hidden.detach()
    qat = fake_quantized(net, 8)  # the export of a QAT run: written from its plain copy
    report = export_network(qat, tmp_path / "export", 8, GROUP, dm)
    return report, qat, dm


def test_generate_and_score_run_a_gru_export_alone_in_a_fresh_process(gru_export, tiny_corpus, tmp_path):
    report, qat, dm = gru_export
    dm.setup("test")
    float_ppl = perplexity(qat, dm.test_dataloader())
    assert report["test_ppl"] < dm.vocab_size / 2  # it learned something: the perplexity means something
    assert report["test_ppl"] == pytest.approx(float_ppl, rel=1e-5)  # the loaded export = the fake-quantized float model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "lm_lightning", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    out = run("generate", report["folder"], "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0")
    # Greedy: the corpus's own sentence, and exactly what this process gets from the same folder.
    assert out.startswith("the cat sat on the mat"), out
    assert out.strip() == ExportedModel.load(report["folder"]).generate("the cat", 8, temperature=0)[0]
    out = run("score", report["folder"], str(tiny_corpus / "test.txt"))
    assert f"perplexity {report['test_ppl']:.2f}" in out, out
