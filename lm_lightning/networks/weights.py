"""The weight matrices that weight-level strategies act on, found in any network's modules (``networks/contract.py``
asks nothing for them): every ``nn.Embedding``, ``nn.EmbeddingBag``, ``nn.Linear`` and ``nn.RNNBase`` (LSTM, GRU, RNN),
with a matrix that two modules share (a tied decoder) named once. Pruning uses them; so can a fork's strategy.
"""

from __future__ import annotations

from torch import nn


def prunable_weights(network: nn.Module) -> tuple[dict[str, tuple[nn.Module, str]], dict[str, tuple[nn.Module, str, str]]]:
    """Weight matrices of the embeddings, linear layers and RNNs of ``network``, by name.

    Returns ``(targets, mirrors)``. ``mirrors`` holds the tensors that *are* another one (a decoder tied to the
    embedding), as ``name -> (module, attribute, name of the target it is)``; ``targets`` holds all others.
    """
    targets: dict[str, tuple[nn.Module, str]] = {}
    mirrors: dict[str, tuple[nn.Module, str, str]] = {}
    seen: dict[int, str] = {}
    for prefix, module in network.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.Linear)):
            names = ["weight"]
        elif isinstance(module, nn.RNNBase):  # weight_ih_l{k}, weight_hh_l{k} (and _reverse, weight_hr_l{k})
            names = [n for n in module._flat_weights_names if n.startswith("weight")]
        else:
            continue
        for attr in names:
            name = f"{prefix}.{attr}" if prefix else attr
            # Under torch's pruning the Parameter is renamed ``<attr>_orig``; it is still the same object.
            param = module._parameters.get(attr, module._parameters.get(f"{attr}_orig"))
            if param is None:
                continue
            if id(param) in seen:
                mirrors[name] = (module, attr, seen[id(param)])
            else:
                seen[id(param)] = name
                targets[name] = (module, attr)
    return targets, mirrors


def pruned_count(module: nn.Module, attr: str) -> int:
    mask = getattr(module, f"{attr}_mask", None)
    return 0 if mask is None else int((mask == 0).sum())
