"""`compare` with runs it cannot read and a disk it cannot write: TensorBoard drops a damaged event file without a
word, so a run of random bytes, one cut short or an empty one used to vanish from the table with exit status 0. Each is
now named on stderr, one line with why, and the rest compared; none readable is one sentence, exit 2. A full disk
while the picture is written is one sentence too, and the old picture stays as it was."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from lm_lightning.cli import main
from lm_lightning.reports.compare import event_file_problem


def write_run(root: Path, version: int, ppl: float, mib: float) -> Path:
    """A run as fit leaves it for compare: its HPARAMS row and its figures (reports/hparams.py)."""
    logger = TensorBoardLogger(root, name="lightning_logs", version=version, default_hp_metric=False)
    logger.log_hyperparams({"Memory strategies": f"strategy {version}"}, {"hp/best_val_ppl": ppl})
    logger.log_metrics({"hp/best_val_ppl": ppl, "hp/peak_memory_mib": mib}, step=1)
    logger.finalize("success")
    return Path(logger.log_dir)


def event_file(run: Path) -> Path:
    return next(run.glob("events.out.tfevents.*"))


def damaged_runs(root: Path) -> dict[str, Path]:
    """Three runs, each with one way TensorBoard reads nothing (or part) of it."""
    runs = {name: write_run(root, v, 100.0 + v, 500.0 - v) for v, name in enumerate(["random", "cut", "empty"], start=1)}
    event_file(runs["random"]).write_bytes(os.urandom(4000))
    data = event_file(runs["cut"]).read_bytes()
    event_file(runs["cut"]).write_bytes(data[: len(data) - 10])
    event_file(runs["empty"]).write_bytes(b"")
    return runs


def test_each_unreadable_run_is_named_and_the_rest_compared(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, 0, 90.0, 600.0)
    damaged_runs(tmp_path)
    main(["compare", "lightning_logs", "--out", "pareto.png"])  # returns: exit status 0
    out, err = capsys.readouterr()
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| lightning_logs/")] == ["| lightning_logs/version_0"]
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")
    lines = err.strip().splitlines()
    assert len(lines) == 3, err
    expected = [
        r"left out lightning_logs/version_1: its event file events\.out\.tfevents\.\S+ is not a TensorBoard event file "
        r"\(its first record's header fails its checksum\)\.$",
        r"left out lightning_logs/version_2: its event file \S+ is cut short: its record at byte [\d,]+ needs [\d,]+ bytes, [\d,]+ are left\.$",
        r"left out lightning_logs/version_3: its event file \S+ is empty \(0 bytes\)\.$",
    ]
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), line


def test_no_readable_run_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    damaged_runs(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "lightning_logs"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 4 and all(line.startswith("left out ") for line in err[:3])
    assert err[-1] == (
        "error: none of the 3 run(s) in lightning_logs could be read (each is named above): give run folders whose event files are intact."
    )


def test_the_framing_check(tmp_path):
    good = event_file(write_run(tmp_path, 0, 90.0, 600.0))
    assert event_file_problem(good) is None
    data = bytearray(good.read_bytes())
    first = 16 + int.from_bytes(data[:8], "little")  # where the second record starts
    data[first] ^= 0xFF
    good.write_bytes(bytes(data))
    assert event_file_problem(good) == f"is damaged at byte {first:,} (a record's header fails its checksum)"
    good.write_bytes(bytes(data[:5]))
    assert event_file_problem(good) == "is cut short: a record's header at byte 0 runs past its end (5 bytes)"


@pytest.mark.parametrize("suffix", [".png", ".pdf"])  # .pdf: matplotlib's writer turns ENOSPC into an AttributeError
def test_a_full_disk_keeps_the_old_picture(tmp_path, monkeypatch, capsys, small_disk, suffix):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path, 0, 90.0, 600.0)
    write_run(tmp_path, 1, 95.0, 500.0)
    disk = small_disk(64)
    old = disk / f"pareto{suffix}"
    old.write_bytes(b"the old picture")
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # fill it up, then give back the last few KiB
        try:
            while True:
                f.write(b"\0" * 1024)
        except OSError:
            pass
    filler.write_bytes(filler.read_bytes()[:-4096])  # 4 KiB free: less than any picture
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "lightning_logs", "--out", str(old)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --out {old} cannot be written: the disk is full (")
    assert err[0].endswith("; the old picture is left as it was): free space there, or give a path on another disk.")
    assert old.read_bytes() == b"the old picture"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", old.name]  # no temporary file left
