"""The networks: plain ``nn.Module``s that know nothing about Lightning (the systems in ``systems/`` train them).

The contract every network keeps, the template's and a fork's, is written once in ``networks/contract.py``.
"""

from lm_lightning.networks.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from lm_lightning.networks.bag import BagLSTMNetwork
from lm_lightning.networks.lstm import LSTMNetwork

# The networks an export is rebuilt into by name, without an import (``export/rebuild.py``); any other network is
# imported from the class path its manifest records.
NETWORKS = {"LSTMNetwork": LSTMNetwork, "BagLSTMNetwork": BagLSTMNetwork}
# The layers a memory strategy puts in place of a network's modules, likewise by class path without an import.
MODULES = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in (AdaptiveEmbedding, AdaptiveLogSoftmax)}

__all__ = ["MODULES", "NETWORKS", "AdaptiveEmbedding", "AdaptiveLogSoftmax", "BagLSTMNetwork", "LSTMNetwork"]
