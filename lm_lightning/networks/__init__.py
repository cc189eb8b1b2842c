"""The networks: plain ``nn.Module``s that know nothing about Lightning (the systems in ``systems/`` train them).

The contract every network keeps, the template's and a fork's, is written once in ``networks/contract.py``.
"""

from lm_lightning.networks.bag import BagLSTMNetwork
from lm_lightning.networks.lstm import LSTMNetwork

# The networks an export can be rebuilt into from its manifest alone (``export.load_exported``); a fork's network is
# loaded by passing an instance of it, so no class named inside an export file is ever imported.
NETWORKS = {"LSTMNetwork": LSTMNetwork, "BagLSTMNetwork": BagLSTMNetwork}

__all__ = ["NETWORKS", "BagLSTMNetwork", "LSTMNetwork"]
