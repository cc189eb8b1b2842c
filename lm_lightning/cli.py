"""``python -m lm_lightning fit|validate|test|predict|export|estimate|generate|score|compare``: LightningCLI with
this project's defaults (``estimate``: ``estimate.py``; ``generate`` and ``score``, from an export folder alone:
``exported.py``; ``compare``, runs side by side: ``compare.py``).

What this adds to LightningCLI:

* ``vocab_size`` flows from the datamodule to the model (``link_arguments(..., apply_on="instantiate")``).
* Forced, configurable checkpointing (``--checkpoint.*``): best by ``val/ppl`` and last.
* TensorBoard, learning-rate and tokens/s logging, a rich progress bar, gradient clipping by default.
* The export step at the end of fit (``--export.*``, ``callbacks/export.py``), and ``export``: the same step on a
  saved checkpoint (``python -m lm_lightning export -c RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt``).
* ``predict`` prints the generated text and writes it to a file.
* Bad input (an :class:`LMInputError`, or a flag or config file the parser refuses) ends with one sentence on stderr
  and exit status 2, no traceback, no usage text (``errors.parser_error_sentence``), and no run folder: settings that
  Lightning or torch would refuse only after making it are checked first (``preflight.py``).
"""

from __future__ import annotations

import copy
import logging
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

# torchao logs a failed load of CUDA extensions it was not built for, and a torch deprecation notice at import;
# neither concerns anything used here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

from lm_lightning.callbacks import (  # noqa: E402
    Export,
    GenerationWriter,
    MemoryStrategy,
    PrecisionGuard,
    TokenThroughput,
    ValidationLine,
    memory_strategies,
)
from lm_lightning.checkpoint_loading import (  # noqa: E402
    check_compatible,
    is_checked_path,
    keep_command_line_settings,
    load_checkpoint_file,
)
from lm_lightning.checkpointing import BestAndLastCheckpoint, install_atomic_checkpoint_io  # noqa: E402
from lm_lightning.compare import compare_command  # noqa: E402
from lm_lightning.data import StreamDataModule  # noqa: E402
from lm_lightning.errors import LMInputError  # noqa: E402
from lm_lightning.estimate import USAGE, Estimate, estimate_command, split_arguments  # noqa: E402
from lm_lightning.export.commands import generate_command, score_command  # noqa: E402
from lm_lightning.export.settings import resolve_format  # noqa: E402
from lm_lightning.export.writer import describe, export_network, test_batch_limit  # noqa: E402
from lm_lightning.parser_messages import parser_error_sentence, undecodable_config  # noqa: E402
from lm_lightning.preflight import check_start, new_folders, remove_failed_start  # noqa: E402
from lm_lightning.systems import StreamSystem  # noqa: E402

# main() passes sys.argv on purpose (so that tests and notebooks can pass their own); Lightning warns about both.
warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")
# Stream batches are slices of one in-memory tensor: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Our IterableDataset defines __len__ on purpose (every rank has the same number of windows).
warnings.filterwarnings("ignore", ".*Your `IterableDataset` has `__len__` defined.*")
# tokens/s is what we report; FLOPs of an LSTM are not something ThroughputMonitor can count for us.
warnings.filterwarnings("ignore", ".*define a `flops_per_batch` attribute.*")


