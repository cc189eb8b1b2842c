"""What TensorBoard's HPARAMS tab shows for a run: one row of flat, readable settings and the figures to sort by.

Lightning logs a module's ``save_hyperparameters`` as they are: LightningCLI's ``_class_path`` and ``_instantiator``,
the sampling settings, and none of what tells two runs apart -- optimizer, schedule, data, precision, memory
strategies -- which live in other objects. :func:`run_hparams` reads them from the objects of a started fit (so a
notebook's ``Trainer`` gets the same row as the CLI), the systems log it once at fit start (``systems/base.py``) in
place of Lightning's, and these figures fill the row as they become known:

* ``hp/best_val_ppl``: best validation perplexity so far (every validation);
* ``hp/test_ppl``: test perplexity of a checkpoint (``test``, which logs into the run it belongs to);
* ``hp/export_test_ppl``: the export's test perplexity, measured on the export as loaded (its integer weights);
* ``hp/peak_memory_mib``: peak training memory -- on a GPU the CUDA caching allocator's peak reserved memory, else the
  memory monitor's process peak RSS when it runs, else the process's peak RSS (Linux) -- at the end of fit;
* ``hp/export_mib``: the export's files, when the run exports.

The first five columns, capitalized so that they sort first, are the ones TensorBoard shows until a reader picks
others: ``Batch`` (streams x bptt), ``Corpus`` (source and tokenizer), ``Memory strategies`` (e.g. ``bf16-mixed +
micro-batches of 8 + pruning 80% + QAT int8``), ``Optimizer`` (class, learning rate, schedule) and ``Precision``.

The memory strategies describe themselves through their contract (``callbacks/strategy.py``: ``name``, ``label()``,
``hparams()``), so a fork's own strategy gets its columns and its words in "Memory strategies" with nothing to add
here; the export step describes its format the same way. The network's settings are read from the system's
configuration (``network/class`` and ``network/<argument>``), whatever the network.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from lm_lightning.callbacks.export import Export
from lm_lightning.callbacks.strategy import memory_strategies

METRICS = ("hp/best_val_ppl", "hp/test_ppl", "hp/export_test_ppl", "hp/peak_memory_mib", "hp/export_mib")
# How a run samples text at validation, and where it caches: not something that tells training runs apart.
SAMPLING = {"sample_length", "max_new_tokens", "temperature", "top_k", "seed", "prompt", "num_prompts", "vocab_size", "cache_dir"}
_PRIMITIVE = (bool, int, float, str)


def _flat(value: Any) -> Any:
    """A value TensorBoard can show in a column: numbers, text and booleans as they are, anything else as text."""
    if value is None:
        return "none"
    if isinstance(value, bool):  # TensorBoard would show 1.0 and 0.0
        return str(value).lower()
    if isinstance(value, _PRIMITIVE):
        return value
    return str(value)


def run_hparams(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """The flat settings of a fit: five headline columns, then ``section/name`` -> value (see the module docstring)."""
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    configs = trainer.lr_scheduler_configs
    scheduler = type(configs[0].scheduler).__name__ if configs else "none"
    data = trainer.datamodule
    data_hparams = dict(getattr(data, "hparams", {}))
    labels = strategy_labels(trainer)
    details: dict[str, Any] = {"model/class": type(module).__name__}
    for key, value in module.hparams.items():
        if not key.startswith("_") and key not in SAMPLING and (value is None or isinstance(value, _PRIMITIVE)):
            details[f"model/{key}"] = _flat(value)
    network = module.hparams.get("network")
    if isinstance(network, dict) or hasattr(network, "get"):  # {"class_path", "init_args"} (LightningCLI's or ours)
        details["network/class"] = str(network.get("class_path", "?")).rpartition(".")[2]
        for key, value in dict(network.get("init_args") or {}).items():
            if key not in SAMPLING and (value is None or isinstance(value, _PRIMITIVE)):
                details[f"network/{key}"] = _flat(value)
    details["model/parameters"] = sum(p.numel() for p in module.parameters())
    if optimizer is not None:
        details["optimizer/class"] = type(optimizer).__name__
        for key in ("lr", "weight_decay", "momentum", "eps"):
            if isinstance(optimizer.defaults.get(key), _PRIMITIVE):
                details[f"optimizer/{key}"] = optimizer.defaults[key]
    details["optimizer/lr_scheduler"] = scheduler
    if data is not None:
        details["data/class"] = type(data).__name__
        for key, value in data_hparams.items():
            if not key.startswith("_") and key not in SAMPLING and (value is None or isinstance(value, _PRIMITIVE)):
                details[f"data/{key}"] = _flat(value)
        if getattr(data, "vocab_size", None) is not None:
            details["data/vocab_size"] = data.vocab_size
    details.update(
        {
            "trainer/precision": str(trainer.precision),
            "trainer/max_epochs": _flat(trainer.max_epochs),
            "trainer/accumulate_grad_batches": trainer.accumulate_grad_batches,
            "trainer/gradient_clip_val": _flat(trainer.gradient_clip_val),
            "trainer/world_size": trainer.world_size,
        }
    )
    for strategy in memory_strategies(trainer):
        name = strategy.name or type(strategy).__name__
        details.update({f"{name}/{k}": _flat(v) for k, v in strategy.hparams().items()})
        labels += [strategy.label()] if strategy.label() else []
    for step in (c for c in trainer.callbacks if isinstance(c, Export)):
        details.update({f"export/{k}": _flat(v) for k, v in step.hparams().items()})
    # TensorBoard's HPARAMS tab orders the columns by name and shows the first five until you pick others: these five
    # sort first (capitals come before lower case) and say at a glance what a run was.
    lr = optimizer.defaults.get("lr") if optimizer is not None else None
    headline = {
        "Batch": f"{data_hparams.get('batch_size', '?')} x {data_hparams.get('bptt', '?')}",
        "Corpus": f"{data_hparams.get('source', '?')} ({data_hparams.get('tokenizer', '?')})",
        "Memory strategies": " + ".join(labels) or "none",
        "Optimizer": (f"{type(optimizer).__name__} lr {lr:g}" if isinstance(lr, (int, float)) else type(optimizer).__name__)
        + ("" if scheduler == "none" else f", {scheduler}")
        if optimizer is not None
        else "none",
        "Precision": str(trainer.precision),
    }
    return {**headline, **details}


def strategy_labels(trainer: L.Trainer) -> list[str]:
    """The memory levers that are settings of the trainer or the optimizer rather than callbacks."""
    labels = [] if str(trainer.precision) in ("32-true", "32") else [str(trainer.precision)]
    if trainer.optimizers and not type(trainer.optimizers[0]).__module__.startswith("torch.optim"):
        labels.append(type(trainer.optimizers[0]).__name__)  # an optimizer-state choice (torchao's 8-bit AdamW, ...)
    return labels


def nan_metrics() -> dict[str, float]:
    """The figures declared to the HPARAMS tab at fit start, before any is known."""
    return dict.fromkeys(METRICS, math.nan)
