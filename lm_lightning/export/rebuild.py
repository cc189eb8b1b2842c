"""The network a manifest describes, built on the ``meta`` device (tensor names, shapes and dtypes, no memory for the
weights) so that ``checks.py`` can hold every entry of the export against it before a weight is read.

A memory strategy may have put its own layers in place of some of the network's modules (adaptive input and
softmax): the manifest records them (``modules``) and they are rebuilt the same way. Two kinds of network: the template's own (``networks.NETWORKS``, a fixed table, no import) and any other class named
by the manifest's ``class_path`` (a fork's network, or one injected with ``--model.network CLASS_PATH``), imported
from the environment and built from the recorded constructor arguments.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lm_lightning.errors import LMInputError
from lm_lightning.export.checks import one_line
from lm_lightning.export.format import NotAnExport, network_tensors
from lm_lightning.networks import MODULES, NETWORKS
from lm_lightning.networks.contract import replace_module

__all__ = ["build_network", "from_registry", "meta_network", "network_class"]


def from_registry(spec: dict) -> bool:
    """The manifest names one of the template's networks (by name, and by class path when it records one)."""
    cls = NETWORKS.get(spec["class"])
    return cls is not None and spec.get("class_path") in (None, f"{cls.__module__}.{cls.__qualname__}")


def network_class(folder: Path, spec: dict) -> type[nn.Module]:
    """The class the manifest names: from the template's table, or imported from its ``class_path``.

    The trust decision: a manifest is untrusted, and it may name any class path. Importing runs only code that is
    already importable here (installed, or on PYTHONPATH: what the user chose to run, as ``--model.network CLASS_PATH``
    does), never code from the export folder; the loader checks the weights' hashes before it gets here, the class
    must be an ``nn.Module`` subclass, and its constructor gets only the recorded arguments, checked against its
    signature. An export named without a class path (written before it was recorded) is never imported.
    """
    if from_registry(spec):
        return NETWORKS[spec["class"]]
    path = spec.get("class_path")
    if path is None:
        raise LMInputError(
            f"{folder} holds a {spec['class']} network without its class path, which load_exported cannot build from "
            f"the manifest: pass network=<a {spec['class']} built with the same settings>, or export it again."
        )
    return _import_module_class(folder, path)


def _import_module_class(folder: Path, path: str) -> type[nn.Module]:
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except Exception as err:  # ModuleNotFoundError, AttributeError, ValueError (no module), the module's own error
        raise LMInputError(
            f"{folder} holds a {path} network, which cannot be imported here ({type(err).__name__}: {one_line(err)}): "
            "install the package that defines it or put its folder on PYTHONPATH, then load the export again."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise NotAnExport(f"its network class_path {path!r} names {type(cls).__name__} {name!r}, not an nn.Module subclass")
    return cls


def _checked_arguments(cls: type[nn.Module], config: dict, what: str) -> None:
    """The recorded arguments fit ``cls``'s signature: known names, integers and booleans where it says so."""
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(config) - (set(config) if takes_any else set(params)))
    if NETWORKS.get(cls.__name__) is cls:
        unknown = sorted(set(unknown) | ({"dropout"} & set(config)))
    if unknown:
        raise NotAnExport(f"its {what} settings name {unknown}, which the export does not write for a {cls.__name__}")
    for key, value in config.items():
        annotation = params[key].annotation if key in params else None
        kind = {"int": int, "bool": bool}.get(getattr(annotation, "__name__", annotation))
        if kind is not None and type(value) is not kind:
            raise NotAnExport(f"its {what} setting {key} is {value!r}, not {'an integer' if kind is int else 'true or false'}")


def build_network(cls: type[nn.Module], config: dict[str, Any], modules: Optional[dict] = None, folder: Path = Path(".")) -> nn.Module:
    """``cls`` from the recorded arguments (the template's networks without dropout: the export runs in eval mode),
    then the layers a memory strategy put in place of some of its modules (``networks.contract.replace_module``:
    adaptive input and softmax), each put back as the strategy did (its ``attach``: tied again where it was)."""
    network = cls(**config, dropout=0.0) if NETWORKS.get(cls.__name__) is cls else cls(**config)
    for name, spec in (modules or {}).items():
        layer_cls = MODULES.get(spec["class_path"]) or _import_module_class(folder, spec["class_path"])
        _checked_arguments(layer_cls, spec["init_args"], f"{name} layer's")
        if not isinstance(getattr(network, name, None), nn.Module):
            raise NotAnExport(f"its manifest replaces the network's {name!r}, which a {cls.__name__} does not have")
        layer = layer_cls(**spec["init_args"])
        attach = getattr(layer, "attach", None)
        attach(network, name) if callable(attach) else replace_module(network, name, layer)
    return network


def meta_network(folder: Path, manifest: dict, max_elements: int) -> nn.Module:
    """The manifest's network built on the ``meta`` device from its class and checked settings, within a size ceiling."""
    spec = manifest["network"]
    cls, config = network_class(folder, spec), spec.get("config")
    if not isinstance(config, dict):
        raise LMInputError(
            f"{folder} holds a {spec['class']} network whose constructor arguments the export does not record: pass "
            f"network=<a {spec['class']} built with the same settings>, or give the network a `config` dict of its "
            "arguments (or network_init_args to export_network) and export it again."
        )
    _checked_arguments(cls, config, "network")
    # Building costs a loop per layer even on meta: a manifest cannot ask for more layers than tensors it lists.
    layers = config.get("num_layers", 1)
    if type(layers) is int and layers > len(manifest["tensors"]):
        raise NotAnExport(f"its network settings ask for {layers} layers, more than the tensors it lists")
    try:
        with torch.device("meta"):
            network = build_network(cls, config, spec.get("modules"), folder)
    except LMInputError as err:
        raise NotAnExport(f"its network settings are invalid ({str(err).rstrip('.')})") from None
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise NotAnExport(f"its network settings are invalid ({type(err).__name__}: {one_line(err)})") from None
    elements = sum(t.numel() for t in network_tensors(network)[0].values())
    if elements > max_elements:
        raise LMInputError(
            f"{folder} describes a {cls.__name__} of {elements:,} numbers ({4 * elements / 2**30:.1f} GiB as float32), "
            f"more than max_elements={max_elements:,}: pass a larger max_elements to load_exported if you trust this export."
        )
    return network
