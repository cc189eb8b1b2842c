"""Checkpoints: atomic writes (a full disk, a SIGKILL inside the save), last.ckpt after every epoch, generation flags
next to --ckpt_path, one sentence for a bad --ckpt_path, and a NaN loss that stops without saving the NaN state."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import write_corpus

from lm_lightning.callbacks import MagnitudePruning
from lm_lightning.cli import build_cli, main
from lm_lightning.errors import LMInputError
from lm_lightning.storage.checkpoints import AtomicCheckpointIO, remove_stale_temporary_files
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY = [
    "--data.tokenizer", "whitespace", "--data.min_freq", "1", "--data.batch_size", "4", "--data.bptt", "8",
    "--model.network.embedding_dim", "16", "--model.network.hidden_dim", "16", "--model.network.num_layers", "1", "--model.sample_length", "4",
    *QUIET,
]  # fmt: skip
OTHER_WORDS = "\n".join(["one two three four five six seven eight nine ten ."] * 90) + "\n"


def data(corpus: Path, cache: Path) -> list[str]:
    return ["--data.source", str(corpus), "--data.cache_dir", str(cache), *TINY]


def in_folder(folder: Path, args: list[str]):
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        return build_cli(args)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(corpus, another corpus with other words, token cache)."""
    root = tmp_path_factory.mktemp("corpora")
    text = "\n".join(["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."] * 30) + "\n"
    return write_corpus(root / "tiny", text, text, text), write_corpus(root / "other", *[OTHER_WORDS] * 3), root / "cache"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, corpora):
    """Three epochs whose val/ppl falls every epoch, checkpointed with mode max: only epoch 0 is ever "best". A stock
    Lightning ModelCheckpoint (on val/loss, mode max) runs beside ours, to show what it leaves in last.ckpt."""
    corpus, _, cache = corpora
    folder = tmp_path_factory.mktemp("fit")
    stock = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(folder / "stock")]
    stock += [
        "--trainer.callbacks.monitor",
        "val/loss",
        "--trainer.callbacks.mode",
        "max",
        "--trainer.callbacks.save_last",
        "true",
    ]
    args = ["fit", *data(corpus, cache), "--trainer.max_epochs", "3", "--checkpoint.mode", "max", *stock]
    cli = in_folder(folder, args)
    return folder / "lightning_logs" / "version_0" / "checkpoints", cli


# --- last.ckpt ----------------------------------------------------------------------------------------------
def test_last_ckpt_holds_the_last_epoch_even_when_it_did_not_improve(fitted):
    checkpoints, cli = fitted
    assert cli.trainer.global_step == 66
    best = [p.name for p in checkpoints.glob("best-*.ckpt")]
    assert best == ["best-epoch00-step22.ckpt"]  # val/ppl fell every epoch, so with mode max only epoch 0 was best
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 66
    # Lightning's own ModelCheckpoint (2.6) leaves last.ckpt at the last improving epoch: the bug of issue 8.
    stock = checkpoints.parents[2] / "stock" / "last.ckpt"
    assert torch.load(stock, weights_only=True)["global_step"] == 22


# --- atomic writes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, message",
    [
        (
            errno.ENOSPC,
            r"^The disk holding .*checkpoints is full, so the checkpoint was not written \(the previous one is kept\)",
        ),
        (errno.EACCES, r"^Checkpoints cannot be written to .*checkpoints \(Permission denied\): make it writable or point"),
    ],
    ids=["disk-full", "permission-denied"],
)
def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(code, message, tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(1000)}, target)
    real_save, written_to = torch.save, []

    def failing_write(obj, f, *args, **kwargs):
        written_to.append(Path(f.name))
        f.write(b"x" * 4096)  # some bytes got out before the write failed
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_write)
    with pytest.raises(LMInputError, match=message):
        io.save_checkpoint({"step": 2, "w": torch.arange(1000)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert written_to[0].parent == target.parent  # the temporary file is in the target folder (same file system)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_full_disk_during_fit_is_one_sentence_and_keeps_last_ckpt(tmp_path, corpora, monkeypatch, capsys):
    corpus, _, cache = corpora
    monkeypatch.chdir(tmp_path)
    real_save, saves = torch.save, []

    def full_on_third_save(obj, f, *args, **kwargs):  # epoch 0 writes best and last; epoch 1's first write fails
        saves.append(f)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_third_save)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *data(corpus, cache), "--trainer.max_epochs", "2"])
    monkeypatch.setattr(torch, "save", real_save)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: The disk holding ") and "--trainer.default_root_dir" in last
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch00-step22.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 22


