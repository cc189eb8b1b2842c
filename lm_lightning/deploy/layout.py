"""What an ONNX export folder holds, written by ``export/onnx_writer.py`` and read by this package:

    folder/model.onnx      the network: ``ids`` (batch, time) int64 and its recurrent state in; ``logits``
                           (batch, time, vocab) and the new state out; int8/int4 weights as integer initializers
    folder/vocab.json      the vocabulary (the same file as a safetensors export's)
    folder/manifest.json   format and version, the graph's inputs and outputs and the state's shapes, the weights'
                           format, every file's size and SHA-256, how text was read, the export's own test perplexity

Torch-free: the writer imports these names, the runtime reads folders with them.
"""

from __future__ import annotations

ONNX_FORMAT, ONNX_VERSION = "lm_lightning.onnx", 1
MODEL, MANIFEST, VOCAB = "model.onnx", "manifest.json", "vocab.json"
IDS, LOGITS = "ids", "logits"  # the graph's token input and its logits output; the state's names are in the manifest
# Generation reads only the last step's k likeliest tokens: TopK inside the graph costs ONNX Runtime ~0.02 ms where
# numpy's argpartition over a 33k-word vocabulary took 0.37 ms, more than the whole int8 network. ``top_k`` is an
# input with a default (an initializer of the same name), so scoring need not feed it.
TOP_K, TOP_LOGITS, TOP_IDS = "top_k", "top_logits", "top_ids"
DEFAULT_TOP_K = 50
