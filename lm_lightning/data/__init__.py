"""Data in: text sources, NLTK preprocessing, the vocabulary and its cache, and the stream windows both paths share.

The names below are imported on first use (PEP 562), not when the package is: ``preprocessing``, ``vocabulary`` and
``sources`` are torch-free, and ``generate`` / ``score`` on an ONNX export import them in a process without torch,
which importing ``tokens`` or ``bag`` here would load.
"""

__all__ = [
    "BagDataModule",
    "BagRows",
    "Bags",
    "Batch",
    "Corpus",
    "Preprocessor",
    "StreamDataModule",
    "StreamWindows",
    "TokenDataModule",
    "TokenRows",
    "Vocabulary",
    "batchify",
    "load_corpus",
]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Every name at once, as the package did when it imported them eagerly; written as imports (not importlib) so
    # that tests/test_layout.py's import graph sees these edges.
    from lm_lightning.data.bag import BagDataModule, BagRows  # noqa: F401
    from lm_lightning.data.base import StreamDataModule  # noqa: F401
    from lm_lightning.data.batch import Bags, Batch  # noqa: F401
    from lm_lightning.data.preprocessing import Preprocessor  # noqa: F401
    from lm_lightning.data.sources import Corpus, load_corpus  # noqa: F401
    from lm_lightning.data.tokens import TokenDataModule  # noqa: F401
    from lm_lightning.data.vocabulary import Vocabulary  # noqa: F401
    from lm_lightning.data.windows import StreamWindows, TokenRows, batchify  # noqa: F401

    globals().update({key: value for key, value in locals().items() if key in __all__})
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
