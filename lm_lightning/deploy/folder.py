"""An ONNX export folder, checked before ONNX Runtime reads a byte of its graph, then its session against the manifest.

An export folder is untrusted input, read as ``export/checks.py`` reads a safetensors export: the manifest (a regular
file of bounded size, JSON, format, version, its seal, field types), the files (a fixed list of names, each a regular
file (``lstat``: no link, also none leading out of the folder), size and SHA-256 as listed, nothing else in the folder),
then the session ONNX Runtime builds from the graph: it must refuse a damaged graph itself, its floating initializers
must be finite, and the inputs and outputs it declares must be those the manifest describes, so that feeding ``ids``
and the state cannot fail later. Every failure is one :class:`LMInputError` naming the folder and the fix.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnxruntime as ort

from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.deploy.layout import (
    GOOD_CHECKPOINT,
    MANIFEST,
    MANIFEST_SHA256,
    MODEL,
    ONNX_FORMAT,
    ONNX_VERSION,
    VOCAB,
    seal_broken,
)
from lm_lightning.deploy.session import open_session
from lm_lightning.errors import LMInputError
from lm_lightning.io import file_sha256, is_sha256

MAX_MANIFEST_BYTES = 16 << 20  # as export/checks.py: a manifest is a few KiB; a larger one is refused unread
FLOAT, INT64 = "tensor(float)", "tensor(int64)"


class NotAnOnnxExport(Exception):
    """Why a folder is not a readable ONNX export; :func:`open_export` turns it into the user's sentence, ending with
    ``fix``."""

    def __init__(self, why: str, fix: str = "export the model again") -> None:
        super().__init__(why)
        self.fix = fix


@dataclass
class OnnxExport:
    folder: Path
    manifest: dict
    session: ort.InferenceSession
    vocab: Optional[Vocabulary]  # None when the export was written without one (``export_onnx(vocab=None)``)


def open_export(folder: str | Path, threads: int = 1) -> OnnxExport:
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise NotAnOnnxExport("it does not exist" if not folder.exists() else "it is not a folder")
        manifest = read_manifest(folder)
        check_files(folder, manifest["files"])
        vocab = _vocabulary(folder / VOCAB) if VOCAB in manifest["files"] else None
        try:
            session = open_session(folder / MODEL, threads)
        except Exception as err:  # ONNX Runtime's own check of the graph: InvalidProtobuf, Fail, InvalidGraph, ...
            raise NotAnOnnxExport(f"ONNX Runtime refuses {MODEL} ({_one_line(err)})") from None
        check_weights(folder / MODEL)  # after ONNX Runtime accepted the file: its structure is sound
        check_session(session, manifest["graph"], vocab)
    except NotAnOnnxExport as why:
        raise LMInputError(f"{folder} is not a readable lm_lightning ONNX export: {why}; {why.fix}.") from None
    except OSError as err:  # a file that cannot be opened (permissions) or vanished while it was read
        name = Path(err.filename).name if err.filename else "a file"
        raise LMInputError(
            f"{folder} is not a readable lm_lightning ONNX export: {name} cannot be read ({err.strerror}); "
            "check its permissions or export the model again."
        ) from None
    return OnnxExport(folder, manifest, session, vocab)


def is_onnx_export(folder: str | Path) -> bool:
    """Whether ``folder`` is meant as an ONNX export (its graph is there, or its manifest says so): the commands run
    it with ONNX Runtime, and any other folder with the torch loader, which names what is wrong with it."""
    folder = Path(folder)
    if os.path.lexists(folder / MODEL):
        return True
    try:
        return read_manifest(folder)["format"] == ONNX_FORMAT
    except (NotAnOnnxExport, OSError):
        return False


def read_manifest(folder: Path) -> dict:
    """The manifest, its format and version, and the types of every field this package reads from it."""
    path = folder / MANIFEST
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise NotAnOnnxExport(f"{MANIFEST} is missing") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
        raise NotAnOnnxExport(f"{MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise NotAnOnnxExport(f"{MANIFEST} cannot be read as JSON ({_one_line(err)})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ONNX_FORMAT or manifest.get("version") != ONNX_VERSION:
        found = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
        raise NotAnOnnxExport(f"its manifest is {found}, this version reads ({ONNX_FORMAT!r}, {ONNX_VERSION})")
    if seal_broken(manifest):
        raise NotAnOnnxExport(f"{MANIFEST} does not match its own {MANIFEST_SHA256}: it was edited or damaged after the export")
    bits, group_size = manifest.get("bits"), manifest.get("group_size")
    if bits not in (None, 4, 8) or isinstance(bits, bool) or not _positive_int(group_size):
        raise NotAnOnnxExport(f"its manifest declares bits {bits!r} and group_size {group_size!r}")
    for key in ("graph", "files", "metadata"):
        if not isinstance(manifest.get(key), dict):
            raise NotAnOnnxExport(f"its manifest's {key!r} is not a JSON object")
    graph = manifest["graph"]
    if not (isinstance(graph.get("ids"), str) and isinstance(graph.get("logits"), str) and _positive_int(graph.get("vocab_size"))):
        raise NotAnOnnxExport("its manifest's graph does not name its ids and logits and its vocabulary size")
    if not isinstance(graph.get("state"), list) or not all(_is_state(s) for s in graph["state"]):
        raise NotAnOnnxExport("its manifest's graph state is not a list of inputs, outputs, shapes and batch axes")
    if not all(isinstance(graph.get(key), str) for key in ("top_k", "top_logits", "top_ids")):
        raise NotAnOnnxExport("its manifest's graph does not name its top_k input and its top_logits and top_ids outputs")
    return manifest


def check_files(folder: Path, files: dict) -> None:
    """Only the files an ONNX export writes, each listed with its size and hash, nothing else in the folder.

    Names are compared with a fixed list, so no name reaches outside the folder (``../``, absolute paths), and
    ``lstat`` refuses a link, also one to a file outside: ONNX Runtime would follow it.
    """
    for name, entry in files.items():
        if name not in (MODEL, VOCAB):
            raise NotAnOnnxExport(f"its manifest lists {name!r}, not a file an ONNX export holds ({MODEL}, {VOCAB})")
        if not isinstance(entry, dict) or not _positive_int(entry.get("bytes")) or not is_sha256(entry.get("sha256")):
            raise NotAnOnnxExport(f"its manifest's entry for {name} has no byte count and SHA-256")
    if MODEL not in files:
        raise NotAnOnnxExport(f"its manifest does not list {MODEL}")
    present = {entry.name for entry in os.scandir(folder)} - {MANIFEST}
    if present - set(files):
        raise NotAnOnnxExport(
            f"{sorted(present - set(files))[0]} is in the folder but not in the manifest, which must list and hash every file"
        )
    for name, entry in files.items():
        try:
            info = (folder / name).lstat()
        except FileNotFoundError:
            raise NotAnOnnxExport(f"{name} is missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise NotAnOnnxExport(f"{name} is not a regular file (a link, a folder or a device)")
        if info.st_size != entry["bytes"] or file_sha256(folder / name) != entry["sha256"]:
            raise NotAnOnnxExport(f"{name} does not match the manifest (size or SHA-256 differ): it was changed or damaged")


def check_session(session: ort.InferenceSession, graph: dict, vocab: Optional[Vocabulary]) -> None:
    """The graph's declared inputs and outputs against the manifest: ``ids`` int64 (batch, time), ``logits``
    (batch, time, vocab_size) float32, each state tensor by name and fixed dimensions, nothing else to feed."""
    inputs = {a.name: a for a in session.get_inputs()}
    outputs = {a.name: a for a in session.get_outputs()}
    expected = {graph["ids"]} | {s["input"] for s in graph["state"]}
    if set(inputs) != expected:
        raise NotAnOnnxExport(f"its graph takes {sorted(inputs)}, its manifest describes {sorted(expected)}")
    ids, logits = inputs[graph["ids"]], outputs.get(graph["logits"])
    if ids.type != INT64 or len(ids.shape) != 2:
        raise NotAnOnnxExport(f"its graph's {ids.name} is {ids.type} of rank {len(ids.shape)}, not int64 (batch, time)")
    vocab_size = graph["vocab_size"]
    if logits is None or logits.type != FLOAT or len(logits.shape) != 3 or logits.shape[-1] != vocab_size:
        found = f"{logits.type} {logits.shape}" if logits is not None else "missing"
        raise NotAnOnnxExport(f"its graph's {graph['logits']} is {found}, not float (batch, time, {vocab_size})")
    if vocab is not None and len(vocab) != vocab_size:
        raise NotAnOnnxExport(f"{VOCAB} holds {len(vocab)} tokens, the graph predicts {vocab_size}")
    # top_k has a default (an initializer of the same name): ONNX Runtime lists it apart from the inputs to feed.
    top_k = {a.name: a for a in session.get_overridable_initializers()}.get(graph["top_k"])
    top = [outputs.get(graph["top_logits"]), outputs.get(graph["top_ids"])]
    if top_k is None or top_k.type != INT64 or None in top or [t.type for t in top] != [FLOAT, INT64]:
        raise NotAnOnnxExport(f"its graph has no {graph['top_k']} input with a default and {graph['top_logits']} and {graph['top_ids']} outputs")
    for s in graph["state"]:
        for name, declared in ((s["input"], inputs.get(s["input"])), (s["output"], outputs.get(s["output"]))):
            fixed = [n for d, n in enumerate(s["shape"]) if d != s["batch_axis"]]
            found = declared and [n for d, n in enumerate(declared.shape) if d != s["batch_axis"]]
            if declared is None or declared.type != FLOAT or len(declared.shape) != len(s["shape"]) or found != fixed:
                what = f"{declared.type} {declared.shape}" if declared is not None else "missing"
                raise NotAnOnnxExport(f"its graph's state {name} is {what}, its manifest describes float {s['shape']}")


# --- the weights: no NaN or infinite initializer -----------------------------------------------------------------
# ONNX Runtime does not hand out a graph's initializers, and the onnx package would add 1.5 s and 17 MiB of imports
# (ml_dtypes) to every `generate`: the few fields needed are read from the protobuf wire format itself
# (https://protobuf.dev/programming-guides/encoding/), the file mapped, not read, and each float array checked in place.
# tests/test_export_consistency.py holds the arrays found here equal to the onnx package's.
FLOAT_TYPES = {1: "<f4", 10: "<f2", 11: "<f8"}  # TensorProto.DataType: FLOAT, FLOAT16, DOUBLE
GRAPH, INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
DATA_TYPE, FLOAT_DATA, NAME, RAW_DATA, DOUBLE_DATA, DATA_LOCATION = 2, 4, 8, 9, 10, 14  # TensorProto's fields


def check_weights(path: Path) -> None:
    """Every floating initializer of the graph finite: float32 weights, int8 / int4 weights' scales, biases."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            for name, dtype, (start, stop) in float_initializers(data):
                values = np.frombuffer(data, dtype, (stop - start) // np.dtype(dtype).itemsize, start)
                finite = bool(np.isfinite(values).all())
                del values  # the map closes only when no array looks into it
                if not finite:
                    raise NotAnOnnxExport(f"{MODEL} holds NaN or infinite values (in {name})", GOOD_CHECKPOINT)
        except (ValueError, IndexError, TypeError) as err:  # a field past its message's end, or of another wire type
            raise NotAnOnnxExport(f"{MODEL} cannot be read for its weights ({_one_line(err)})") from None


def float_initializers(data: Any) -> Iterator[tuple[str, str, tuple[int, int]]]:
    """``(name, numpy dtype, (start, stop))`` of each floating initializer's values in ``data``, a serialized
    ModelProto: its ``raw_data``, or its packed or single ``float_data`` / ``double_data``."""
    for _, graph in _fields(data, 0, len(data), GRAPH):
        for _, tensor in _fields(data, *graph, INITIALIZER):
            fields = list(_fields(data, *tensor))
            number = {n: v for n, v in fields if type(v) is int}
            name = next((bytes(data[slice(*v)]).decode("utf-8", "replace") for n, v in fields if n == NAME), "?")
            if number.get(DATA_LOCATION) == 1:  # EXTERNAL: values in another file, which no export writes
                raise NotAnOnnxExport(f"{MODEL} keeps the values of {name} in another file")
            dtype = FLOAT_TYPES.get(number.get(DATA_TYPE, 0))
            spans = {RAW_DATA: dtype, FLOAT_DATA: "<f4", DOUBLE_DATA: "<f8"}
            yield from ((name, spans[n], span) for n, span in fields if dtype and n in spans and type(span) is tuple)


def _fields(data: Any, start: int, stop: int, wanted: Optional[int] = None) -> Iterator[tuple[int, Any]]:
    """``(number, value)`` of each field of the message in ``data[start:stop]`` (of field ``wanted`` only, when
    given): the value an int (varint) or the ``(start, stop)`` of its bytes."""
    at = start
    while at < stop:
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire in (1, 2, 5):  # 64-bit, length-delimited, 32-bit
            size, at = (8, at) if wire == 1 else (4, at) if wire == 5 else _varint(data, at)
            value, at = (at, at + size), at + size
        else:
            raise ValueError(f"wire type {wire} of field {number}")
        if at > stop:
            raise ValueError(f"field {number} runs past its message")
        if wanted is None or number == wanted:
            yield number, value


def _varint(data: Any, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _vocabulary(path: Path) -> Vocabulary:
    try:
        return Vocabulary(json.loads(path.read_bytes())["itos"])
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # LMInputError is a ValueError
        raise NotAnOnnxExport(f"{VOCAB} is not a vocabulary ({_one_line(err)})") from None


def _is_state(s: Any) -> bool:
    if not isinstance(s, dict) or not isinstance(s.get("input"), str) or not isinstance(s.get("output"), str):
        return False
    shape, axis = s.get("shape"), s.get("batch_axis")
    return (
        isinstance(shape, list)
        and type(axis) is int
        and 0 <= axis < len(shape)
        and all((n is None) == (d == axis) and (n is None or _positive_int(n)) for d, n in enumerate(shape))
    )


def _positive_int(value: Any) -> bool:
    return type(value) is int and value >= 1


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 200 else line[:200] + "..."
