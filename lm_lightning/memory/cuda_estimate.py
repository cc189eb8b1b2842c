"""``estimate`` for a run on a GPU, and MemoryMonitor's prediction when a fit starts on one: a run's
:class:`~lm_lightning.memory.cuda_plan.GpuRun` read from its objects, the prediction of ``cuda_steps.py``, and the
budget search turned by arithmetic (``MicroBatchAccumulation``'s micro-batch, ``ChunkedLoss``) instead of probe steps.

``cli.py`` builds the run's objects for a CPU (Lightning refuses ``--trainer.accelerator gpu`` where there is no CUDA)
and passes the precision and devices the user asked for; nothing here allocates on, or initializes, a GPU that the
process has not already initialized, except to read its name and compute capability where CUDA is present.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch.accelerators import CUDAAccelerator

from lm_lightning.callbacks.accumulation import MicroBatchAccumulation
from lm_lightning.callbacks.chunked_loss import DEFAULT_CHUNK_SIZE, ChunkedLoss
from lm_lightning.callbacks.strategy import memory_strategies
from lm_lightning.errors import LMInputError
from lm_lightning.memory.cuda_plan import PRECISIONS, CudaPlan, GpuRun, cublas_workspace_bytes
from lm_lightning.memory.cuda_steps import plan
from lm_lightning.memory.estimate import fit_line
from lm_lightning.memory.measure import human_bytes, rss_bytes
from lm_lightning.memory.probe import Settings
from lm_lightning.networks.lstm import LSTMNetwork

# Strategies that change nothing on a GPU: they set glibc's heap, which holds host memory only.
HOST_ONLY = {"ReturnFreedMemory", "FastAllocator"}
# The arguments that let Lightning build a run's objects on a machine without CUDA; the arithmetic reads the
# precision and devices the user asked for from the arguments themselves (cuda_settings).
CPU_BUILD = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]


def requested_accelerator(args: list[str]) -> str:
    """``--trainer.accelerator`` as ``fit`` would read it from ``args``: the flag, else the last ``-c`` file that sets
    it, else ``auto``. Read before any object is built: building a GPU run's trainer fails on a CPU-only machine."""
    found, it = "auto", iter(args)
    for arg in it:
        if arg in ("-c", "--config") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            try:
                config = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError, UnicodeDecodeError):
                continue  # the CLI's own parser says what is wrong with the file
            trainer = (config.get("fit", config) if isinstance(config, dict) else {}).get("trainer") or {}
            found = str(trainer.get("accelerator", found)) if isinstance(trainer, dict) else found
        elif arg == "--trainer.accelerator":
            found = next(it, found)
        elif arg.startswith("--trainer.accelerator="):
            found = arg.split("=", 1)[1]
    return found.lower()


def is_gpu_run(args: list[str]) -> bool:
    """Whether ``fit`` with ``args`` would train on a CUDA GPU: asked for, or ``auto`` where Lightning's ``auto`` picks
    CUDA. Asked as Lightning asks (``CUDAAccelerator.is_available``), not ``torch.cuda.is_available``: the two can
    disagree (the test suite pins Lightning's check to the CPU), and ``fit`` goes where Lightning's says."""
    accelerator = requested_accelerator(args)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and CUDAAccelerator.is_available())


def cuda_settings(parser: Any, args: list[str]) -> tuple[str, int]:
    """The precision (Lightning's spelling: ``16`` is ``16-mixed``) and the device count ``args`` ask for, parsed by the
    run's own parser (flags and ``-c`` files alike) without building anything."""
    trainer = parser.parse_args(args).get("trainer")
    precision = str(trainer.get("precision") or "32-true")
    precision = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}.get(precision, precision)
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)) or (isinstance(devices, str) and "," in devices):
        world = len([d for d in (devices if not isinstance(devices, str) else devices.split(",")) if str(d).strip()])
    else:
        world = int(devices) if str(devices).lstrip("-").isdigit() and int(devices) > 0 else 1
    return precision, world * int(trainer.get("num_nodes") or 1)


