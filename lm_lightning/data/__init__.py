from lm_lightning.data.bow import BagWindows, BoWDataModule
from lm_lightning.data.datamodule import LMDataModule
from lm_lightning.data.preprocessing import Preprocessor
from lm_lightning.data.sources import Corpus, load_corpus
from lm_lightning.data.streams import StreamWindows, batchify
from lm_lightning.data.vocabulary import Vocabulary

__all__ = ["BagWindows", "BoWDataModule", "Corpus", "LMDataModule", "Preprocessor", "StreamWindows", "Vocabulary", "batchify", "load_corpus"]
