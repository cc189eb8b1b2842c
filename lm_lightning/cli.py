"""``python -m lm_lightning fit|validate|test|predict|export|estimate|generate|score|compare``: the entry point.

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI's, with this project's defaults
(``lightning_cli.py``); the others are in :data:`COMMANDS`: ``export`` (the export step on a saved checkpoint),
``estimate`` (``memory/estimate.py``), ``compare`` (``reports/compare.py``), ``generate`` and ``score`` (an export
folder alone, ``deploy/commands.py``; ``__main__.py`` runs those two before anything imports Lightning). Bad input (an
:class:`LMInputError`, or a flag or config file the parser refuses) ends with one sentence on stderr and exit status
2, no traceback, no usage text (``parser_messages.py``, ``errors.exit_with``).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentError
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lm_lightning.callbacks import Export, memory_strategies
from lm_lightning.deploy.commands import generate_command, score_command
from lm_lightning.errors import LMInputError, StoppedBySigterm, exit_with, flag_sentence, input_error
from lm_lightning.export.settings import resolve_format
from lm_lightning.export.writer import describe, export_network, test_batch_limit
from lm_lightning.io import disk_full
from lm_lightning.lightning_cli import build_cli
from lm_lightning.memory.cuda_estimate import CPU_BUILD, cuda_estimate_command, is_gpu_run
from lm_lightning.memory.cuda_plan import CudaPlan
from lm_lightning.memory.estimate import USAGE, Estimate, estimate_command, fixed_bytes, process_baseline, split_arguments
from lm_lightning.memory.fastest_report import configured_allocator, fastest_command, kept_heap_line
from lm_lightning.parser_messages import parser_error_sentence, undecodable_config
from lm_lightning.reports.compare import compare_command
from lm_lightning.storage.loading import check_compatible, load_checkpoint_file

__all__ = ["COMMANDS", "build_cli", "estimate", "export_checkpoint", "main"]


def export_checkpoint(args: list[str]) -> dict:
    """``python -m lm_lightning export -c RUN/config.yaml --ckpt_path CKPT [--export.bits 8] [--export.folder DIR]``:
    the export step of a finished run, on any of its checkpoints."""
    cli = build_cli(args, run=False)
    if cli.config.get("ckpt_path") is None:
        raise LMInputError("export needs --ckpt_path: the checkpoint to export (RUN/checkpoints/*.ckpt), with -c RUN/config.yaml.")
    ckpt_path = Path(cli.config["ckpt_path"])
    # Read and checked against the run's model while the CLI was built (LMCLI.parse_arguments); "last" and the
    # other words Lightning resolves are file names here.
    checkpoint = cli.checkpoint if cli.checkpoint is not None else load_checkpoint_file(ckpt_path)
    check_compatible(checkpoint, cli.model, ckpt_path)
    cli.model.load_state_dict(checkpoint["state_dict"])
    step = next(c for c in cli.trainer.callbacks if isinstance(c, Export))
    bits, group_size = resolve_format(step.bits, step.group_size, memory_strategies(cli.trainer))
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    suffix = "-onnx" if step.format == "onnx" else ""
    folder = Path(step.folder) if step.folder else run_dir / f"export-{ckpt_path.stem}{suffix}"
    metadata = {"checkpoint": str(ckpt_path), "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
    report = export_network(
        cli.model.network,
        folder.absolute(),
        bits,
        group_size,
        cli.datamodule,
        metadata,
        test_batches=test_batch_limit(cli.trainer, cli.datamodule) if step.evaluate else 0,
        format=step.format,
    )
    print(describe(report))
    return report


def estimate(args: list[str]) -> Estimate | CudaPlan:
    """``estimate``: fit's arguments built into the run's objects here, predicted by ``memory/estimate.py`` (a GPU run:
    by ``memory/cuda_estimate.py``'s arithmetic, a :class:`CudaPlan`)."""
    if {"-h", "--help"} & set(args):
        print(USAGE)
        raise SystemExit(0)
    fastest, approximate = "--fastest" in args, "--allow-approximate" in args
    fit_args, budget = split_arguments([a for a in args if a not in ("--fastest", "--allow-approximate")])
    if fastest and budget is None:
        raise LMInputError("--fastest ranks the runs that fit a budget: give it with --budget SIZE, e.g. --budget 2GiB.")
    if approximate and not fastest:
        raise LMInputError("--allow-approximate widens --fastest's search: give it with --budget SIZE --fastest.")
    if is_gpu_run(fit_args):  # arithmetic for a CUDA GPU (memory/cuda_estimate.py): objects built for a CPU, no probe
        if fastest:
            raise LMInputError(
                "--fastest times probe steps on this machine's CPU, not on a GPU: leave it out; --budget SIZE alone answers for the GPU."
            )
        cli = build_cli([*fit_args, *CPU_BUILD], run=False)
        host = process_baseline(cli.model)  # as on CPU
        return cuda_estimate_command(cli, fit_args, budget, host)
    cli = build_cli(fit_args, run=False)
    # Before any probe step: this process holds what fit holds before its first step, plus the model's parameters.
    baseline = process_baseline(cli.model)
    estimate = estimate_command(cli.model, cli.trainer, cli.datamodule, fit_args, budget)
    if configured_allocator(cli.trainer) == "fast":
        print(kept_heap_line(cli.model, cli.trainer, cli.datamodule, baseline))
    if fastest and fixed_bytes(estimate) <= budget:  # below what no setting changes, estimate has said that nothing fits
        fastest_command(cli.model, cli.trainer, cli.datamodule, fit_args, budget, baseline, approximate)
    return estimate


# The subcommands beside LightningCLI's fit/validate/test/predict: name -> function of the remaining arguments.
COMMANDS = {
    "export": export_checkpoint,  # a checkpoint's export step
    "estimate": estimate,  # the peak of a fit, before it runs
    "compare": compare_command,  # runs side by side from their TensorBoard events, and the Pareto picture
    "generate": generate_command,  # an export folder alone: no config, corpus or checkpoint
    "score": score_command,
}


STOPPED_IN_TRAINING = (
    "stopped by SIGTERM before the run finished: resume it from its last checkpoint with "
    "-c RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt (written at the end of each epoch)."
)
STOPPED_BEFORE_TRAINING = (
    "stopped by SIGTERM before training started (while reading the data or building the model): nothing was "
    "trained and nothing half-written was left; run the same command again."
)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM before Lightning's own handler is in place (reading the corpus, building the cache, the model): stop
    here, through every ``finally`` (temporary cache folders and locks are cleaned up). Once a fit runs, Lightning
    calls this too, after its own handler, which stops at the next batch: then nothing is raised here."""
    if signal.getsignal(signal.SIGTERM) is _terminated:
        raise StoppedBySigterm


def main(args: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if args is None else args
    # Only where SIGTERM would otherwise kill the process silently (a harness or a user may have set their own).
    own_handler = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if own_handler:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        if args[:1] and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            build_cli(args)
    except (SIGTERMException, StoppedBySigterm) as err:
        # Lightning stops at the next batch and raises a SystemExit with no code, which would exit 0: a scheduler
        # (SLURM's preemption, `timeout`, `kill`) and a shell script must see that the run did not finish.
        print(STOPPED_BEFORE_TRAINING if isinstance(err, StoppedBySigterm) else STOPPED_IN_TRAINING, file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except ArgumentError as err:  # the parser's tree of messages (build_cli sets exit_on_error=False)
        if args[:1] in (["generate"], ["score"], ["compare"]):  # argparse's own message already names the option
            exit_with(flag_sentence(err, args[0]))
        exit_with(parser_error_sentence(str(err), args))
    except UnicodeDecodeError:  # jsonargparse reads -c files without catching this
        sentence = undecodable_config(args)
        if sentence is None:
            raise
        exit_with(sentence)
    except Exception as err:
        cause = input_error(err)
        if cause is None and disk_full(err):  # a writer with no sentence of its own (a logger's, a library's)
            exit_with(f"A write failed because the disk is full ({err}): free space there, or point --trainer.default_root_dir to another disk.")
        if cause is None:
            raise
        exit_with(str(cause))
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    main()
