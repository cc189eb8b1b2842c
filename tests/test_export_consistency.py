"""An export whose parts disagree is refused as a whole, before use, in one sentence; one that cannot be whole is never
written. Both formats, through ``generate`` / ``score`` (exit status 2) or the writers (LMInputError): a vocabulary of
another size than the network, a manifest edited after the export or holding text settings no data module writes, NaN
or infinite weights (refused at export too), a full disk (the previous export intact, no temporary left). The ONNX
reader of initializers (``deploy/folder.py``) is held equal to the onnx package's."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_deploy import one_sentence

from lm_lightning.__main__ import main
from lm_lightning.data import TokenDataModule, Vocabulary
from lm_lightning.data.preprocessing import Preprocessor, tokenize_lines
from lm_lightning.deploy.folder import float_initializers
from lm_lightning.deploy.layout import GOOD_CHECKPOINT, MANIFEST_SHA256, sealed_manifest
from lm_lightning.errors import LMInputError
from lm_lightning.export.onnx_writer import export_onnx
from lm_lightning.export.writer import export_model, export_network
from lm_lightning.networks import LSTMNetwork

LINES = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."]
SETTINGS = TokenDataModule(eval_batch_size=2, bptt=4).export_settings()  # what the export step writes as metadata["text"]
FORMATS = ["safetensors", "onnx"]
NAMES = {"safetensors": "lm_lightning export", "onnx": "lm_lightning ONNX export"}


def vocabulary() -> Vocabulary:
    return Vocabulary.build(Counter(tokenize_lines("\n".join(LINES), Preprocessor(), False)))  # 12 tokens


def network(seed: int = 0, width: int = 16) -> LSTMNetwork:
    torch.manual_seed(seed)
    return LSTMNetwork(len(vocabulary()), width, width, 2, 0.0, True).eval()


def export(fmt: str, net: torch.nn.Module, folder: Path, bits=8) -> Path:
    metadata = {"text": SETTINGS}
    if fmt == "onnx":
        export_onnx(net, folder, bits, 8, vocabulary(), metadata, accuracy_level=0)
    else:
        export_model(net, folder, bits, 8, vocabulary(), metadata)
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("consistency")
    return {fmt: export(fmt, network(), root / fmt) for fmt in FORMATS}


def copy_of(exports: dict, fmt: str, tmp_path: Path) -> Path:
    folder = tmp_path / fmt
    folder.mkdir()
    for file in exports[fmt].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def reseal(folder: Path, change=None) -> None:
    """What a careful tamperer does: the manifest changed, every file's size and hash listed anew, the seal recomputed."""
    manifest = json.loads((folder / "manifest.json").read_text())
    if change:
        change(manifest)
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(sealed_manifest(manifest))


# --- the vocabulary against the network --------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("size", [10, 14])
def test_a_vocabulary_of_another_size_than_the_network_is_refused(exports, tmp_path, capsys, fmt, size):
    folder = copy_of(exports, fmt, tmp_path)
    itos = vocabulary().itos
    (folder / "vocab.json").write_text(json.dumps({"itos": (itos + ["zebra", "yak"])[:size]}))
    reseal(folder)
    (tmp_path / "text.txt").write_text("\n".join(LINES * 4))
    predicts = "the graph predicts" if fmt == "onnx" else "the network predicts"
    for args in (["generate", str(folder)], ["score", str(folder), str(tmp_path / "text.txt")]):
        err = one_sentence(capsys, args)  # before: IndexError (generate), a wrong perplexity and exit 0 (score)
        assert err == f"error: {folder} is not a readable {NAMES[fmt]}: vocab.json holds {size} tokens, {predicts} 12; export the model again."


