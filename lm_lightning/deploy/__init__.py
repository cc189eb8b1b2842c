"""Running an ONNX export without torch or Lightning in the process: ONNX Runtime, numpy and the vocabulary file.

    layout.py   the folder an ONNX export is: file names, the manifest's format and version (shared with the writer)

Nothing is imported here: ``python -m lm_lightning generate`` on an ONNX export imports only what it runs.
"""
