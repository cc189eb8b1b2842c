"""Running an ONNX export without torch or Lightning in the process: ONNX Runtime, numpy and the vocabulary file.

    layout.py    the folder an ONNX export is: file names, the manifest's format and version (shared with the writer)
    session.py   the ONNX Runtime session: the one place that sets how the graph is run (shared with the writer)
    folder.py    an export folder checked before ONNX Runtime reads it, and its session against the manifest
    sampling.py  the next token in numpy (greedy, temperature, top-k) and the checks of the sampling flags
    scoring.py   StreamWindows' windows and the perplexity's sum in numpy
    runtime.py   OnnxModel: generate and score on an ONNX export
    commands.py  `generate` and `score`: ONNX Runtime for an ONNX export, the torch loader (imported then) otherwise

Nothing is imported here: ``python -m lm_lightning generate`` on an ONNX export imports only what it runs
(``tests/test_deploy.py`` runs it and lists the modules).
"""
