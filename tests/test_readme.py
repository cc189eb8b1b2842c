"""Every one-liner of the README's table, run as written (from a folder that holds the repository's configs, with a run
already in lightning_logs/version_0), each fit made short by the debug preset appended. What cannot run offline as
written is substituted, and said: the public corpora by name read the development copy of them through
``--data.data_dir`` (skipped where it is absent), ``DIR`` is the development NLTK data, TensorBoard's server is not
started."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import SHARED_NLTK, SHARED_PTB, SHARED_WT2

from lm_lightning.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DEBUG = ["-c", "configs/presets/debug.yaml", *QUIET]
CORPUS_DIRS = {"configs/ptb_small.yaml": SHARED_PTB, "configs/wikitext2_small.yaml": SHARED_WT2, "configs/wikitext2_adaptive.yaml": SHARED_WT2}


def one_liners() -> list[tuple[str, str]]:
    """``(what, command)`` for each row of the README's one-liner table: its first ``python -m lm_lightning`` command."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## One-liners", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("what", "---"):
            continue
        commands = re.findall(r"`([^`]*python -m [^`]+)`", cells[1])
        if commands:
            rows.append((cells[0], commands[0]))
    return rows


ROWS = one_liners()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder like the repository root after a short fit that exported for ONNX Runtime (lightning_logs/version_0),
    with the text files and the corpus folder (path/to/folder) the one-liners name."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    sample = "the cat sat on the mat . a dog ran after the cat .\n" * 2000  # 5% of it is more than one window
    (folder / "book.txt").write_text(sample)
    (folder / "my_text.txt").write_text(sample)
    (folder / "zh.txt").write_text("我们今天去公园散步。天气很好，我们很高兴。\n" * 2000)
    (folder / "path" / "to" / "folder").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (folder / "path" / "to" / "folder" / f"{split}.txt").write_text(sample)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        main(["fit", *DEBUG, "--export.bits", "8", "--export.format", "onnx"])
    finally:
        os.chdir(cwd)
    assert (folder / "lightning_logs/version_0/export-onnx/manifest.json").is_file()
    return folder


def runnable(command: str) -> tuple[list[str], dict[str, str]]:
    """The command's arguments after ``python -m lm_lightning``, its environment prefix, and the substitutions above."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[:3] == ["python", "-m", "tensorboard.main"]:
        pytest.skip("starts TensorBoard's server (docs/tensorboard.md shows what it serves)")
    assert words[:3] == ["python", "-m", "lm_lightning"], command
    args = words[3:]
    if env.get("NLTK_DATA") == "DIR":
        if SHARED_NLTK is None:
            pytest.skip("NLTK's brown corpus is not on this machine")
        env["NLTK_DATA"] = str(SHARED_NLTK)
    for recipe, data in CORPUS_DIRS.items():
        if recipe in args:
            if data is None:
                pytest.skip(f"{recipe} downloads its corpus by name; no local copy here (offline)")
            args += ["--data.data_dir", str(data)]
    if args[0] in ("fit", "validate", "test", "predict", "estimate") and "--help" not in args and "--print_config" not in args:
        args += DEBUG  # short: the debug preset last, so its limits win
    return args, env


def newest_run(folder: Path) -> Path:
    return max((folder / "lightning_logs").glob("version_*"), key=lambda run: run.stat().st_mtime_ns)


def newest_export(folder: Path) -> Path:
    return max((folder / "lightning_logs").glob("version_*/export*/manifest.json"), key=lambda m: m.stat().st_mtime_ns).parent


def config_of(run: Path) -> str:
    return (run / "config.yaml").read_text()


# What each flag says it does, checked on what the command left behind (rows not named here are checked by exit status
# and, for generate/predict/score, by their output).
EFFECTS = {
    "Penn Treebank": lambda out, d: "source: ptb" in config_of(newest_run(d)),
    "SGD instead of AdamW": lambda out, d: "torch.optim.SGD" in (c := config_of(newest_run(d))) and "lr: 20" in c,
    "Chinese or other text without spaces": lambda out, d: "tokenizer: char" in config_of(newest_run(d)),
    "one text file, split 90/5/5": lambda out, d: "source: book.txt" in config_of(newest_run(d)),
    "export a checkpoint (int8)": lambda out, d: json.loads((newest_export(d) / "manifest.json").read_text())["bits"] == 8,
    "export a checkpoint for ONNX Runtime (int8)": lambda out, d: any(newest_export(d).glob("*.onnx")),
    "finish a trained run with QAT int8": lambda out, d: "QuantizationAwareFinishing" in config_of(newest_run(d)),
    "predict a run's peak memory, and what fits 2 GiB": lambda out, d: "Predicted peak memory" in out and "Budget 2.0 GiB" in out,
    "print the resolved config": lambda out, d: "ptb" in out and "max_epochs: 13" in out,
    "compare runs: table + Pareto picture": lambda out, d: (d / "pareto.png").stat().st_size > 0,
}


@pytest.mark.slow
@pytest.mark.parametrize(("what", "command"), ROWS, ids=[what for what, _ in ROWS])
def test_every_readme_one_liner_runs_as_written(what, command, workdir, monkeypatch, capsys):
    args, env = runnable(command)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(workdir)
    try:
        main(args)
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), f"{command} -> exit {exit_info.code}: {capsys.readouterr().err[-2000:]}"
    out = capsys.readouterr().out
    if args[0] in ("generate", "predict"):
        assert out.strip(), f"{command} printed no text"
    if args[0] == "score":
        assert "perplexity" in out
    for start, effect in EFFECTS.items():
        if what.startswith(start):
            assert effect(out, workdir), f"{command} ran, but did not do what its row says ({what})"


def test_the_table_is_read():
    """The parser above finds the table's rows (a renamed section would otherwise test nothing)."""
    assert len(ROWS) >= 20 and all(c.startswith(("python -m", "NLTK_DATA")) for _, c in ROWS)
    for start in EFFECTS:
        assert any(what.startswith(start) for what, _ in ROWS), f"no README one-liner starts with {start!r}"