class RunConfig(SaveConfigCallback):
    """Lightning's config saver, for a run folder that already holds a run's ``config.yaml`` (a version pinned with
    ``--trainer.logger.init_args.version NAME``): ``validate``/``test``/``predict`` and a resumed fit leave that run's
    config as it was; a new fit into it is refused before it starts (``LMCLI._run_subcommand``)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite and _existing_run_config(trainer):
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


def _existing_run_config(trainer: L.Trainer) -> Optional[Path]:
    config_path = Path(trainer.log_dir) / "config.yaml" if trainer.log_dir is not None else None
    return config_path if config_path is not None and config_path.is_file() else None


class LMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Subclass mode lets a fork pass its own classes by path (--model my_pkg.MyModel); these are the defaults.
        # The optimizer default is the one of configs/default.yaml: AdamW at 3e-3 reaches a good perplexity on the
        # embedded corpus in ~15 short epochs (torch's 1e-3 default needs about twice as many).
        parser.set_defaults(
            {
                "model": {
                    "class_path": "lm_lightning.systems.LanguageModel",
                    "init_args": {
                        "network": {"class_path": "lm_lightning.networks.LSTMNetwork"},
                        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}},
                    },
                },
                "data": {"class_path": "lm_lightning.data.TokenDataModule"},
            }
        )
        # The network is injected (LightningCLI's "models with multiple submodules"): its vocab_size is the data's.
        parser.link_arguments("data.vocab_size", "model.init_args.network.init_args.vocab_size", apply_on="instantiate")
        # ModelCheckpoint whose last.ckpt is written after every epoch, not only after improving ones (checkpointing.py).
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/ppl",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}-step{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # Always present, exporting only when the run calls for it (see callbacks/export.py): one export per run.
        parser.add_lightning_class_args(Export, "export")
        parser.add_argument(
            "--weights_from",
            type=Optional[str],
            default=None,
            help="fit only: start from this checkpoint's weights with a new optimizer, schedule, step count and run "
            "folder (a finishing phase: QAT, pruning), instead of resuming its training state as --ckpt_path does.",
        )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:  # `export`: a run's config.yaml holds the fit subcommand's keys, and the checkpoint is one
            self.parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="The checkpoint to export.")
            self.parser.add_argument("--weights_only", type=Optional[bool], default=None, help="Ignored by export.")

    # --- --ckpt_path: checked before any run folder exists; architecture from it, generation settings from the flags ---
    def parse_arguments(self, parser: LightningArgumentParser, args: Optional[list[str]]) -> None:
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        self.checkpoint, self._model_before_checkpoint = None, None
        if is_checked_path(config.get("ckpt_path")):
            # Before LightningCLI reads the checkpoint's hyper-parameters into the config (a traceback on a bad file).
            self.checkpoint = load_checkpoint_file(config["ckpt_path"], resume=self.config.get("subcommand") == "fit")
            self._model_before_checkpoint = copy.deepcopy(config.get("model"))

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        # LightningCLI replaced every --model.* value by the checkpoint's (see LightningCLI._parse_ckpt_path).
        if self._model_before_checkpoint is not None:
            keep_command_line_settings(self._model_before_checkpoint, config.get("model"))
        place_logs(config, self.config.get("subcommand"))

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        self._load_weights_from()
        if self.checkpoint is not None:
            config = self.config.get(self.config.get("subcommand") or "", self.config)
            check_compatible(self.checkpoint, self.model, config["ckpt_path"])
            if self.subcommand is not None:  # the trainer loads it again; `export` uses this copy
                self.checkpoint = None

    def _load_weights_from(self) -> None:
        """``fit --weights_from CKPT``: the network's weights from a trained run, everything else new."""
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        path = config.get("weights_from")
        # With --ckpt_path the weights come from that checkpoint: resuming a finishing run (whose config.yaml names
        # --weights_from), or evaluating one.
        if path is None or config.get("ckpt_path") is not None:
            return
        if self.config.get("subcommand") in ("validate", "test", "predict"):
            raise LMInputError("--weights_from starts a new fit from a checkpoint's weights: give --ckpt_path to validate, test or predict.")
        checkpoint = load_checkpoint_file(path, flag="--weights_from")
        check_compatible(checkpoint, self.model, path, flag="--weights_from")
        self.model.load_state_dict(checkpoint["state_dict"])
        for strategy in memory_strategies(self.trainer):  # e.g. a finishing phase prunes from its first epoch
            strategy.start_from_trained()

    def instantiate_trainer(self, **kwargs):
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:  # Lightning's checks of the --trainer.* values
            if _input_error(err) is not None:
                raise
            raise LMInputError(f"Lightning refused the --trainer settings ({' '.join(str(err).split())}): change the value it names.") from None
        # Without a logger (--trainer.logger false) there is no learning rate to log: Lightning's LearningRateMonitor
        # would stop the run at its start, so the default one goes; the console line still reports each validation.
        if not trainer.loggers:
            trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, LearningRateMonitor)]
        # Swap Lightning's default tqdm bar for a rich one, unless the user chose a bar or turned bars off.
        # (A RichProgressBar in the default callbacks would clash with --trainer.enable_progress_bar false.)
        for i, callback in enumerate(trainer.callbacks):
            if type(callback) is TQDMProgressBar:
                trainer.callbacks[i] = RichProgressBar()
        # Every checkpoint write is atomic (temporary file in the target folder, fsync, rename), unless the user
        # passed a CheckpointIO plugin of their own.
        install_atomic_checkpoint_io(trainer.strategy)
        # Stacked presets can name one of our callbacks or a memory strategy twice (-c monitor.yaml -c lean.yaml: two
        # memory monitors, each probing and logging the same tags; two pruning callbacks would both prune the same
        # weights). As with any setting given twice, the later one wins.
        ours = [c for c in trainer.callbacks if isinstance(c, MemoryStrategy) or type(c).__module__.startswith("lm_lightning.callbacks")]
        kept = {type(c): c for c in ours}
        dropped = [c for c in ours if kept[type(c)] is not c]
        if dropped:
            trainer.callbacks[:] = [c for c in trainer.callbacks if not any(c is d for d in dropped)]
            names = sorted({type(c).__name__ for c in dropped})
            rank_zero_info(f"{', '.join(names)} given more than once (stacked presets): using the last one given.")
        # Reduced precision always gets its guard: unsafe optimizer settings refused, CPU kernels checked, dtypes reported.
        if "16" in str(trainer.precision) and not any(isinstance(c, PrecisionGuard) for c in trainer.callbacks):
            trainer.callbacks.append(PrecisionGuard())
        return trainer

    def before_predict(self) -> None:
        if not any(isinstance(c, GenerationWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(GenerationWriter())

    def _run_subcommand(self, subcommand: str) -> None:
        # Settings that would fail only once the run folder exists are checked first (preflight.py); bad input found
        # after that, before the first step, takes the new run folder away with it: a failed start leaves nothing.
        existing = _existing_run_config(self.trainer)
        if subcommand == "fit" and existing is not None and self.config[subcommand].get("ckpt_path") is None:
            raise LMInputError(
                f"{existing.parent} already holds a run (its config.yaml): give another --trainer.logger.init_args.version "
                "(null for a new version_N), or resume that run with --ckpt_path."
            )
        check_start(self.trainer, self.model, subcommand)
        created = new_folders(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            if _input_error(err) is not None:
                remove_failed_start(self.trainer, created)
            raise


def place_logs(config, subcommand: Optional[str]) -> None:
    """Where the TensorBoard logger writes, when the user did not say: under ``--trainer.default_root_dir`` (Lightning's
    convention; the default logger is otherwise pinned to ``./lightning_logs``), and for ``validate``, ``test`` and
    ``predict`` of a run's checkpoint (``RUN/checkpoints/*.ckpt``) into that run's own folder, so their metrics and
    ``generated.txt`` sit with the run and no new ``version_N`` appears beside the training runs. An evaluation of
    anything else gets a folder named after it (``test_0``, ``predict_0``, ...)."""
    logger = config["trainer"].get("logger")  # a class path and its arguments, or true/false, or a list of loggers
    if not hasattr(logger, "get") or not str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        return
    args = logger.get("init_args")
    root = config["trainer"].get("default_root_dir")
    if root is not None and str(args.get("save_dir")) == ".":
        args["save_dir"] = str(root)
    if subcommand not in ("validate", "test", "predict") or args.get("version") is not None:
        return
    run = _run_folder(config.get("ckpt_path"))
    if run is not None:
        args["save_dir"], args["name"], args["version"] = str(run.parent.parent), run.parent.name, run.name
        return
    parent = Path(args.get("save_dir") or ".") / (args.get("name") or "")
    taken = {p.name for p in parent.iterdir()} if parent.is_dir() else set()
    args["version"] = next(f"{subcommand}_{n}" for n in range(len(taken) + 1) if f"{subcommand}_{n}" not in taken)


def _run_folder(ckpt_path: Optional[str]) -> Optional[Path]:
    """The run a checkpoint belongs to: ``RUN`` for ``RUN/checkpoints/NAME.ckpt`` when RUN holds the run's config."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path).absolute()
    run = path.parent.parent
    if path.parent.name == "checkpoints" and ((run / "config.yaml").is_file() or (run / "hparams.yaml").is_file()):
        return run
    return None


# `fit --help` lists the trainer's ~60 options and, for the model and data, only their class names (subclass mode:
# any LightningModule or LightningDataModule by class path): this says where the model and data options are, at the
# top and at the end of the help, where a reader looks.
FIT_HELP = (
    "Train a language model (default: an embedding + LSTM network on the embedded corpus). "
    "Model options (optimizer, schedule, sampling): --model.help LanguageModel "
    "(bag-of-words: --model.help BagLanguageModel); the network and its sizes: --model.network.help LSTMNetwork "
    "(another network: --model.network CLASS_PATH). "
    "Data options (corpus, tokenizer, vocabulary, batch size, bptt): --data.help TokenDataModule "
    "(bag-of-words: --data.help BagDataModule). "
    "Set them as --model.network.hidden_dim 512, --data.bptt 70, --model.optimizer.lr 0.01. "
    "Recipes: -c configs/ptb_small.yaml; memory strategies: -c configs/memory/lean.yaml (one file each in configs/memory); "
    "what fits in a memory budget, before training: python -m lm_lightning estimate --help."
)


def trainer_defaults() -> dict:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": ".", "name": "lightning_logs", "default_hp_metric": False},
        },
        "callbacks": [LearningRateMonitor(logging_interval="step"), TokenThroughput(), ValidationLine()],
        # Clipping the global gradient norm keeps LSTM training stable (Pascanu et al. 2013; 0.25 as in word_language_model).
        "gradient_clip_val": 0.25,
        "max_epochs": 15,
        "log_every_n_steps": 10,
    }


def build_cli(args: Optional[list[str]] = None, run: bool = True) -> LMCLI:
    """The CLI object (tests and notebooks use it to reach ``cli.trainer`` and ``cli.model``)."""
    # The bases, so that both paths (and forks of either) are accepted by class path; the defaults are the token path.
    return LMCLI(
        StreamSystem,
        StreamDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,  # reproducible by default; change with --seed_everything
        save_config_callback=RunConfig,
        # exit_on_error: parser errors raise instead of printing 70-80 lines of usage, and main() says them in one
        # sentence; allow_abbrev: a typo such as
        # --trainer.max_epoch must be an error, not silently taken as --trainer.max_epochs.
        parser_kwargs={"exit_on_error": False, "allow_abbrev": False, "fit": {"description": FIT_HELP, "epilog": FIT_HELP}},
        args=args,
        run=run,
    )


def _input_error(err: Optional[BaseException]) -> Optional[LMInputError]:
    """The LMInputError behind ``err``: jsonargparse wraps errors raised while it builds classes (callbacks)."""
    while err is not None and not isinstance(err, LMInputError):
        err = err.__cause__ or err.__context__
    return err


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
    folder = Path(step.folder) if step.folder else run_dir / f"export-{ckpt_path.stem}"
    metadata = {"checkpoint": str(ckpt_path), "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
    report = export_network(
        cli.model.network,
        folder.absolute(),
        bits,
        group_size,
        cli.datamodule,
        metadata,
        test_batches=test_batch_limit(cli.trainer, cli.datamodule) if step.evaluate else 0,
    )
    print(describe(report))
    return report


def estimate(args: list[str]) -> Estimate:
    """``estimate``: fit's arguments built into the run's objects here, predicted by ``estimate.py``."""
    if {"-h", "--help"} & set(args):
        print(USAGE)
        raise SystemExit(0)
    fit_args, budget = split_arguments(args)
    cli = build_cli(fit_args, run=False)
    return estimate_command(cli.model, cli.trainer, cli.datamodule, fit_args, budget)


# The subcommands beside LightningCLI's fit/validate/test/predict: name -> function of the remaining arguments.
COMMANDS = {
    "export": export_checkpoint,  # a checkpoint's export step
    "estimate": estimate,  # the peak of a fit, before it runs
    "compare": compare_command,  # runs side by side from their TensorBoard events, and the Pareto picture
    "generate": generate_command,  # an export folder alone: no config, corpus or checkpoint
    "score": score_command,
}


def main(args: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if args is None else args
    try:
        if args[:1] and args[0] in COMMANDS:
            COMMANDS[args[0]](args[1:])
        else:
            build_cli(args)
    except SIGTERMException:
        # Lightning stops at the next batch and raises this SystemExit with no code, which would exit 0: a scheduler
        # (SLURM's preemption, `timeout`, `kill`) and a shell script must see that the run did not finish.
        print(
            "stopped by SIGTERM before the run finished: resume it from its last checkpoint with "
            "-c RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt (written at the end of each epoch).",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    except ArgumentError as err:  # the parser's tree of messages (build_cli sets exit_on_error=False)
        if args[:1] in (["generate"], ["score"], ["compare"]):  # argparse's own message already names the option
            _exit_with(f"{err}: see python -m lm_lightning {args[0]} --help.")
        _exit_with(parser_error_sentence(str(err), args))
    except UnicodeDecodeError:  # jsonargparse reads -c files without catching this
        sentence = undecodable_config(args)
        if sentence is None:
            raise
        _exit_with(sentence)
    except Exception as err:
        input_error = _input_error(err)
        if input_error is None:
            raise
        _exit_with(str(input_error))


def _exit_with(sentence: str) -> None:
    """The one line every bad input ends with: ``error: <sentence>`` on stderr, exit status 2, no traceback."""
    print(f"error: {sentence}", file=sys.stderr)
    raise SystemExit(2) from None


if __name__ == "__main__":
    main()
