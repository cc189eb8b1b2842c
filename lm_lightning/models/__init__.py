"""The networks: plain ``nn.Module``s that know nothing about Lightning (the systems in ``systems/`` train them)."""

from lm_lightning.models.bag import BagLSTMNetwork, Bags, bag_nll
from lm_lightning.models.lstm import LSTMNetwork

# The networks an export can be rebuilt into from its manifest alone (``export.load_exported``); a fork's network is
# loaded by passing an instance of it, so no class named inside an export file is ever imported.
NETWORKS = {"LSTMNetwork": LSTMNetwork, "BagLSTMNetwork": BagLSTMNetwork}

__all__ = ["NETWORKS", "BagLSTMNetwork", "Bags", "LSTMNetwork", "bag_nll"]
