"""The integer export: parity with fake quantization, sizes, tied and sparse storage, atomic writes, broken folders,
every network (the template's two and a fork's GRU, rebuilt from its class path) and a loader that never imports a
class an older manifest names without a class path."""

import builtins
import copy
import functools
import importlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from safetensors.numpy import load_file, save_file
from torch.testing import assert_close
from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

import lm_lightning.export.checks as export_checks
import lm_lightning.export.loader as export
import lm_lightning.export.writer as writer
from lm_lightning.data import Vocabulary
from lm_lightning.data.batch import Bags, Batch
from lm_lightning.deploy.layout import GOOD_CHECKPOINT, sealed_manifest
from lm_lightning.errors import LMInputError
from lm_lightning.evaluation import perplexity
from lm_lightning.export.fake_quantization import disable_fake_quantization, enable_fake_quantization
from lm_lightning.export.format import FORMAT
from lm_lightning.export.loader import load_exported
from lm_lightning.export.quantization import fake_quantize, quantize_weight
from lm_lightning.export.writer import export_model, plain_copy
from lm_lightning.io import atomic_directory, atomic_write_text
from lm_lightning.networks import BagLSTMNetwork, LSTMNetwork


def network(tie: bool = True, vocab: int = 400, dim: int = 64, layers: int = 2) -> LSTMNetwork:
    torch.manual_seed(0)
    net = LSTMNetwork(vocab, dim, dim, layers, dropout=0.0, tie_weights=tie).eval()
    with torch.no_grad():
        net.decoder.bias.uniform_(-0.1, 0.1)  # zeros at init would be stored sparsely, hiding the float32 case
    return net


