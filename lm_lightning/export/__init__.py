"""The export of a trained network and everything that runs one, one module per job:

    format.py         the format on disk: file names, int4 packing, sparse layouts, which tensors are quantized
    quantization.py   the quantization rule (symmetric int8 per row / int4 groups), shared with QAT
    settings.py       the export's bits and group size, decided once from --export.* and the memory strategies
    writer.py         export_model / export_network: safetensors + manifest, a plain copy of a trained network
    checks.py         what the loader checks in a folder before it reads a weight
    rebuild.py        the network a manifest names, built on the meta device (template registry or class path)
    loader.py         load_exported: a checked folder back into a runnable network, float32 weights (int8/int4
                      codes dequantized)
    commands.py       an export folder alone: ExportedModel, `generate`, `score`

Nothing is imported here, so ``callbacks/quantization.py`` can import the rule without loading the writer.
"""
