from lm_lightning.models.lstm import LSTMLanguageModel

__all__ = ["LSTMLanguageModel"]
