"""The systems: LightningModules that train a network over stream windows (the networks live in ``networks/``)."""

from lm_lightning.systems.bag import BagLanguageModel
from lm_lightning.systems.base import StreamSystem, detach_hidden
from lm_lightning.systems.tokens import LanguageModel

__all__ = ["BagLanguageModel", "LanguageModel", "StreamSystem", "detach_hidden"]