def test_a_really_full_disk_is_one_sentence_and_keeps_the_previous_checkpoint(small_disk):
    """A real full disk (a 256 KiB tmpfs): torch's zip writer reports it as a RuntimeError ("unexpected pos"), not as
    the OSError it handles, and the sentence must still say the disk is full."""
    folder = small_disk(256)
    target = folder / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.zeros(1000)}, target)
    with pytest.raises(LMInputError, match=r"^The disk holding .*checkpoints is full, so the checkpoint was not written"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(200_000)}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_fit_onto_a_full_disk_stops_before_its_run_folder_in_one_sentence(small_disk, corpora, tmp_path, capsys):
    """A disk with no room left takes an empty file, and TensorBoard's writer thread then fails with a traceback: the
    start writes 1 MiB for real first."""
    corpus, _, cache = corpora
    root = small_disk(512)
    with pytest.raises(OSError):
        (root / "filler").write_bytes(bytes(1 << 20))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *data(corpus, cache), "--trainer.default_root_dir", str(root)])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"^error: The disk holding {root} is full \(not even 1 MiB could be written\): free space there", last)
    assert sorted(p.name for p in root.iterdir()) == ["filler"]


def test_a_sigkill_inside_the_save_leaves_the_previous_last_ckpt(tmp_path, corpora):
    """A real `python -m lm_lightning fit`, killed with half of epoch 1's last.ckpt written (tests/kill_switch.py)."""
    corpus, _, cache = corpora
    kill = ["--trainer.callbacks+=kill_switch.KillAt", "--trainer.callbacks.point", "save", "--trainer.callbacks.epoch", "1"]
    args = [sys.executable, "-m", "lm_lightning", "fit", *data(corpus, cache), "--trainer.max_epochs", "2", *kill]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 22  # epoch 0, complete
    leftovers = [p for p in checkpoints.iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < (checkpoints / "last.ckpt").stat().st_size
    # The next run that starts from this folder removes it (its process is gone); a live process's file stays.
    live = checkpoints / f".last.ckpt.{os.getpid()}.0123abcd.tmp"
    live.write_bytes(b"in progress")
    assert remove_stale_temporary_files(checkpoints) == leftovers and live.exists()


def test_a_sigterm_during_fit_exits_143_with_a_sentence_and_keeps_the_last_checkpoint(tmp_path, corpora):
    """A scheduler's SIGTERM (SLURM preemption, `timeout`): Lightning stops at the next batch with a SystemExit of no
    code, which would exit 0 as if the run had finished; the CLI exits 128 + 15 and says how to resume."""
    corpus, _, cache = corpora
    args = [sys.executable, "-m", "lm_lightning", "fit", *data(corpus, cache), "--trainer.max_epochs", "500"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the console line of the first validation: epoch 0 and its last.ckpt are done
            if line.startswith("epoch 1/500"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM before the run finished" in err and "Traceback" not in err
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] >= 22


def test_a_sigterm_while_the_data_is_prepared_exits_143_with_a_sentence_and_leaves_nothing(tmp_path, corpora):
    """SIGTERM halfway through writing the token cache (tests/kill_switch.py), before Lightning's own handler exists:
    not a silent death but 143 and a sentence; no run folder, no half-written cache, and the next start builds it."""
    corpus, _, _ = corpora
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "lm_lightning", "fit", *data(corpus, cache), "--trainer.max_epochs", "1"]
    env = {**os.environ, "LM_TEST_KILL_AT": "prepare_sigterm"}
    armed = [*args, "--trainer.callbacks+=kill_switch.KillAt", "--trainer.callbacks.point", "prepare"]
    proc = subprocess.run(armed, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM before training started") and "Traceback" not in proc.stderr
    assert not (tmp_path / "lightning_logs").exists()
    assert not cache.exists() or [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Token cache written" in again.stderr


@pytest.mark.parametrize(
    "plugin, expected",
    [
        (None, "AtomicCheckpointIO"),
        ("kill_switch.OwnCheckpointIO", "OwnCheckpointIO"),  # the user's own way to save stays
        ("lightning.pytorch.plugins.io.AsyncCheckpointIO", "AsyncCheckpointIO(AtomicCheckpointIO)"),  # atomic inside
    ],
    ids=["default", "own", "async"],
)
def test_atomic_checkpoints_are_installed_and_a_users_checkpoint_io_is_kept(plugin, expected, corpora):
    corpus, _, cache = corpora
    cli = build_cli([*data(corpus, cache), *(["--trainer.plugins", plugin] if plugin else [])], run=False)
    io = cli.trainer.strategy.checkpoint_io
    inner = getattr(io, "checkpoint_io", None)
    assert type(io).__name__ + (f"({type(inner).__name__})" if inner is not None else "") == expected


# --- --model.* flags next to --ckpt_path ---------------------------------------------------------------------
def test_predict_takes_the_architecture_from_the_checkpoint_and_generation_settings_from_the_flags(
    fitted, corpora, tmp_path, monkeypatch, caplog
):
    checkpoints, _ = fitted
    corpus, _, cache = corpora
    monkeypatch.chdir(tmp_path)
    generated = []
    real_generate = LanguageModel.generate

    def spy(self, prompt, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        generated.append((prompt.shape[1], max_new_tokens, temperature, top_k))
        out = real_generate(self, prompt, max_new_tokens, temperature, top_k, generator)
        generated[-1] += (out.shape[1],)
        return out

    monkeypatch.setattr(LanguageModel, "generate", spy)
    flags = ["--model.max_new_tokens", "3", "--model.temperature", "0.5", "--model.top_k", "4", "--model.seed", "7"]
    args = ["predict", *data(corpus, cache), "--ckpt_path", str(checkpoints / "last.ckpt"), *flags, "--model.network.hidden_dim", "32"]
    with caplog.at_level("WARNING"):
        cli = build_cli([*args, "--data.prompt", "the cat"])
    assert generated == [(2, 3, 0.5, 4, 2 + 3)]  # 3 new tokens after the 2-token prompt, with the flags' sampler
    hp = cli.model.hparams
    assert (hp.max_new_tokens, hp.temperature, hp.top_k, hp.seed) == (3, 0.5, 4, 7)
    network = hp.network["init_args"]
    assert network["hidden_dim"] == 16 and network["embedding_dim"] == 16  # the checkpoint's network, not --model.network.hidden_dim 32
    assert cli.model.network.hidden_dim == 16
    assert "--model.network.hidden_dim 32 is ignored: the architecture comes from the checkpoint (hidden_dim=16)" in caplog.text


# --- a bad --ckpt_path --------------------------------------------------------------------------------------
def _truncated(folder: Path, last: Path, other: Path) -> Path:
    data_ = last.read_bytes()
    (folder / "truncated.ckpt").write_bytes(data_[: len(data_) // 2])
    return folder / "truncated.ckpt"


def _weights_only(folder: Path, last: Path) -> Path:
    checkpoint = torch.load(last, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k not in ("optimizer_states", "loops")}, folder / "weights_only.ckpt")
    return folder / "weights_only.ckpt"


BAD_CHECKPOINTS = {
    "missing": (lambda folder, last, other: folder / "missing.ckpt", r"missing.ckpt is not a file \(it does not exist\)"),
    "folder": (
        lambda folder, last, other: last.parent,
        r"checkpoints is not a file \(it is a folder\): give a checkpoint file, e.g\.",
    ),
    "random-bytes": (
        lambda folder, last, other: (
            (folder / "noise.ckpt").write_bytes(random.Random(0).randbytes(4096)) and folder / "noise.ckpt"
        ),
        r"noise.ckpt cannot be loaded into this run's model: it is not a complete checkpoint \(",
    ),
    "truncated": (_truncated, r"truncated.ckpt cannot be loaded into this run's model: it is not a complete checkpoint"),
    "weights-only": (
        lambda folder, last, other: _weights_only(folder, last),
        r"weights_only.ckpt holds the weights only \(--checkpoint.save_weights_only\), so fit cannot resume from it",
    ),
    "other-vocabulary": (
        lambda folder, last, other: other,
        r"last.ckpt cannot be loaded into this run's model: network.embedding.weight is \[\d+, 16\] there and \[\d+, 16\] here",
    ),
}


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory, corpora) -> Path:
    """A checkpoint of the same network trained on other words (another vocabulary size)."""
    _, other, cache = corpora
    folder = tmp_path_factory.mktemp("other")
    in_folder(folder, ["fit", *data(other, cache), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    return folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"


# Every subcommand reads --ckpt_path through the same code (LMCLI.parse_arguments, after_instantiate_classes): every
# case for fit and predict, the two that get furthest (a loadable file; the model built) for validate and test.
BAD_CKPT_CASES = [(s, c) for s in ("fit", "predict") for c in BAD_CHECKPOINTS if (s, c) != ("predict", "weights-only")]
BAD_CKPT_CASES += [(s, c) for s in ("validate", "test") for c in ("truncated", "other-vocabulary")]


@pytest.mark.parametrize("subcommand, case", BAD_CKPT_CASES, ids=[f"{s}-{c}" for s, c in BAD_CKPT_CASES])
def test_a_bad_ckpt_path_is_one_sentence_before_any_run_folder(
    subcommand, case, fitted, other_vocabulary, corpora, tmp_path, monkeypatch, capsys
):
    checkpoints, _ = fitted
    corpus, _, cache = corpora
    make, message = BAD_CHECKPOINTS[case]
    ckpt = make(tmp_path, checkpoints / "last.ckpt", other_vocabulary)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *data(corpus, cache), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (after any warnings Lightning printed)
    assert last.startswith("error: --ckpt_path ") and re.search(message, last), err
    assert not (tmp_path / "lightning_logs").exists()


# --- NaN ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "when, message",
    [
        ("before", r"^error: The training loss is nan at step 27 \(epoch 1, batch 5\): lower the learning rate"),
        ("after", r"^error: The weights are not finite at step 44 \(epoch 1\): lower the learning rate"),
    ],
    ids=["nan-loss", "nan-weights-at-save"],
)
def test_a_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(when, message, corpora, tmp_path, monkeypatch, capsys):
    corpus, _, cache = corpora
    monkeypatch.chdir(tmp_path)
    batch = "5" if when == "before" else "21"  # after the last batch of epoch 1: the loss never sees it, the save does
    poison = ["--trainer.callbacks+=kill_switch.PoisonAt", "--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", batch]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *data(corpus, cache), "--trainer.max_epochs", "3", *poison, "--trainer.callbacks.when", when])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(message, err.strip().splitlines()[-1]), err
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 22 and all(torch.isfinite(t).all() for t in last["state_dict"].values())
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch00-step22.ckpt", "last.ckpt"]


# --- fit --weights_from: a finishing phase from a trained run's weights ---------------------------------------
class FirstWeights(L.Callback):
    """The network's weights and the optimizer's state when training starts."""

    def on_train_start(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.network.state_dict().items()}
        self.optimizer_state = dict(trainer.optimizers[0].state)
        self.step, self.epoch = trainer.global_step, trainer.current_epoch


def test_weights_from_starts_a_new_run_from_trained_weights_and_a_fresh_optimizer(fitted, corpora, tmp_path):
    checkpoints, _ = fitted
    corpus, other, cache = corpora
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    args = [*data(corpus, cache), "--trainer.max_epochs", "1", "--weights_from", str(checkpoints / "last.ckpt"),
            "--trainer.callbacks+=lm_lightning.callbacks.quantization.QuantizationAwareFinishing", "--trainer.callbacks.bits", "8",
            "--trainer.callbacks.last_fraction", "1.0"]  # fmt: skip
    cli = build_cli(args, run=False)
    probe = FirstWeights()
    cli.trainer.callbacks.append(probe)
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        os.chdir(cwd)
    assert (probe.step, probe.epoch, probe.optimizer_state) == (0, 0, {})  # a new run: step 0, no optimizer state
    for name, tensor in probe.weights.items():  # ... that starts from the trained weights, not from a new init
        torch.testing.assert_close(tensor, last["state_dict"][f"network.{name}"], rtol=0, atol=0, msg=name)
    assert last["global_step"] > 0 and cli.trainer.global_step < last["global_step"]
    run = tmp_path / "lightning_logs" / "version_0"
    assert (run / "export" / "manifest.json").is_file()  # QAT's int8 export at the end of the finishing phase
    assert "weights_from" in (run / "config.yaml").read_text()  # the run says where it started


def test_pruning_from_trained_weights_starts_at_the_first_epoch(fitted, corpora, tmp_path, monkeypatch):
    """A finishing phase (--weights_from) prunes from epoch 0 unless start_epoch says otherwise; from scratch the
    network trains dense for an epoch first."""
    checkpoints, _ = fitted
    corpus, _, cache = corpora
    monkeypatch.chdir(tmp_path)
    pruning = ["--trainer.max_epochs", "2", "-c", str(ROOT / "configs/memory/pruning.yaml")]
    finishing = build_cli([*data(corpus, cache), *pruning, "--weights_from", str(checkpoints / "last.ckpt")], run=False)
    scratch = build_cli([*data(corpus, cache), *pruning], run=False)
    told = build_cli([*data(corpus, cache), *pruning, "--weights_from", str(checkpoints / "last.ckpt"), "--trainer.callbacks.start_epoch", "1"], run=False)
    for cli, start in ((finishing, 0), (scratch, 1), (told, 1)):
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, MagnitudePruning))
        assert callback.resolve_epochs(cli.trainer.max_epochs)[0] == start


@pytest.mark.parametrize(
    "subcommand, extra, message",
    [
        ("fit", ["--weights_from", "missing.ckpt"], r"^--weights_from missing.ckpt is not a file \(it does not exist\)"),
        ("fit", ["--weights_from", "OTHER"], r"^--weights_from .* cannot be loaded into this run's model: network.embedding.weight is"),
        ("validate", ["--weights_from", "LAST"], r"^--weights_from starts a new fit .*: give --ckpt_path to validate"),
    ],
)
def test_a_bad_weights_from_is_one_sentence(subcommand, extra, message, fitted, corpora, tmp_path_factory, monkeypatch):
    checkpoints, _ = fitted
    corpus, other, cache = corpora
    other_run = tmp_path_factory.mktemp("other_weights")
    if "OTHER" in extra and not (other_run / "lightning_logs").exists():
        in_folder(other_run, ["fit", *data(other, cache), "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1"])
    paths = {"OTHER": str(other_run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"), "LAST": str(checkpoints / "last.ckpt")}
    extra = [paths.get(e, e) for e in extra]
    monkeypatch.chdir(tmp_path_factory.mktemp("bad_weights_from"))
    with pytest.raises(LMInputError, match=message):
        build_cli([subcommand, *data(corpus, cache), "--trainer.max_epochs", "1", *extra])
    assert not Path("lightning_logs").exists()


def test_a_pinned_run_folder_is_evaluated_and_resumed_in_place_and_never_fitted_over(corpora, tmp_path, monkeypatch, capsys):
    """--trainer.logger.init_args.version NAME: predict/test/resume use the folder; a second fit into it is one sentence."""
    corpus, _, cache = corpora
    monkeypatch.chdir(tmp_path)
    pinned = ["--trainer.logger.init_args.version", "mine"]
    build_cli(["fit", *data(corpus, cache), "--trainer.max_epochs", "1", *pinned])
    run = tmp_path / "lightning_logs" / "mine"
    config, last = run / "config.yaml", run / "checkpoints" / "last.ckpt"
    written = config.read_text()
    test = build_cli(["test", "-c", str(config), "--ckpt_path", str(last)])  # was Lightning's "expected ... to NOT exist"
    assert float(test.trainer.callback_metrics["test/ppl"]) > 1 and config.read_text() == written
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {Path('lightning_logs') / 'mine'} already holds a run (its config.yaml): give another "
        "--trainer.logger.init_args.version (null for a new version_N), or resume that run with --ckpt_path."
    )
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written, not even an events file
    resumed = build_cli(["fit", "-c", str(config), "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    assert resumed.trainer.current_epoch == 2 and config.read_text() == written


def test_a_checkpoint_from_before_the_network_was_injected_is_one_sentence_naming_the_way_on(tmp_path, capsys):
    """Checkpoints of the template before the network became the model's argument hold its sizes as the model's own
    hyper-parameters: resuming or evaluating them is refused in one sentence; --weights_from loads their weights."""
    old = tmp_path / "old.ckpt"
    flat = {"vocab_size": 10, "embedding_dim": 8, "hidden_dim": 8, "num_layers": 1, "tie_weights": True, "loss_chunk_size": 0}
    torch.save({"state_dict": {"network.embedding.weight": torch.zeros(10, 8)}, "hyper_parameters": flat}, old)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--ckpt_path", str(old)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0
    assert "was written before the network became an argument of the model (its embedding_dim 8, hidden_dim 8" in err
    assert err.endswith("start a new fit from its weights with --weights_from and the same sizes as --model.network.* flags.")


# --- another optimizer on resume ----------------------------------------------------------------------------
def test_resuming_with_another_optimizer_is_one_sentence_and_a_new_lr_is_said(tmp_path, corpora, caplog):
    """The saved AdamW state cannot drive SGD (KeyError 'momentum' in its first step): refused before the run folder is
    touched, pointing at --weights_from. A new learning rate would be replaced by the saved one: said, and resumed."""
    corpus, _, cache = corpora
    in_folder(tmp_path, ["fit", *data(corpus, cache), "--trainer.max_epochs", "1"])
    run = tmp_path / "lightning_logs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    resume = ["fit", "-c", str(run / "config.yaml"), "--ckpt_path", str(last), "--trainer.max_epochs", "2", *QUIET]
    sentence = (r"^--model.optimizer SGD is not the optimizer .*last.ckpt was trained with \(its saved state has no "
                r"dampening, momentum, nesterov\): .* --weights_from .*last.ckpt instead of --ckpt_path\.$")
    with pytest.raises(LMInputError, match=sentence):
        in_folder(tmp_path, [*resume, "--model.optimizer", "SGD", "--model.optimizer.lr", "20"])
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    with caplog.at_level("WARNING"):
        cli = in_folder(tmp_path, [*resume, "--model.optimizer.lr", "0.5"])
    assert "--model.optimizer.lr 0.5 is not used when resuming" in caplog.text
    assert cli.trainer.current_epoch == 2
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-3)  # the run's own, as said
