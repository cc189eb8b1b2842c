"""Where a run's files go: the run folder of a fit, and the folder an evaluation logs into.

LightningCLI saves each run's ``config.yaml`` into its log folder and pins the default logger to ``./lightning_logs``;
this module keeps an existing run's config as it is (:class:`RunConfig`) and places the logs under
``--trainer.default_root_dir``, with ``validate``/``test``/``predict`` of a run's checkpoint logging into that run
(:func:`place_logs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback


class RunConfig(SaveConfigCallback):
    """Lightning's config saver, for a run folder that already holds a run's ``config.yaml`` (a version pinned with
    ``--trainer.logger.init_args.version NAME``): ``validate``/``test``/``predict`` and a resumed fit leave that run's
    config as it was; a new fit into it is refused before it starts (``LMCLI._run_subcommand``)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite and existing_run_config(trainer):
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


def existing_run_config(trainer: L.Trainer) -> Optional[Path]:
    config_path = Path(trainer.log_dir) / "config.yaml" if trainer.log_dir is not None else None
    return config_path if config_path is not None and config_path.is_file() else None



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