def optimizer_terms(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What the update keeps and allocates (torch.optim's CUDA paths): parameter-sized state tensors per parameter,
    parameter-sized temporaries of one ``foreach`` update, and whether they come one tensor at a time."""
    name, options = type(optimizer).__name__, optimizer.defaults
    if not type(optimizer).__module__.startswith("torch.optim") or name not in ("Adam", "AdamW", "SGD"):
        raise LMInputError(
            f"estimate's GPU arithmetic knows the state of Adam, AdamW and SGD, not {name}'s: run it with one of those, "
            "or read MemoryMonitor's CUDA figures (--trainer.callbacks+=MemoryMonitor) after a short fit."
        )
    decay = bool(options.get("weight_decay"))
    if name == "SGD":  # momentum buffers; weight decay and Nesterov each build new gradients
        states, temporaries = int(bool(options.get("momentum"))), int(decay) + int(bool(options.get("nesterov")))
    else:  # exp_avg, exp_avg_sq (and max_exp_avg_sq); sqrt(exp_avg_sq); Adam's coupled weight decay adds to the gradients
        states, temporaries = 2 + bool(options.get("amsgrad")), 1 + (decay and name == "Adam")
    fused = bool(options.get("fused"))
    return {
        "optimizer": name,
        "optimizer_states": states,
        "step_temporaries": 0 if fused else temporaries,
        "foreach": options.get("foreach") is not False,
    }


def gpu_run(
    model: Any, trainer: Any, data: Any, optimizer: torch.optim.Optimizer, precision: str, world_size: int
) -> tuple[GpuRun, str]:
    """The run as the arithmetic sees it, and the memory strategies it runs with (their labels)."""
    network = getattr(model, "network", None)
    if (
        not getattr(model, "token_inputs", False)
        or not isinstance(network, LSTMNetwork)
        or type(network).embed is not LSTMNetwork.embed
    ):
        raise LMInputError(
            f"estimate's GPU arithmetic covers the token path's LSTMNetwork (networks/lstm.py), not {type(network).__name__}: "
            "read MemoryMonitor's CUDA figures (--trainer.callbacks+=MemoryMonitor) after a short fit instead."
        )
    if precision not in PRECISIONS:
        raise LMInputError(
            f"estimate's GPU arithmetic covers --trainer.precision {', '.join(PRECISIONS)}, not {precision}: pick one of those."
        )
    strategies = memory_strategies(trainer)
    other = sorted({type(s).__name__ for s in strategies} - {"ChunkedLoss", "MicroBatchAccumulation"} - HOST_ONLY)
    if other:
        raise LMInputError(
            f"estimate's GPU arithmetic models ChunkedLoss and MicroBatchAccumulation, not {', '.join(other)}: leave "
            f"{'it' if len(other) == 1 else 'them'} out of the estimate, or read MemoryMonitor's CUDA figures after a short fit."
        )
    accumulation = next((s for s in strategies if isinstance(s, MicroBatchAccumulation)), None)
    chunked = next((s for s in strategies if isinstance(s, ChunkedLoss)), None)
    lstm = network.lstm
    run = GpuRun(
        data.vocab_size, network.embedding.embedding_dim, lstm.hidden_size, lstm.num_layers,
        network.decoder.weight is network.embedding.weight, float(network.dropout.p), data.hparams.batch_size, data.hparams.bptt,
        precision, micro_batch_size=max(accumulation.sizes.values()) if accumulation else 0,
        loss_chunk_size=chunked.chunk_size if chunked else 0,
        windows_per_step=1 if accumulation else int(trainer.accumulate_grad_batches), world_size=world_size,
        cublas_workspace=cublas_workspace_bytes(torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else None),
        **optimizer_terms(optimizer),
    )  # fmt: skip
    return run, " + ".join(s.label() for s in strategies if s.label() and type(s).__name__ not in HOST_ONLY) or "none"


def predict(run: GpuRun, host_rss: int, strategies: str) -> CudaPlan:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return replace(plan(run), host_rss=host_rss, strategies=strategies, device=device)


def search(run: GpuRun, budget: int) -> tuple[Optional[CudaPlan], CudaPlan]:
    """The first settings whose reserved memory and context fit ``budget``: the largest micro-batch (the same effective
    batch), the configured loss before the chunked one. Returns (the fitting plan or None, the smallest seen)."""
    chunks = list(dict.fromkeys([run.loss_chunk_size, run.loss_chunk_size or DEFAULT_CHUNK_SIZE]))
    smallest: Optional[CudaPlan] = None
    for micro in (d for d in range(run.batch_size, 0, -1) if run.batch_size % d == 0):
        for chunk in chunks:
            candidate = plan(replace(run, micro_batch_size=micro, loss_chunk_size=chunk))
            smallest = candidate if smallest is None or candidate.total < smallest.total else smallest
            if candidate.total <= budget:
                return candidate, smallest
    return None, smallest


def _largest(plan_: CudaPlan) -> str:
    part = max(plan_.parts, key=plan_.parts.get)
    return f"its largest part is {part} ({human_bytes(plan_.parts[part])})."


def cuda_estimate_command(cli: Any, fit_args: list[str], budget: Optional[int], host_rss: int) -> CudaPlan:
    """``estimate`` of a GPU run, on the objects ``cli.py`` built for a CPU (``CPU_BUILD``) from ``fit_args``."""
    precision, world = cuda_settings(cli.parser, fit_args)
    config = cli.model.configure_optimizers()
    run, labels = gpu_run(
        cli.model, cli.trainer, cli.datamodule, config["optimizer"] if isinstance(config, dict) else config, precision, world
    )
    predicted = predict(run, host_rss, labels)
    print(predicted.table())
    if budget is None:
        return predicted
    # The process takes reserved memory plus the CUDA context from the GPU; allocated memory is inside reserved.
    if budget < predicted.fixed:
        print(
            f"\nBudget {human_bytes(budget)}: nothing fits on the GPU. What no setting of the search changes (parameters, "
            f"gradients, optimizer state, cuBLAS workspaces, the CUDA context) already takes {human_bytes(predicted.fixed)}, "
            f"of which the CUDA context (assumed) is {human_bytes(predicted.context)}."
        )
        return predicted
    found, smallest = search(run, budget)
    current = Settings(run.streams, run.loss_chunk_size, 0)
    if found is None:
        print(
            f"\nBudget {human_bytes(budget)}: nothing fits on the GPU. The smallest reachable is {human_bytes(smallest.total)} "
            f"(micro-batch {smallest.run.streams}, loss chunks {smallest.run.loss_chunk_size}), and {_largest(smallest)}"
        )
        return replace(smallest, host_rss=host_rss, device=predicted.device)
    chosen = Settings(found.run.streams, found.run.loss_chunk_size, 0)
    if chosen == current:
        print(
            f"\nBudget {human_bytes(budget)}: fits on the GPU as configured ({human_bytes(predicted.total)}: reserved + context)."
        )
        return predicted
    print(f"\nBudget {human_bytes(budget)}: fits on the GPU with {human_bytes(found.total)} predicted (reserved + context):")
    print(fit_line(fit_args, current, chosen))
    return replace(found, host_rss=host_rss, device=predicted.device)


def predict_in_fit(trainer: Any, model: Any) -> tuple[Optional[CudaPlan], str]:
    """MemoryMonitor's prediction when a fit starts on a GPU: the plan, or why there is none (one sentence)."""
    data = getattr(trainer, "datamodule", None)
    if not trainer.optimizers or not hasattr(getattr(data, "hparams", None), "bptt"):
        return None, "no CUDA prediction: the arithmetic needs the token data module and an optimizer."
    try:
        run, labels = gpu_run(model, trainer, data, trainer.optimizers[0], str(trainer.precision), trainer.world_size)
    except LMInputError as err:
        return None, f"no CUDA prediction: {err}"
    return predict(run, rss_bytes(), labels), ""
