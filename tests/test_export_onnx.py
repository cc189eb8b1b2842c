"""The ONNX export (export/onnx_writer.py, export/onnx_quantize.py): the graph ONNX Runtime runs equals the network,
its integer weights are the project's own codes, a tied matrix is stored once, and the export step writes it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from gru_model import GRUNetwork
from torch.testing import assert_close

from lm_lightning.cli import main
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import perplexity
from lm_lightning.export.onnx_quantize import nbits_layout
from lm_lightning.export.onnx_writer import OnnxNetwork, export_onnx
from lm_lightning.export.quantization import dequantize_weight, quantize_weight
from lm_lightning.networks import AdaptiveEmbedding, AdaptiveLogSoftmax, BagLSTMNetwork, LSTMNetwork
from lm_lightning.networks.adaptive import install


def trained_looking(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # weights outside the init's small range, as after training
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return network.eval()


def dequantized(network: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    """The network with every matrix replaced by dequantize(quantize(matrix)): what QAT trained, what the export holds."""
    copy_ = copy.deepcopy(network)
    with torch.no_grad():
        for p in copy_.parameters():
            if p.dim() == 2:
                p.copy_(dequantize_weight(*quantize_weight(p, bits, group_size)))
    return copy_


def adaptive_lstm() -> LSTMNetwork:
    """Adaptive input and softmax, tied; widths 40, 8 and 1 (div_value 5), so every group size below fits."""
    network = LSTMNetwork(300, 40, 40, 2, 0.0, True)
    install(network, "decoder", AdaptiveLogSoftmax(300, 40, [30, 120], 5.0))
    install(network, "embedding", AdaptiveEmbedding(300, 40, [30, 120], 5.0))
    return network


NETWORKS = {
    "tied LSTM": lambda: LSTMNetwork(300, 40, 40, 2, 0.0, True),
    "adaptive input and softmax": adaptive_lstm,
    "untied LSTM": lambda: LSTMNetwork(300, 40, 40, 2, 0.0, False),
    "GRU (a fork)": lambda: GRUNetwork(300, 40, 40, 2),
}
# (bits, group size): int8 per row; int4 as one group a row (40), groups of a power of two (8 -> blocks of 16 with the
# activations spread), groups of 20 (padded to 32), and a group that is already a block (16 of a 32-wide... here 40: 8).
FORMATS = [(None, 32), (8, 32), (4, 40), (4, 20), (4, 8)]


@pytest.mark.parametrize("bits, group_size", FORMATS)
@pytest.mark.parametrize("kind", list(NETWORKS))
def test_onnx_runtime_reproduces_the_network_and_carries_its_state(tmp_path, kind, bits, group_size):
    network = trained_looking(NETWORKS[kind]())
    report = export_onnx(network, tmp_path / "export", bits, group_size, accuracy_level=0)
    reference = dequantized(network, bits, group_size) if bits else network
    runtime = OnnxNetwork(report["folder"])
    ids = torch.randint(0, 300, (3, 7), generator=torch.Generator().manual_seed(1))
    logits, state = runtime(ids)
    expected, hidden = reference(ids)
    assert_close(logits, expected, rtol=1e-5, atol=2e-5)
    # The state goes out and comes back in: a second window continues the first, at another length.
    logits, _ = runtime(ids[:, :2], state)
    expected, _ = reference(ids[:, :2], hidden)
    assert_close(logits, expected, rtol=1e-5, atol=2e-5)
    # Another batch size: the batch axis is dynamic too.
    assert_close(runtime(ids[:1, :4])[0], reference(ids[:1, :4])[0], rtol=1e-5, atol=2e-5)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    operators = manifest["graph"]["operators"]
    assert ("MatMulNBits" in operators) == (bits is not None)
    assert manifest["graph"]["vocab_size"] == 300 and manifest["bits"] == bits
    if kind.startswith("adaptive"):  # each word matrix once, as float32 (shared by Gather and Gemm) or only as codes
        model = onnx.load(str(tmp_path / "export" / "model.onnx"))
        floats = [int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and "scales" not in t.name]
        assert [floats.count(n) for n in (30 * 40, 90 * 8, 180 * 1)] == ([1, 1, 1] if bits is None else [0, 0, 0])


def _initializer_sizes(folder: Path) -> list[int]:
    model = onnx.load(str(folder / "model.onnx"))
    return sorted((int(np.prod(t.dims)) for t in model.graph.initializer), reverse=True)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_a_tied_matrix_is_stored_once_and_integer_files_are_small(tmp_path, bits):
    network = trained_looking(LSTMNetwork(2000, 64, 64, 1, 0.0, True))
    report = export_onnx(network, tmp_path / f"e{bits}", bits, 32, accuracy_level=0)
    sizes = _initializer_sizes(tmp_path / f"e{bits}")
    matrix = 2000 * 64 if bits is None else 2000 * 64 * bits // 8  # elements (float) or bytes of codes (integer)
    assert sizes[0] == matrix and sizes[1] < matrix / 4  # the embedding/decoder once, everything else much smaller
    float_bytes = report["float32_bytes"]
    assert report["bytes"] < {None: 1.02, 8: 0.30, 4: 0.18}[bits] * float_bytes


def test_the_codes_in_the_graph_are_the_rules_not_a_fresh_rounding():
    weight = torch.randn(5, 40) * 0.3
    codes, scale = (t.numpy() for t in quantize_weight(weight, 4, 20))
    layout = nbits_layout(codes, scale, 4)  # groups of 20 padded to blocks of 32
    assert layout["block"] == 32 and layout["K"] == 64 and layout["scales"].shape == (5, 2)
    unpacked = np.stack([layout["B"] & 15, layout["B"] >> 4], axis=-1).reshape(5, 2, 32).astype(int) - 8
    assert np.array_equal(unpacked[:, :, :20].reshape(5, 40), codes) and not unpacked[:, :, 20:].any()
    assert list(layout["spread"][18:22]) == [18, 19, 32, 33]


def test_fast_integer_products_stay_close_to_the_exact_ones(tmp_path):
    """accuracy_level 4 (the default) quantizes the activations to int8 per block: logits move by a little."""
    network = trained_looking(LSTMNetwork(500, 64, 64, 2, 0.0, True))
    exact = OnnxNetwork(export_onnx(network, tmp_path / "exact", 8, 32, accuracy_level=0)["folder"])
    fast = OnnxNetwork(export_onnx(network, tmp_path / "fast", 8, 32)["folder"])
    ids = torch.randint(0, 500, (2, 20), generator=torch.Generator().manual_seed(0))
    a, b = exact(ids)[0], fast(ids)[0]
    assert (a - b).abs().max() < 0.02 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_networks_the_onnx_export_does_not_cover_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(LMInputError, match="bags of words.*--export.format safetensors"):
        export_onnx(BagLSTMNetwork(50, embedding_dim=8, hidden_dim=8, num_layers=1), tmp_path / "bag")
    assert not (tmp_path / "bag").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(LMInputError, match="exists and is not an export"):
        export_onnx(LSTMNetwork(50, 8, 8, 1, 0.0, True), tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_export_step_writes_an_onnx_export_scored_through_onnx_runtime(tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--data.source", str(tiny_corpus), "--data.min_freq", "1", "--data.batch_size", "4", "--data.bptt", "8",
        "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32", "--trainer.max_epochs", "6",
        "--trainer.limit_train_batches", "20", "--model.sample_length", "0", "--model.optimizer.lr", "0.02", "--export.format", "onnx", "--export.bits", "8",
    ])  # fmt: skip
    folder = tmp_path / "lightning_logs" / "version_0" / "export-onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "vocab.json"]
    assert manifest["format"] == "lm_lightning.onnx" and manifest["bits"] == 8
    assert manifest["metadata"]["text"]["kind"] == "tokens"
    written = manifest["metadata"]["evaluation"]["test_ppl"]
    # The figure in the manifest is the file's: the same windows through ONNX Runtime give it again.
    from lm_lightning.data import TokenDataModule

    data = TokenDataModule(source=str(tiny_corpus), min_freq=1, batch_size=4, bptt=8)
    data.setup("test")
    assert perplexity(OnnxNetwork(folder), data.test_dataloader()) == pytest.approx(written, rel=1e-6)
    assert 1 < written < 5  # the tiny corpus is learnable: far below its 13 words


@pytest.mark.slow
def test_a_qat_finished_run_exports_the_codes_it_trained_with_to_onnx(tmp_path, monkeypatch):
    """int4 QAT (groups of 16) in the last epoch, exported to ONNX: ONNX Runtime's perplexity is the fake-quantized
    network's, the one the run trained and validated, to 0.1% (the integer products quantize activations too)."""
    from lm_lightning.cli import build_cli
    from lm_lightning.export.fake_quantization import disable_fake_quantization, enable_fake_quantization

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    cli = build_cli([
        "fit", "-c", str(root / "configs/presets/debug.yaml"), "--trainer.enable_progress_bar", "false",
        "--model.network.embedding_dim", "32", "--model.network.hidden_dim", "32", "--model.sample_length", "0",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6", "--export.format", "onnx",
        "--trainer.callbacks+=lm_lightning.callbacks.quantization.QuantizationAwareFinishing",
        "--trainer.callbacks.bits", "4", "--trainer.callbacks.group_size", "16", "--trainer.callbacks.last_epochs", "1",
    ])  # fmt: skip
    folder = tmp_path / "lightning_logs" / "version_0" / "export-onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["bits"] == 4 and manifest["group_size"] == 16  # QAT's format, not the export's defaults
    evaluation = manifest["metadata"]["evaluation"]
    network = cli.model.network
    enable_fake_quantization(network, 4, 16)
    trained = perplexity(network, cli.datamodule.test_dataloader(), evaluation["test_batches"])
    disable_fake_quantization(network)
    assert evaluation["test_ppl"] == pytest.approx(trained, rel=1e-3)
    assert perplexity(OnnxNetwork(folder), cli.datamodule.test_dataloader(), evaluation["test_batches"]) == pytest.approx(
        evaluation["test_ppl"], rel=1e-6
    )


def test_a_bag_run_asking_for_an_onnx_export_stops_before_training(tmp_path, monkeypatch, capsys):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "-c", str(root / "configs/bag_embedded.yaml"), "-c", str(root / "configs/presets/debug.yaml"),
              "--export.format", "onnx", "--export.enabled", "true"])  # fmt: skip
    assert stopped.value.code == 2 and "--export.format safetensors" in capsys.readouterr().err
    assert not list(tmp_path.glob("lightning_logs/*/checkpoints/*.ckpt"))  # no step was trained
