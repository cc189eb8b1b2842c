"""Data in: text sources, NLTK preprocessing, the vocabulary and its cache, and the stream windows both paths share."""

from lm_lightning.data.bag import BagDataModule, BagRows
from lm_lightning.data.base import StreamDataModule
from lm_lightning.data.batch import Bags, Batch
from lm_lightning.data.preprocessing import Preprocessor
from lm_lightning.data.sources import Corpus, load_corpus
from lm_lightning.data.tokens import TokenDataModule
from lm_lightning.data.vocabulary import Vocabulary
from lm_lightning.data.windows import StreamWindows, TokenRows, batchify

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
