"""``estimate``'s probe: training steps of a copy of the run's system, with its precision and every memory strategy,
on random ids, measured phase by phase (forward, backward, optimizer step) with the allocator's count of bytes in use.

Each strategy puts the copy in its costliest state through its own ``probe()`` (the contract of
``callbacks/strategy.py``); the budget search of ``estimate.py`` turns the levers it knows (``LEVERS``).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lm_lightning.callbacks.chunked_loss import ChunkedLoss
from lm_lightning.callbacks.precision import bf16_lstm_supported
from lm_lightning.callbacks.recompute import Recomputation
from lm_lightning.callbacks.strategy import MemoryStrategy, memory_strategies
from lm_lightning.data.batch import Batch
from lm_lightning.memory.measure import PeakAllocated, allocated_bytes, human_bytes, storage_bytes
from lm_lightning.networks.contract import build_network, network_spec


@dataclass(frozen=True)
class Settings:
    """The knobs the budget search turns (the rest of the run stays as configured)."""

    micro_batch_size: int
    loss_chunk_size: int
    recompute_segments: int


@dataclass
class Phases:
    """Bytes over the steady state (parameters, gradients, optimizer state) in a training step of ``streams``
    streams: kept at the end of the forward pass, and the peak of the forward pass, backward and the optimizer step."""

    streams: int
    kept: int
    forward: int
    backward: int
    optimizer: int


def _probe_batch(streams: int, bptt: int, vocab: int, generator: torch.Generator) -> Batch:
    inputs = torch.randint(0, vocab, (streams, bptt), generator=generator)
    targets = torch.randint(0, vocab, (streams, bptt), generator=generator)
    return Batch(inputs, targets, first_stream=0, num_streams=streams, length=bptt, divisor=float(streams * bptt))


# The levers the budget search turns (the rest of the run stays as configured). A strategy of the same class given
# in the run is replaced by the search's setting of it.
LEVERS = {"chunked_loss": ChunkedLoss, "recompute": Recomputation}


class Probe:
    """Training steps of a copy of the run's model, with the run's precision and memory strategies, on random ids."""

    def __init__(self, model: Any, trainer: Any, vocab_size: int, bptt: int, eval_streams: int = 0) -> None:
        self.template, self.trainer, self.vocab_size, self.bptt = model, trainer, vocab_size, bptt
        self.strategies = memory_strategies(trainer)
        # As PrecisionGuard does in fit: oneDNN off where it has no bfloat16 LSTM (CPUs without AVX-512 BF16).
        self.onednn = torch.backends.mkldnn.enabled and ("16" not in str(trainer.precision) or bf16_lstm_supported())
        self.optimizer_note = ""  # set by measure(): state a low-bit optimizer keeps in float32
        self.eval_streams = eval_streams  # a validation window's streams, when a measurement runs one first (fastest.py)

    def strategies_for(self, settings: Settings) -> list[MemoryStrategy]:
        """The run's strategies with the levers set as ``settings`` says."""
        kept = [s for s in self.strategies if not isinstance(s, tuple(LEVERS.values()))]
        levers = [ChunkedLoss(settings.loss_chunk_size)] if settings.loss_chunk_size else []
        levers += [Recomputation(settings.recompute_segments)] if settings.recompute_segments else []
        return kept + levers

    def build(self, settings: Settings, extra: Sequence[MemoryStrategy] = (), precision: Any = None) -> tuple[Any, torch.optim.Optimizer]:
        """A copy with the strategies ``settings`` says, plus ``extra`` ones, under ``precision`` (a precision plugin;
        the run's own by default)."""
        model = copy.deepcopy(self.template)
        for strategy in [*self.strategies_for(settings), *extra]:
            strategy.probe(model)
        model = (precision or self.trainer.precision_plugin).convert_module(model)
        model.train()
        config = model.configure_optimizers()
        return model, config["optimizer"] if isinstance(config, dict) else config

    def step(self, model: Any, optimizer: torch.optim.Optimizer, streams: int, seed: int) -> Phases:
        batch = _probe_batch(streams, self.bptt, self.vocab_size, torch.Generator().manual_seed(seed))
        model._hidden.clear()  # a zero state, as at the start of an epoch
        start = allocated_bytes(torch.device("cpu"))
        with PeakAllocated() as forward, self.trainer.precision_plugin.forward_context():
            loss = model._loss(batch, "train")
        kept = allocated_bytes(torch.device("cpu")) - start
        optimizer.zero_grad(set_to_none=True)  # as Lightning: after the forward pass, before backward
        with PeakAllocated() as backward:
            loss.backward()
            del loss
        # torch.compile'd optimizers (torchao's 8-bit AdamW) cannot run under a Python dispatch mode: for them the
        # step's peak is its state and result, without the temporaries inside the compiled kernel.
        compiled = not type(optimizer).__module__.startswith("torch.optim")
        with PeakAllocated(enabled=not compiled) as step:
            clip, algorithm = self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm
            if clip and any(p.grad is not None and p.grad.is_sparse for p in model.parameters()):
                model.configure_gradient_clipping(optimizer, clip, algorithm)  # the system's sparse-aware rule
            elif clip and algorithm == "value":
                torch.nn.utils.clip_grad_value_(model.parameters(), clip)
            elif clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        return Phases(streams, kept, forward.peak - start, backward.peak - start, step.peak - start)

    def plain(self) -> Any:
        """A copy of the run's system with the network as configured, without the memory strategies' layers and hooks
        (what a strategy's speed factor is measured against); ``None`` for a network without a ``config``."""
        if getattr(self.template.network, "config", None) is None:
            return None
        model = copy.deepcopy(self.template)
        model.network = build_network(network_spec(self.template.network))
        model.loss_head = model.window_runner = None
        model = self.trainer.precision_plugin.convert_module(model).train()
        return model

    def tokens_per_second(self, settings: Settings, plain: bool = False, steps: int = 3) -> float:
        """Training tokens per second of a micro-batch step (forward, backward, optimizer step; the median of
        ``steps`` after one to warm up), timed without the memory measurement's dispatch mode."""
        if plain:
            model = self.plain()
            if model is None:
                return float("nan")
            config = model.configure_optimizers()
            optimizer = config["optimizer"] if isinstance(config, dict) else config
        else:
            model, optimizer = self.build(settings)
        n, times = settings.micro_batch_size, []
        with torch.backends.mkldnn.flags(enabled=self.onednn), torch.random.fork_rng(devices=[]):
            for seed in range(steps + 1):
                batch = _probe_batch(n, self.bptt, self.vocab_size, torch.Generator().manual_seed(seed))
                model._hidden.clear()
                start = time.perf_counter()
                with self.trainer.precision_plugin.forward_context():
                    loss = model._loss(batch, "train")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
        return n * self.bptt / statistics.median(times[1:])

    def measure(self, settings: Settings) -> tuple[dict[str, int], Phases, Phases, str]:
        """Steady-state bytes and steps of half the micro-batch and the whole one. Each size runs twice and the
        second is kept: the first step creates the gradients and optimizer state, and the first step of each shape
        allocates once what later steps reuse (oneDNN's primitive cache: ~2 MB on the default model)."""
        model, optimizer = self.build(settings)
        n = settings.micro_batch_size
        with torch.backends.mkldnn.flags(enabled=self.onednn):
            for seed, streams in enumerate((max(1, n // 2), n)):
                self.step(model, optimizer, streams, seed=seed)
            one, two = self.step(model, optimizer, max(1, n // 2), seed=2), self.step(model, optimizer, n, seed=3)
        params = list(model.parameters())
        # What a strategy keeps beside the parameters in the network's modules (pruning's masks and masked copies, a
        # fork's buffers): every tensor the modules hold that is not a parameter.
        extra = [t for m in model.network.modules() for t in vars(m).values() if isinstance(t, torch.Tensor)]
        extra += [b for b in model.network.buffers()]
        steady = {
            "params": storage_bytes(params),
            "pruning": max(0, storage_bytes([*params, *extra]) - storage_bytes(params)),
            "grads": storage_bytes(p.grad for p in params),
            "optimizer": storage_bytes(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)),
        }
        self.optimizer_note = block_size_note(optimizer)
        return steady, one, two, type(optimizer).__name__


def block_size_note(optimizer: torch.optim.Optimizer) -> str:
    """torchao's low-bit optimizers quantize a weight's state only when its size is a multiple of their ``block_size``
    (the rest stays float32, silently): at width 1500, none of a 2x1500 model's weights are, and "8-bit" AdamW keeps as
    much state as AdamW. Says so, with the block size that would quantize the most state bytes."""
    block_size = getattr(optimizer, "block_size", None)
    if not type(optimizer).__module__.startswith("torchao") or not isinstance(block_size, int):
        return ""
    plain = {}  # parameter size -> its float32 state bytes
    for param, state in optimizer.state.items():
        moments = [t for k, t in state.items() if k.startswith("exp_avg") and isinstance(t, torch.Tensor)]
        if param.numel() >= 4096 and moments and all(type(t) is torch.Tensor for t in moments):
            plain[param.numel()] = plain.get(param.numel(), 0) + storage_bytes(moments)
    if not plain:
        return ""
    best = max(range(32, block_size + 1), key=lambda d: (sum(b for n, b in plain.items() if n % d == 0), d))
    covered = sum(b for n, b in plain.items() if n % best == 0)
    fix = f" --model.optimizer.block_size {best} would quantize {human_bytes(covered)} of it." if covered else ""
    return (
        f"Note: {type(optimizer).__name__} keeps {human_bytes(sum(plain.values()))} of its state in float32: those weights' "
        f"sizes are not multiples of its block_size ({block_size}).{fix}"
    )