# --- the manifest: sealed, its text settings those a data module's flags take ------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_manifest_edited_after_the_export_is_refused_and_an_older_unsealed_one_still_loads(exports, tmp_path, capsys, fmt):
    folder = copy_of(exports, fmt, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest[MANIFEST_SHA256] == hashlib.sha256(
        json.dumps({k: v for k, v in manifest.items() if k != MANIFEST_SHA256}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    edited = (folder / "manifest.json").read_text().replace('"lowercase": true', '"lowercase": false')
    (folder / "manifest.json").write_text(edited)
    err = one_sentence(capsys, ["generate", str(folder)])  # before: generated with the edited setting, exit 0
    assert err == (
        f"error: {folder} is not a readable {NAMES[fmt]}: manifest.json does not match its own manifest_sha256: it was "
        "edited or damaged after the export; export the model again."
    )
    # An export written before the seal existed has none: read as before (the seal secures no content: see layout.py).
    del manifest[MANIFEST_SHA256]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    main(["generate", str(folder), "--max-new-tokens", "3"])
    assert capsys.readouterr().out.strip()


TEXT_SETTINGS = [  # (change of metadata["text"], the clause of the sentence); before: TypeError, KeyError or exit 0
    (lambda t: t["preprocessing"].update(tokenizer="bogus"), "text setting tokenizer is 'bogus': --data.tokenizer takes treebank, whitespace or char"),
    (lambda t: t["preprocessing"].update(tokenizer=3), "text setting tokenizer is 3: --data.tokenizer takes treebank, whitespace or char"),
    (lambda t: t["preprocessing"].update(lowercase="yes"), "text setting lowercase is 'yes': --data.lowercase takes true or false"),
    (lambda t: t["preprocessing"].update(stemmer=["x"]), "text setting stemmer is ['x']: --data.stemmer takes porter, snowball or nothing"),
    (lambda t: t["preprocessing"].update(language="../x"), "text setting language is '../x': a language is a name such as english"),
    (lambda t: t["preprocessing"].update(bogus=1), "text preprocessing names ['bogus'], which no --data flag sets"),
    (lambda t: t.update(preprocessing="x"), "text settings hold no preprocessing object"),
    (lambda t: t.update(eval_batch_size="10"), "text setting eval_batch_size is '10': --data.eval_batch_size takes a positive integer"),
    (lambda t: t.update(bptt=0), "text setting bptt is 0: --data.bptt takes a positive integer"),
    (lambda t: t.update(keep_empty_lines="no"), "text setting keep_empty_lines is 'no': --data.keep_empty_lines takes true or false"),
    (lambda t: t.update(kind="pictures"), "text kind is 'pictures', not "),
]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", range(len(TEXT_SETTINGS)))
def test_text_settings_a_data_flag_would_refuse_are_one_sentence(exports, tmp_path, capsys, fmt, case):
    change, clause = TEXT_SETTINGS[case]
    folder = copy_of(exports, fmt, tmp_path)
    reseal(folder, lambda m: change(m["metadata"]["text"]))
    err = one_sentence(capsys, ["generate", str(folder)])
    assert err.startswith(f"error: {folder} is not a readable {NAMES[fmt]}: its manifest's {clause}"), err
    assert err.endswith("; export the model again.")


# --- NaN or infinite weights: never written, never loaded --------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_weights_are_never_exported_and_the_previous_export_stays(exports, tmp_path, fmt):
    folder = copy_of(exports, fmt, tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    diverged = network()
    with torch.no_grad():
        diverged.lstm.weight_hh_l1[3, :2] = torch.tensor([float("nan"), float("inf")])
    with pytest.raises(LMInputError) as error:
        export(fmt, diverged, folder)
    assert str(error.value) == (
        f"lstm.weight_hh_l1 holds NaN or infinite values (2 of 1,024: the training diverged), so nothing was written to "
        f"{folder}: {GOOD_CHECKPOINT}, or train again with a lower learning rate."
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and os.listdir(tmp_path) == [fmt]


# Quantized weights are checked through their scales (codes are integers): the safetensors case is in test_export.py's
# tampered matrix ("infinite scale"); here the ONNX one.
def test_an_infinite_scale_in_an_onnx_graph_is_refused_at_load(exports, tmp_path, capsys):
    folder = copy_of(exports, "onnx", tmp_path)
    model = onnx.load(str(folder / "model.onnx"))
    scale = next(t for t in model.graph.initializer if "scales" in t.name and t.data_type == TensorProto.FLOAT)
    values = numpy_helper.to_array(scale).copy()
    values.flat[0] = np.inf
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    reseal(folder)
    err = one_sentence(capsys, ["generate", str(folder)])  # before: loaded, and generated from infinite logits
    assert err == f"error: {folder} is not a readable lm_lightning ONNX export: model.onnx holds NaN or infinite values (in {scale.name}); {GOOD_CHECKPOINT}."


def test_the_onnx_weights_reader_finds_what_the_onnx_package_reads(exports, tmp_path):
    """Every encoding a floating initializer can have here: raw_data (the exporter's and numpy_helper's), packed
    float_data and double_data (helper.make_tensor), float16; and the integer ones skipped."""
    graph = onnx.load(str(exports["onnx"] / "model.onnx"))
    extra = [
        helper.make_tensor("packed", TensorProto.FLOAT, [3], [1.0, -2.5, 3.25]),
        helper.make_tensor("double", TensorProto.DOUBLE, [2], [0.5, np.inf]),
        numpy_helper.from_array(np.array([1.5, -0.0], np.float16), "half"),
        numpy_helper.from_array(np.array([7, 8], np.int64), "integers"),
    ]
    graph.graph.initializer.extend(extra)
    path = tmp_path / "model.onnx"
    path.write_bytes(graph.SerializeToString())
    expected = {t.name: numpy_helper.to_array(t).ravel() for t in graph.graph.initializer if t.data_type in (1, 10, 11)}
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        found = {name: np.frombuffer(data[a:b], dtype).copy() for name, dtype, (a, b) in float_initializers(data)}
    assert sorted(found) == sorted(expected) and len(found) >= 8
    for name, values in expected.items():
        np.testing.assert_array_equal(found[name], values, err_msg=name)


# --- a full disk ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_disk_leaves_the_previous_export_whole_and_no_temporary(small_disk, tmp_path, fmt):
    """A disk that holds one float32 export and not two: the second export, which is written beside the first before
    it replaces it, fails in one sentence and leaves the first as it was."""
    measured = export_network(network(width=48), tmp_path / "measured", None, 32, format=fmt)["folder"]
    pages = sum(math.ceil(p.stat().st_size / 4096) for p in Path(measured).iterdir())
    disk = small_disk(pages * 4 * 3 // 2)  # KiB: room for 1.5 exports
    folder = disk / "export"
    export_network(network(width=48), folder, None, 32, format=fmt)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(LMInputError) as error:  # before: a SafetensorError or OSError traceback
        export_network(network(seed=1, width=48), folder, None, 32, format=fmt)
    assert str(error.value) == (
        f"The disk holding {folder} is full (or its quota is): nothing was written and any earlier export there is "
        "unchanged; free some space there or choose another --export.folder."
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and os.listdir(disk) == ["export"]