IDS = torch.randint(0, 400, (3, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bits", [8, 4, None])
@pytest.mark.parametrize("tie", [True, False])
def test_loaded_export_reproduces_the_fake_quantized_model_exactly(tmp_path, bits, tie):
    net = network(tie)
    report = export_model(net, tmp_path / "export", bits=bits, group_size=16)
    loaded = load_exported(tmp_path / "export")
    with torch.no_grad():
        if bits is not None:
            enable_fake_quantization(net, bits, 16)
        expected, _ = net(IDS)
        disable_fake_quantization(net)
        logits, _ = loaded(IDS)
    # Same rule, same float ops on bit-identical weights: no tolerance needed.
    assert_close(logits, expected, rtol=0, atol=0)
    assert not loaded.training and all(p.dtype == torch.float32 for p in loaded.parameters())
    assert (loaded.decoder.weight is loaded.embedding.weight) == tie
    assert ("decoder.weight" in report["tensors"]) != tie  # a tied matrix is stored once
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["network"] == {
        "class": "LSTMNetwork",
        "class_path": "lm_lightning.networks.lstm.LSTMNetwork",
        "config": {"vocab_size": 400, "embedding_dim": 64, "hidden_dim": 64, "num_layers": 2, "tie_weights": tie},
    }
    assert manifest["ties"] == ({"decoder.weight": "embedding.weight"} if tie else {})
    assert manifest["bits"] == bits and manifest["group_size"] == 16
    expected_format = {8: "int8", 4: "int4", None: "float32"}[bits]
    assert report["tensors"]["lstm.weight_hh_l1"]["format"] == expected_format
    assert report["tensors"]["lstm.bias_hh_l1"]["format"] == "float32"  # biases stay float
    assert manifest["tensors"]["lstm.weight_hh_l1"]["quantized"] == (bits is not None)
    assert manifest["tensors"]["lstm.bias_hh_l1"]["quantized"] is False


def test_int8_file_is_under_30_percent_of_float32_and_int4_smaller_still(tmp_path):
    net = network()
    sizes = {bits: export_model(net, tmp_path / f"int{bits}", bits=bits)["bytes"] for bits in (None, 8, 4)}
    weights = {bits: (tmp_path / f"int{bits}" / "model.safetensors").stat().st_size for bits in (None, 8, 4)}
    assert weights[8] <= 0.30 * weights[None]
    # 1/2 byte per weight + a float32 scale per 32 against 1 byte + a scale per row: ~0.64 of int8.
    assert weights[4] <= 0.70 * weights[8]
    assert sizes[None] == sum(p.stat().st_size for p in (tmp_path / "intNone").iterdir())


def test_rule_is_torchaos_intx_fake_quantizer_and_keeps_zeros():
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    weight[:, ::3] = 0
    for bits, config in [
        (8, IntxFakeQuantizeConfig(torch.int8, granularity="per_channel", is_symmetric=True)),
        (4, IntxFakeQuantizeConfig(torch.int4, group_size=16, is_symmetric=True)),
    ]:
        ours = fake_quantize(weight, bits, 16)
        assert_close(ours, IntxFakeQuantizer(config)(weight), rtol=0, atol=0)
        codes, scale = quantize_weight(weight, bits, 16)
        assert codes.dtype == torch.int8 and int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) <= 2 ** (bits - 1) - 1
        assert torch.all(ours[:, ::3] == 0)  # symmetric: pruned zeros stay exactly zero
        assert (ours - weight).abs().max() <= scale.max() / 2 * 1.01  # rounding error at most half a step
    # Straight-through estimator: the gradient passes unchanged.
    leaf = weight.clone().requires_grad_()
    (fake_quantize(leaf, 4, 16) * torch.arange(64.0)).sum().backward()
    assert_close(leaf.grad, torch.arange(64.0).expand(12, 64))


def test_pruned_tensors_are_stored_sparsely_and_stay_zero(tmp_path):
    net = network()
    dense_int8 = export_model(net, tmp_path / "dense", bits=8)
    pruned = copy.deepcopy(net)
    prune.l1_unstructured(pruned.embedding, "weight", amount=0.9)
    for layer in range(2):
        prune.l1_unstructured(pruned.lstm, f"weight_hh_l{layer}", amount=0.9)
        prune.l1_unstructured(pruned.lstm, f"weight_ih_l{layer}", amount=0.995)
    with torch.no_grad():  # as after an optimizer step: the hooks' `weight` attributes are stale, orig * mask is not
        pruned.lstm.weight_hh_l0_orig.add_(0.5)
    plain = plain_copy(pruned)  # pruning made permanent (orig * mask, the fresh values), on a copy
    assert hasattr(pruned.lstm, "weight_hh_l0_mask") and not hasattr(plain.lstm, "weight_hh_l0_mask")
    report = export_model(plain, tmp_path / "sparse", bits=8)
    formats = {name: t["format"] for name, t in report["tensors"].items()}
    assert formats["embedding.weight"] == "int8+bitmask" and formats["lstm.weight_hh_l0"] == "int8+bitmask"
    assert formats["lstm.weight_ih_l1"] == "int8+coo"  # at 99.5% zeros a list of indices beats one bit per weight
    assert formats["lstm.bias_ih_l0"] == "float32"  # dense data stays dense
    # 90% zeros in int8: 1/8 byte of mask + 0.1 byte of values per weight instead of 1 byte.
    for name in ("embedding.weight", "lstm.weight_hh_l0"):
        assert report["tensors"][name]["bytes"] <= 0.3 * dense_int8["tensors"][name]["bytes"]
    assert report["bytes"] <= 0.4 * dense_int8["bytes"]
    loaded = load_exported(tmp_path / "sparse")
    expected = fake_quantize(pruned.lstm.weight_hh_l0_orig * pruned.lstm.weight_hh_l0_mask, 8)
    assert_close(loaded.lstm.weight_hh_l0, expected, rtol=0, atol=0)
    for name in ("embedding.weight", "lstm.weight_ih_l1"):
        module, attr = name.split(".")
        mask = getattr(getattr(pruned, module), f"{attr}_mask")
        assert torch.all(getattr(getattr(loaded, module), attr)[mask == 0] == 0)
    # The same choice without quantization: the float32 file shrinks too.
    float_report = export_model(plain, tmp_path / "sparse-float", bits=None)
    assert float_report["tensors"]["embedding.weight"]["format"] == "float32+bitmask"
    assert float_report["tensors"]["embedding.weight"]["bytes"] <= 0.25 * 4 * 400 * 64


def test_reexport_replaces_only_when_complete(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    vocab = Vocabulary(["<unk>", "<eos>"] + [f"w{i}" for i in range(398)])
    export_model(network(), folder, bits=8, vocab=vocab, metadata={"run": 1})
    assert Vocabulary.load(folder / "vocab.json") == vocab

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_model(network(tie=False), folder, bits=4)
    monkeypatch.undo()
    assert json.loads((folder / "manifest.json").read_text())["metadata"] == {"run": 1}
    kept = load_exported(folder)
    assert kept.decoder.weight is kept.embedding.weight  # the first export, tied, still whole
    export_model(network(tie=False), folder, bits=4)  # a complete re-export replaces the old one
    assert json.loads((folder / "manifest.json").read_text())["bits"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary or old folders left
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.safetensors"]  # old vocab.json gone
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(LMInputError, match="notes exists and is not an export"):
        export_model(network(), tmp_path / "notes", bits=8)


# --- tampered exports: the loader checks everything before it reads a weight or builds the network -------------
OUTSIDE = "outside.txt"  # a file next to the export folder: no manifest may make the loader read it


def _exported(tmp_path: Path) -> Path:
    """An int8 export with a vocabulary and every storage: dense, bit mask (90% zeros), indices (99.5% zeros)."""
    net = network()
    with torch.no_grad():
        for name, keep in (("weight_hh_l0", 0.1), ("weight_ih_l1", 0.005)):
            weight = getattr(net.lstm, name)
            weight.mul_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) < keep)
    export_model(net, tmp_path / "export", bits=8, vocab=Vocabulary(["<unk>", "<eos>"] + [f"w{i}" for i in range(398)]))
    (tmp_path / OUTSIDE).write_text("not part of the export")
    return tmp_path / "export"


def _rehash(folder: Path, manifest: dict) -> None:
    """What a careful tamperer does: sizes and hashes in the manifest that match the changed files."""
    for name in ("model.safetensors", "vocab.json"):
        if (folder / name).exists():
            manifest["files"][name] = {"bytes": (folder / name).stat().st_size, "sha256": export._sha256(folder / name)}


def _rewrite_weights(folder: Path, change) -> None:
    arrays = load_file(str(folder / "model.safetensors"))
    change(arrays)
    save_file(arrays, str(folder / "model.safetensors"), metadata={"format": FORMAT})


def _set_header(folder: Path, header: bytes, length: int | None = None) -> None:
    """Replace the safetensors header (8-byte little-endian length, then JSON) and keep the data behind it."""
    data = (folder / "model.safetensors").read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little") :]
    (folder / "model.safetensors").write_bytes((len(header) if length is None else length).to_bytes(8, "little") + header + body)


def _tamper(folder: Path, manifest: dict, case: str) -> None:
    """Change the export as ``case`` says, then write the manifest sealed anew (``deploy/layout.py``), as a careful
    tamperer would: the checks behind the seal are what each case tests; "manifest edited by hand" tests the seal."""
    tensors, files, config = manifest["tensors"], manifest["files"], manifest["network"]["config"]
    weights = folder / "model.safetensors"
    if case == "manifest not JSON":
        (folder / "manifest.json").write_text("{not json")
        return
    if case == "manifest edited by hand":  # a change every other check accepts (group_size means nothing to int8)
        (folder / "manifest.json").write_text(json.dumps({**manifest, "group_size": 64}, indent=1))
        return
    if case == "manifest not an object":
        manifest = [manifest]
    elif case == "other version":
        manifest["version"] = 99
    elif case == "bits not 4 or 8":
        manifest["bits"] = 8.0
    elif case == "traversal name":
        files[f"../{OUTSIDE}"] = {"bytes": 22, "sha256": export._sha256(folder.parent / OUTSIDE)}
    elif case == "absolute name":
        files[str(folder.parent / OUTSIDE)] = files.pop("vocab.json")
    elif case == "subfolder name":
        files["sub/vocab.json"] = files.pop("vocab.json")
    elif case == "unknown name":
        files["notes.txt"] = files["vocab.json"]
    elif case == "entry without hash":
        del files["vocab.json"]["sha256"]
    elif case == "vocab entry removed":
        del files["vocab.json"]
    elif case == "weights entry removed":
        del files["model.safetensors"]
    elif case == "extra file":
        (folder / "extra.bin").write_bytes(b"\0")
    elif case == "extra folder":
        (folder / "sub").mkdir()
    elif case == "vocab is a link outside":
        (folder / "vocab.json").unlink()
        (folder / "vocab.json").symlink_to(folder.parent / OUTSIDE)
        _rehash(folder, manifest)
    elif case == "weights missing":
        weights.unlink()
    elif case == "wrong sha":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif case == "tensor missing":
        del tensors["lstm.weight_hh_l0"]
    elif case == "tensor extra":
        tensors["evil.weight"] = tensors["lstm.bias_hh_l0"]
    elif case == "ties changed":
        manifest["ties"] = {}
    elif case == "settings unknown key":
        config["command"] = "rm -rf /"
    elif case == "settings invalid":
        config["hidden_dim"] = 32  # tied weights need embedding_dim == hidden_dim
    elif case == "settings wrong type":
        config["embedding_dim"] = "64"
    elif case == "settings too many layers":
        config["num_layers"] = 10**7  # building even on meta would loop ten million times
    elif case == "config does not fit the tensors":
        config["vocab_size"] = 399
    elif case == "wrong declared shape":
        tensors["lstm.bias_hh_l0"]["shape"] = [999]
    elif case == "wrong declared dtype":
        tensors["lstm.bias_hh_l0"]["dtype"] = "float16"
    elif case == "quantized flag flipped":
        tensors["lstm.weight_hh_l1"]["quantized"] = False
    elif case == "wrong block":
        tensors["lstm.weight_hh_l1"]["block"] = 32
    elif case == "unknown storage":
        tensors["lstm.bias_hh_l0"]["storage"] = "pickle"
    elif case == "more non-zeros than numbers":
        tensors["lstm.weight_ih_l1"]["nnz"] = 10**12
    elif case == "stored dtype differs":
        _rewrite_weights(folder, lambda a: a.update({"lstm.bias_hh_l0": a["lstm.bias_hh_l0"].astype("float64")}))
        _rehash(folder, manifest)
    elif case == "extra array in the file":
        _rewrite_weights(folder, lambda a: a.update({"evil": a["lstm.bias_hh_l0"]}))
        _rehash(folder, manifest)
    elif case == "header length beyond the file":
        _set_header(folder, b"{}", length=2**40)
        _rehash(folder, manifest)
    elif case == "header not JSON":
        _set_header(folder, b"{" * 64)
        _rehash(folder, manifest)
    elif case == "header offsets overlap":
        header = json.loads(weights.read_bytes()[8 : 8 + int.from_bytes(weights.read_bytes()[:8], "little")])
        assert header["decoder.bias"]["data_offsets"][0] == 0
        header["lstm.bias_hh_l1"]["data_offsets"] = [0, 4 * 256]  # on top of decoder.bias
        _set_header(folder, json.dumps(header).encode())
        _rehash(folder, manifest)
    elif case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "truncated weights, manifest rehashed":
        weights.write_bytes(weights.read_bytes()[:-100])
        _rehash(folder, manifest)
    elif case == "sparse index out of range":
        _rewrite_weights(folder, lambda a: a["lstm.weight_ih_l1.index"].__setitem__(-1, 65535))
        _rehash(folder, manifest)
    elif case == "sparse indices repeated":
        _rewrite_weights(folder, lambda a: a["lstm.weight_ih_l1.index"].__setitem__(1, a["lstm.weight_ih_l1.index"][0]))
        _rehash(folder, manifest)
    elif case == "bit mask marks another count":
        _rewrite_weights(folder, lambda a: a["lstm.weight_hh_l0.mask"].__setitem__(0, a["lstm.weight_hh_l0.mask"][0] ^ 1))
        _rehash(folder, manifest)
    elif case == "NaN weight":
        _rewrite_weights(folder, lambda a: a["decoder.bias"].__setitem__(3, float("nan")))
        _rehash(folder, manifest)
    elif case == "infinite scale":
        _rewrite_weights(folder, lambda a: a["lstm.weight_hh_l1.scale"].__setitem__((5, 0), float("inf")))
        _rehash(folder, manifest)
    elif case == "unreadable weights":
        pass  # the test makes opening it fail: chmod alone does not stop root
    else:
        raise AssertionError(f"unknown case {case}")
    (folder / "manifest.json").write_text(sealed_manifest(manifest) if isinstance(manifest, dict) else json.dumps(manifest))


TAMPERED = [
    ("manifest not JSON", "manifest.json cannot be read as JSON (Expecting property name"),
    ("manifest not an object", "its manifest is None, this version reads ('lm_lightning.export', 2)"),
    ("manifest edited by hand", "manifest.json does not match its own manifest_sha256: it was edited or damaged after the export"),
    ("other version", "its manifest is ('lm_lightning.export', 99), this version reads"),
    ("bits not 4 or 8", "its manifest declares bits 8.0 and group_size 32"),
    ("traversal name", "its manifest lists '../outside.txt', a path, not a file name in the folder"),
    ("absolute name", "outside.txt', a path, not a file name in the folder"),
    ("subfolder name", "its manifest lists 'sub/vocab.json', a path, not a file name in the folder"),
    ("unknown name", "its manifest lists 'notes.txt', not a file an export holds (model.safetensors, vocab.json)"),
    ("entry without hash", "its manifest's entry for vocab.json has no byte count and SHA-256"),
    ("vocab entry removed", "vocab.json is in the folder but not in the manifest, which must list and hash every file"),
    ("weights entry removed", "its manifest does not list model.safetensors"),
    ("extra file", "extra.bin is in the folder but not in the manifest"),
    ("extra folder", "sub is in the folder but not in the manifest"),
    ("vocab is a link outside", "vocab.json is not a regular file"),
    ("weights missing", "model.safetensors is missing"),
    ("wrong sha", "model.safetensors does not match the manifest (size or SHA-256 differ)"),
    ("tensor missing", "its manifest does not declare ['lstm.weight_hh_l0'], which the LSTMNetwork needs"),
    ("tensor extra", "its manifest declares ['evil.weight'], which the LSTMNetwork does not have"),
    ("ties changed", "its ties {} are not the LSTMNetwork's {'decoder.weight': 'embedding.weight'}"),
    ("settings unknown key", "its network settings name ['command'], which the export does not write for a LSTMNetwork"),
    ("settings invalid", "its network settings are invalid (tie_weights needs embedding_dim == hidden_dim"),
    ("settings wrong type", "its network setting embedding_dim is '64', not an integer"),
    ("settings too many layers", "its network settings ask for 10000000 layers, more than the tensors it lists"),
    ("config does not fit the tensors", "embedding.weight is declared with shape [400, 64], the LSTMNetwork has [399, 64]"),
    ("wrong declared shape", "lstm.bias_hh_l0 is declared with shape [999], the LSTMNetwork has [256]"),
    ("wrong declared dtype", "lstm.bias_hh_l0 is declared 'float16' (quantized: False), an export with bits=8 stores it as 'float32'"),
    ("quantized flag flipped", "lstm.weight_hh_l1 is declared 'int8' (quantized: False), an export with bits=8 stores it as 'int8'"),
    ("wrong block", "lstm.weight_hh_l1 is declared with blocks of 32, its rule gives 64"),
    ("unknown storage", "lstm.bias_hh_l0 is declared as 'pickle' storage"),
    ("more non-zeros than numbers", "lstm.weight_ih_l1 is declared as 'coo' storage with 1000000000000 non-zeros of 16384"),
    ("stored dtype differs", "model.safetensors stores lstm.bias_hh_l0 as ('F64', [256]), the manifest describes ('F32', [256])"),
    ("extra array in the file", "model.safetensors holds other arrays than the manifest describes (evil differ)"),
    ("header length beyond the file", "model.safetensors has no valid safetensors header (it declares 1099511627776 bytes"),
    ("header not JSON", "the safetensors header of model.safetensors is not JSON"),
    ("header offsets overlap", "the arrays of model.safetensors overlap or leave gaps"),
    ("truncated weights", "model.safetensors does not match the manifest (size or SHA-256 differ)"),
    ("truncated weights, manifest rehashed", "model.safetensors holds"),
    ("sparse index out of range", "the sparse indices of lstm.weight_ih_l1 are not increasing positions below 16384"),
    ("sparse indices repeated", "the sparse indices of lstm.weight_ih_l1 are not increasing positions"),
    ("bit mask marks another count", "the bit mask of lstm.weight_hh_l0 does not mark its"),
    ("NaN weight", f"model.safetensors holds NaN or infinite values (in decoder.bias); {GOOD_CHECKPOINT}."),
    ("infinite scale", f"model.safetensors holds NaN or infinite values (in lstm.weight_hh_l1.scale); {GOOD_CHECKPOINT}."),
    ("unreadable weights", "model.safetensors cannot be read (Permission denied); check its permissions or export the model again."),
]


def record_builds(monkeypatch) -> list[str]:
    """The device of every LSTMNetwork built from now on ("meta" allocates nothing), in order."""
    built: list[str] = []
    real_init = LSTMNetwork.__init__

    @functools.wraps(real_init)
    def counted_init(self, *args, **kwargs):
        built.append(str(torch.get_default_device()))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(LSTMNetwork, "__init__", counted_init)
    return built


@pytest.mark.parametrize("case, message", TAMPERED, ids=[case for case, _ in TAMPERED])
def test_a_tampered_export_is_one_sentence_and_nothing_outside_is_read_or_built(tmp_path, monkeypatch, case, message):
    folder = _exported(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {n: t["storage"] for n, t in manifest["tensors"].items() if t["storage"] != "dense"} == {
        "lstm.weight_hh_l0": "bitmask",
        "lstm.weight_ih_l1": "coo",
    }
    _tamper(folder, manifest, case)
    if case == "unreadable weights":

        def denied(path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(export_checks, "open", denied, raising=False)  # the first read: the header
    hashed, built = [], record_builds(monkeypatch)
    real_sha256 = export._sha256
    monkeypatch.setattr(export, "_sha256", lambda path: hashed.append(Path(path)) or real_sha256(path))
    with pytest.raises(LMInputError) as error:
        load_exported(folder)
    text = str(error.value)
    assert text.startswith(f"{folder} is not a readable lm_lightning export: ") and message in text, text
    assert "\n" not in text and text.count(": ") <= 3
    assert all(path.parent == folder and not path.is_symlink() for path in hashed), hashed  # nothing outside is read
    assert "cpu" not in built, built  # refused before the real network is allocated (meta builds allocate nothing)


def test_random_damage_is_refused_in_one_sentence_or_still_a_consistent_export(tmp_path):
    """Beyond the matrix: 120 random changes (manifest values replaced or removed, header bytes, with sizes and hashes
    made to match) never end in another exception; what loads is an export whose checks all hold."""
    rng = random.Random(0)
    source = _exported(tmp_path)
    original = json.loads((source / "manifest.json").read_text())
    keys = [path for path in _json_paths(original) if path]
    values = [None, True, 0, -1, 2**70, 1.5, "x", [], {}, [1], "../x", [10**9, 64], "float32", "int8", "coo", 8, 4, [256]]
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(120):
        folder = tmp_path / f"case{case}"
        shutil.copytree(source, folder)
        manifest = copy.deepcopy(original)
        if case % 2:  # bytes of the safetensors length or JSON header, the manifest rehashed to match
            data = bytearray((folder / "model.safetensors").read_bytes())
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(8 + int.from_bytes(data[:8], "little"))
                data[at] = rng.choice(b'{}[]",:0123456789 ') if at >= 8 else rng.randrange(256)
            (folder / "model.safetensors").write_bytes(bytes(data))
            _rehash(folder, manifest)
        else:
            for _ in range(rng.randint(1, 3)):
                *parents, last = rng.choice(keys)
                try:
                    node = functools.reduce(lambda node, key: node[key], parents, manifest)
                    if isinstance(node, dict) and rng.random() < 0.2:
                        del node[last]
                    else:
                        node[last] = rng.choice(values)
                except (KeyError, IndexError, TypeError):
                    pass  # an earlier change of this case replaced or removed a parent
        (folder / "manifest.json").write_text(sealed_manifest(manifest))  # sealed anew: the checks behind the seal
        try:
            load_exported(folder)
            outcomes["loaded"] += 1  # e.g. metadata or header spacing changed: still an export its checks accept
        except LMInputError as error:
            assert str(error).startswith(f"{folder} ") and "\n" not in str(error)
            outcomes["refused"] += 1
        shutil.rmtree(folder)
    assert outcomes["refused"] >= 100, outcomes


def _json_paths(node, prefix: tuple = ()):
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _json_paths(value, (*prefix, key))


def test_a_huge_network_is_refused_before_it_is_built(tmp_path, monkeypatch):
    folder = _exported(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["network"]["config"]["vocab_size"] = 10**9  # 128 GB of float32 if it were built
    manifest["tensors"]["embedding.weight"]["shape"] = [10**9, 64]
    manifest["tensors"]["decoder.bias"]["shape"] = [10**9]
    (folder / "manifest.json").write_text(sealed_manifest(manifest))
    built = record_builds(monkeypatch)
    with pytest.raises(LMInputError) as error:
        load_exported(folder)
    assert str(error.value) == (
        f"{folder} describes a LSTMNetwork of 65,000,066,560 numbers (242.1 GiB as float32), more than "
        "max_elements=1,073,741,824: pass a larger max_elements to load_exported if you trust this export."
    )
    assert built == ["meta"]  # its shapes came from a meta build; nothing was allocated
    # The ceiling is a setting: the real export (92,560 numbers) loads under its own size and not under one less.
    monkeypatch.undo()
    export_model(network(), folder, bits=8)
    assert isinstance(load_exported(folder, max_elements=92_560), LSTMNetwork)
    with pytest.raises(LMInputError, match="of 92,560 numbers .* more than max_elements=92,559"):
        load_exported(folder, max_elements=92_559)


def test_files_follow_the_umask_and_the_process_umask_is_never_changed(tmp_path, monkeypatch):
    # The umask is set in a child process (one for all three: it spends ~10 s importing torch on a busy machine);
    # setting it here would change the mode of every file the test run writes meanwhile.
    script = (
        "import json, os, sys\n"
        "from lm_lightning.data import Vocabulary\n"
        "from lm_lightning.export.writer import export_model\n"
        "from lm_lightning.networks import LSTMNetwork\n"
        "modes = {}\n"
        "for umask in ('022', '077', '027'):\n"
        "    os.umask(int(umask, 8))\n"
        "    folder = os.path.join(sys.argv[1], umask)\n"
        "    export_model(LSTMNetwork(10, 8, 8, 1, dropout=0.0), folder, bits=8, vocab=Vocabulary(['<unk>', '<eos>', 'a']))\n"
        "    modes[umask] = {name: os.stat(os.path.join(folder, name)).st_mode & 0o777 for name in ['', *os.listdir(folder)]}\n"
        "print(json.dumps(modes))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    for umask, files, folder in (("022", 0o644, 0o755), ("077", 0o600, 0o700), ("027", 0o640, 0o750)):
        assert modes[umask] == {"": folder, "manifest.json": files, "model.safetensors": files, "vocab.json": files}, (umask, modes)

    # And in this process: no code path of the export or the atomic writers reads the umask by setting it.
    def no_umask(mask: int) -> int:
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", no_umask)
    export_model(network(), tmp_path / "here", bits=4, vocab=Vocabulary(["<unk>", "<eos>", "a"]))
    atomic_write_text(tmp_path / "note.txt", "text")
    with atomic_directory(tmp_path / "cache") as tmp:
        (tmp / "x").write_text("x")
    assert load_exported(tmp_path / "here") is not None and (tmp_path / "note.txt").read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["022", "027", "077", "cache", "here", "note.txt"]  # no temporaries left


def test_bad_arguments_fail_before_writing(tmp_path):
    with pytest.raises(LMInputError, match="bits must be 8 .* or 4 .*, got 3"):
        export_model(network(), tmp_path / "a", bits=3)
    with pytest.raises(LMInputError, match="group_size 48 does not divide the input width 64 of embedding.weight: choose a divisor of 64 such as 32"):
        export_model(network(), tmp_path / "b", bits=4, group_size=48)
    # Any network exports now (see test_every_network_round_trips_through_an_export); one still under pruning does not.
    pruned = network()
    prune.l1_unstructured(pruned.lstm, "weight_hh_l0", amount=0.5)
    with pytest.raises(LMInputError, match=r"LSTMNetwork still holds pruning masks \(lstm\.weight_hh_l0_orig\).*plain_copy"):
        export_model(pruned, tmp_path / "c", bits=8)
    assert list(tmp_path.iterdir()) == []


def window(inputs: torch.Tensor, targets: torch.Tensor) -> Batch:
    """A whole window of token ids, as StreamWindows yields it: its divisor is its number of target tokens."""
    return Batch(inputs, targets, 0, inputs.size(0), inputs.size(1), targets.numel())


def test_perplexity_carries_the_hidden_state_and_weights_tokens():
    net = network(tie=False, vocab=50, dim=16, layers=1)
    with torch.no_grad():
        net.decoder.weight.zero_()
        net.decoder.bias.zero_()
    windows = [window(torch.randint(0, 50, (2, n)), torch.randint(0, 50, (2, n))) for n in (5, 5, 3)]
    assert perplexity(net, windows) == pytest.approx(50.0, rel=1e-6)  # uniform logits: perplexity = vocabulary size
    trained = network(vocab=50, dim=16, layers=1)
    ids = torch.randint(0, 50, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = trained(ids[:, :-1])
        whole = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1)).exp()
    pieces = [window(ids[:, s : min(s + 5, 13)], ids[:, s + 1 : min(s + 6, 14)]) for s in range(0, 13, 5)]
    assert perplexity(trained, pieces) == pytest.approx(float(whole), rel=1e-5)
    assert perplexity(trained, pieces, max_batches=1) != pytest.approx(float(whole), rel=1e-3)


def random_bags(streams: int, time: int, vocab: int, seed: int) -> Bags:
    """Segments as CSR rows, as in tests/test_bag.py (one empty segment included)."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randint(0, 3, (streams * time, vocab), generator=g) * (torch.rand(streams * time, vocab, generator=g) < 0.2)
    dense[1] = 0
    rows, cols = dense.nonzero(as_tuple=True)
    offsets = torch.zeros(streams * time + 1, dtype=torch.int32)
    offsets[1:] = torch.bincount(rows, minlength=streams * time).cumsum(0)
    return Bags(cols.int(), offsets, dense[rows, cols].float(), streams)


def _built(kind: str):
    """``(network, a fresh instance for load_exported(network=...) or None when the manifest suffices, inputs)``."""
    torch.manual_seed(0)
    if kind == "LSTMNetwork":
        return network(tie=True, vocab=120, dim=32, layers=2), None, torch.randint(0, 120, (3, 9), generator=torch.Generator().manual_seed(1))
    if kind == "BagLSTMNetwork":
        net = BagLSTMNetwork(90, embedding_dim=32, hidden_dim=32, num_layers=2, dropout=0.0, tie_weights=True, bag_weighting="mean").eval()
        with torch.no_grad():
            net.decoder.bias.uniform_(-0.1, 0.1)
        return net, None, random_bags(3, 5, 90, seed=1)
    from gru_model import GRUNetwork

    net = GRUNetwork(80, 32, 48, 2).eval()
    return net, GRUNetwork(80, 32, 48, 2), torch.randint(0, 80, (3, 9), generator=torch.Generator().manual_seed(1))


def _fake_quantized_copy(net: torch.nn.Module, bits: int, group_size: int) -> torch.nn.Module:
    """A copy whose floating 2-D tensors (embedding, recurrent and decoder matrices) carry the quantization rule."""
    quantized = copy.deepcopy(net)
    state = {name: fake_quantize(t, bits, group_size) if t.is_floating_point() and t.dim() == 2 else t for name, t in net.state_dict().items()}
    quantized.load_state_dict(state)
    return quantized.eval()


@pytest.mark.parametrize("kind", ["LSTMNetwork", "BagLSTMNetwork", "GRUNetwork"])
def test_every_network_round_trips_through_an_export(tmp_path, monkeypatch, kind):
    net, instance, inputs = _built(kind)

    def load(folder: Path) -> torch.nn.Module:
        network = None if instance is None else copy.deepcopy(instance)
        return load_exported(folder, network=network)

    with torch.no_grad():
        reference, _ = net(inputs)
        # float32: the state dict as it is, ties stored once; logits exactly those of the network.
        report = export_model(net, tmp_path / "float32", bits=None)
        loaded = load(tmp_path / "float32")
        assert type(loaded) is type(net) and not loaded.training
        assert_close(loaded(inputs)[0], reference, rtol=0, atol=0)
        manifest = json.loads((tmp_path / "float32" / "manifest.json").read_text())
        assert manifest["version"] == 2 and manifest["network"]["class"] == kind
        assert manifest["network"]["config"] == getattr(net, "config", None)
        tied = kind != "GRUNetwork"
        assert manifest["ties"] == ({"decoder.weight": "embedding.weight"} if tied else {})
        assert ("decoder.weight" in report["tensors"]) != tied
        if tied:
            assert loaded.decoder.weight is loaded.embedding.weight

        # int8: every floating 2-D tensor quantized by the rule; logits exactly those of the fake-quantized network.
        report = export_model(net, tmp_path / "int8", bits=8)
        if kind == "LSTMNetwork":
            expected_net = copy.deepcopy(net)
            enable_fake_quantization(expected_net, 8)
        else:  # enable_fake_quantization knows nn.Embedding/Linear/LSTM only: the rule on a copy's state dict
            expected_net = _fake_quantized_copy(net, 8, 32)
        expected, _ = expected_net(inputs)
        assert (expected - reference).abs().max() > 1e-4  # the quantization is visible: the comparison means something
        assert_close(load(tmp_path / "int8")(inputs)[0], expected, rtol=0, atol=0)
        matrices = {n for n, t in net.state_dict().items() if t.is_floating_point() and t.dim() == 2 and n in report["tensors"]}
        assert len(matrices) >= 4 and all(report["tensors"][n]["format"] == "int8" for n in matrices), report["tensors"]
        assert all(t["format"] == "float32" for n, t in report["tensors"].items() if n not in matrices)

    if kind == "GRUNetwork":  # a fork's network is rebuilt from its recorded class path too (gru_model is importable)
        with torch.no_grad():
            assert_close(load_exported(tmp_path / "int8")(inputs)[0], expected, rtol=0, atol=0)

    # A manifest without a class path (an older export) never has its class imported: a real module that would leave
    # a trace, and two more names.
    probe_dir = tmp_path / "modules"
    (probe_dir / "evil_probe").mkdir(parents=True)
    marker = tmp_path / "imported"
    (probe_dir / "evil_probe" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Module:\n    pass\n")
    monkeypatch.syspath_prepend(str(probe_dir))
    imported: list[str] = []
    real_import, real_import_module = builtins.__import__, importlib.import_module
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: imported.append(name) or real_import(name, *a, **k))
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: imported.append(name) or real_import_module(name, *a, **k))
    manifest_path = tmp_path / "int8" / "manifest.json"
    for name in ("os.system", "tests.evil.Module", "evil_probe.Module"):
        manifest = json.loads(manifest_path.read_text())
        manifest["network"] = {"class": name, "config": {"command": "touch " + str(marker)}}
        manifest_path.write_text(sealed_manifest(manifest))
        with pytest.raises(LMInputError, match="pass network="):
            load_exported(tmp_path / "int8")
    monkeypatch.undo()
    assert not [n for n in imported if n.split(".")[0] in ("os", "tests", "evil_probe")], imported
    assert not marker.exists() and "evil_probe" not in sys.modules and "tests.evil" not in sys.modules


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bits", [8, 4])
def test_export_of_a_cuda_network_reproduces_its_fake_quantization_on_cuda(tmp_path, bits):
    # CUDA computes scale and reciprocal differently from the CPU: codes at -amax can round the other way there,
    # so the export quantizes on the network's device (seen on an H200: 0.2% of int8 codes differed before).
    net = network().cuda()
    export_model(net, tmp_path / "export", bits=bits)
    loaded = load_exported(tmp_path / "export").cuda()
    ids = IDS.cuda()
    with torch.no_grad():
        # The codes, exactly: every weight the export wrote is the one fake quantization computes on the GPU.
        stored = loaded.state_dict()
        for name, weight in net.state_dict().items():
            quantized = weight.is_floating_point() and weight.dim() == 2
            assert_close(stored[name], fake_quantize(weight, bits, 32) if quantized else weight, rtol=0, atol=0, msg=name)
        enable_fake_quantization(net, bits, 32)
        expected, _ = net(ids)
        logits, _ = loaded(ids)
    # The logits, within TF32's rounding: the same weights, but the fake-quantized LSTM hands cuDNN weights that are
    # not one flat buffer (packed at each call) and may get another algorithm than the loaded one's, and cuDNN may run
    # float32 RNNs in TF32 (torch.backends.cudnn.allow_tf32, on by default), whose 10-bit mantissa rounds each product's
    # inputs by up to 2**-11 (4.9e-4) relative. Logits here are below 1 in size: 1e-3 is a few such roundings, while
    # one code rounded the other way moves a weight by a whole quantization step, which the exact check above catches.
    assert_close(logits, expected, rtol=1e-3, atol=1e-3)
