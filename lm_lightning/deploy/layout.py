"""What an ONNX export folder holds, written by ``export/onnx_writer.py`` and read by this package:

    folder/model.onnx      the network: ``ids`` (batch, time) int64 and its recurrent state in; ``logits``
                           (batch, time, vocab) and the new state out; int8/int4 weights as integer initializers
    folder/vocab.json      the vocabulary (the same file as a safetensors export's)
    folder/manifest.json   format and version, the graph's inputs and outputs and the state's shapes, the weights'
                           format, every file's size and SHA-256, how text was read, the export's own test perplexity

Torch-free: the writer imports these names, the runtime reads folders with them. The manifest's seal
(``manifest_sha256``) is here too: both formats' manifests carry it, and both readers check it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

ONNX_FORMAT, ONNX_VERSION = "lm_lightning.onnx", 1
MODEL, MANIFEST, VOCAB = "model.onnx", "manifest.json", "vocab.json"
IDS, LOGITS = "ids", "logits"  # the graph's token input and its logits output; the state's names are in the manifest
# Generation reads only the last step's k likeliest tokens: TopK inside the graph costs ONNX Runtime ~0.02 ms where
# numpy's argpartition over a 33k-word vocabulary took 0.37 ms, more than the whole int8 network. ``top_k`` is an
# input with a default (an initializer of the same name), so scoring need not feed it.
TOP_K, TOP_LOGITS, TOP_IDS = "top_k", "top_logits", "top_ids"
DEFAULT_TOP_K = 50

# The manifest's own hash, a key inside it: the SHA-256 of its canonical JSON (sorted keys, no spaces, ASCII) without
# that key. Inside, not in a sidecar file: the folder keeps its three files and a copied manifest keeps its seal; of the
# content, not the bytes: the writer's indentation is no part of it. No key is involved, so it tells an edit or damage
# from the written manifest, not a careful forger (who can recompute it): what the manifest says is still checked
# against the files it describes (vocabulary against network, text settings against the flags, finite weights).
# A manifest without the key was written before it existed and is read as before: refusing every older export would
# make each user re-export and, for the reason just given, secure nothing.
MANIFEST_SHA256 = "manifest_sha256"


def manifest_digest(manifest: dict) -> str:
    content = {key: value for key, value in manifest.items() if key != MANIFEST_SHA256}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def sealed_manifest(manifest: dict) -> str:
    """The manifest's text as the writers write it: its content as a reader will parse it (``default=str``: paths
    and other objects in the metadata become strings first), then its seal, last."""
    content: dict[str, Any] = json.loads(json.dumps(manifest, default=str))
    content.pop(MANIFEST_SHA256, None)
    content[MANIFEST_SHA256] = manifest_digest(content)
    return json.dumps(content, indent=1)


def seal_broken(manifest: dict) -> bool:
    """Whether a parsed manifest's seal is there and does not match its content (an unsealed one is an older export)."""
    return MANIFEST_SHA256 in manifest and manifest[MANIFEST_SHA256] != manifest_digest(manifest)


# The fix for non-finite weights, said by both writers and both readers: exporting the same weights again cannot help.
GOOD_CHECKPOINT = (
    "export again from a good checkpoint, one saved before the training diverged "
    "(`python -m lm_lightning export -c RUN/config.yaml --ckpt_path CKPT`)"
)
