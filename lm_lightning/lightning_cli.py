"""The LightningCLI of this project: its defaults, links and checks (``cli.py`` dispatches to it).

What this adds to LightningCLI:

* The network is injected (``--model.network CLASS_PATH``) and its ``vocab_size`` flows from the datamodule
  (``link_arguments(..., apply_on="instantiate")``).
* Forced, configurable checkpointing (``--checkpoint.*``): best by ``val/ppl`` and last; ``--ckpt_path`` and
  ``--weights_from`` checked before any run folder exists (``storage/loading.py``).
* TensorBoard, learning-rate and tokens/s logging, a rich progress bar, gradient clipping by default.
* The export step at the end of fit (``--export.*``, ``callbacks/export.py``).
* A memory strategy or one of our callbacks given twice by stacked presets: the later one is kept.
* Bad input found before the first step takes the new run folder away with it (``storage/preflight.py``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Optional

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

# torchao logs a failed load of CUDA extensions it was not built for, and a torch deprecation notice at import;
# neither concerns anything used here.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
# Lightning 2.6 names torch's LeafSpec, which torch 2.13 deprecates, at every fit's start; and advertises a cloud
# logger at every Trainer: neither is about the user's run, so neither reaches the console.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: not record.getMessage().startswith("💡 Tip"))

from lm_lightning.callbacks import (  # noqa: E402
    Export,
    GenerationWriter,
    MemoryStrategy,
    PrecisionGuard,
    TokenThroughput,
    ValidationLine,
    memory_strategies,
)
from lm_lightning.data import StreamDataModule  # noqa: E402
from lm_lightning.errors import LMInputError, StoppedBySigterm, input_error  # noqa: E402
from lm_lightning.memory.monitor import MemoryMonitor  # noqa: E402, F401  (so that --trainer.callbacks+=MemoryMonitor resolves)
from lm_lightning.storage.checkpoints import BestAndLastCheckpoint, install_atomic_checkpoint_io  # noqa: E402
from lm_lightning.storage.folders import RunConfig, existing_run_config, place_logs  # noqa: E402
from lm_lightning.storage.loading import (  # noqa: E402
    check_compatible,
    is_checked_path,
    keep_command_line_settings,
    load_checkpoint_file,
)
from lm_lightning.storage.preflight import check_start, new_folders, remove_failed_start  # noqa: E402
from lm_lightning.systems import StreamSystem  # noqa: E402

# main() passes sys.argv on purpose (so that tests and notebooks can pass their own); Lightning warns about both.
warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended to run from within Python.*")
# Stream batches are slices of one in-memory tensor: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Our IterableDataset defines __len__ on purpose (every rank has the same number of windows).
warnings.filterwarnings("ignore", ".*Your `IterableDataset` has `__len__` defined.*")
# tokens/s is what we report; FLOPs of an LSTM are not something ThroughputMonitor can count for us.
warnings.filterwarnings("ignore", ".*define a `flops_per_batch` attribute.*")


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
        # ModelCheckpoint whose last.ckpt is written after every epoch, not only after improving ones (storage/checkpoints.py).
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
        self._restructure()
        self._load_weights_from()
        if self.checkpoint is not None:
            config = self.config.get(self.config.get("subcommand") or "", self.config)
            check_compatible(self.checkpoint, self.model, config["ckpt_path"])
            if self.subcommand == "fit":  # checked against the configured optimizer once it can be built
                self._resumed = (config["ckpt_path"], self.checkpoint.get("optimizer_states") or [])
            if self.subcommand is not None:  # the trainer loads it again; `export` uses this copy
                self.checkpoint = None

    def _restructure(self) -> None:
        """The strategies that swap a network module for their own layer do it now, before a checkpoint's weights are
        checked against the model and loaded (``MemoryStrategy.restructure``); two may not swap the same module."""
        strategies = memory_strategies(self.trainer)
        claimed: dict[str, str] = {}
        for strategy in strategies:
            if strategy.replaces and strategy.replaces in claimed:
                raise LMInputError(
                    f"{claimed[strategy.replaces]} and {type(strategy).__name__} both replace the network's {strategy.replaces}: "
                    "keep one of them in trainer.callbacks."
                )
            claimed[strategy.replaces] = type(strategy).__name__
        if isinstance(self.model, StreamSystem):
            for strategy in strategies:
                strategy.restructure(self.model)

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
            if input_error(err) is not None:
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
        ours = [c for c in trainer.callbacks if isinstance(c, MemoryStrategy) or type(c).__module__.startswith("lm_lightning.")]
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
        existing = existing_run_config(self.trainer)
        if subcommand == "fit" and existing is not None and self.config[subcommand].get("ckpt_path") is None:
            raise LMInputError(
                f"{existing.parent} already holds a run (its config.yaml): give another --trainer.logger.init_args.version "
                "(null for a new version_N), or resume that run with --ckpt_path."
            )
        check_start(self.trainer, self.model, subcommand, getattr(self, "_resumed", None))
        created = new_folders(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except (Exception, StoppedBySigterm) as err:
            if input_error(err) is not None or isinstance(err, StoppedBySigterm):
                remove_failed_start(self.trainer, created)
            raise


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
