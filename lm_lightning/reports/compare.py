"""``python -m lm_lightning compare RUN [RUN ...] [--out FILE.png]``: runs side by side, and the Pareto picture.

Reads what each run wrote to TensorBoard (``hparams.py``): its ``Memory strategies`` and the figures ``hp/best_val_ppl``,
``hp/peak_memory_mib``, ``hp/export_mib``, ``hp/test_ppl`` and ``hp/export_test_ppl``. Prints one row per run, best
validation perplexity first, and draws perplexity against peak training memory and against export size -- the test
perplexity where every run plotted has one (the export's own on the export panel), else the best validation one --
with the runs that no other run beats on both axes (the Pareto front: lower left is better) ringed and joined, so the
strategies worth their cost stand out. A folder that holds runs (``lightning_logs``) stands for all of them.

TensorBoard reads an event file up to its first damaged record and drops the rest without a word (a file of random
bytes, one cut short, an empty one): each file's records are checked first (``event_file_problem``), and a run with a
damaged one is left out of the table and the picture and named on stderr, one line each, with why.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lm_lightning.errors import LMInputError
from lm_lightning.io import atomic_path, disk_full
from lm_lightning.memory.available import human_bytes

FIGURES = {
    "best_val_ppl": "hp/best_val_ppl",
    "test_ppl": "hp/test_ppl",
    "export_test_ppl": "hp/export_test_ppl",
    "peak_memory_mib": "hp/peak_memory_mib",
    "export_mib": "hp/export_mib",
}
AXES = {"peak_memory_mib": "peak training memory (MiB)", "export_mib": "export size (MiB)"}


@dataclass
class Run:
    folder: Path
    label: str
    figures: dict[str, float] = field(default_factory=dict)
    hparams: dict[str, object] = field(default_factory=dict)

    def get(self, name: str) -> float:
        return self.figures.get(name, math.nan)


def run_folders(paths: list[str]) -> list[Path]:
    """Each path as a run (a folder with TensorBoard events), or the runs inside it, in name order."""
    folders: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise LMInputError(f"{path} is not a folder: give run folders (lightning_logs/version_N) or a folder that holds them.")
        if any(path.glob("events.out.tfevents.*")):
            folders.append(path)
            continue
        inside = sorted({p.parent for p in path.glob("*/events.out.tfevents.*")}, key=lambda p: p.name)
        if not inside:
            raise LMInputError(f"{path} holds no TensorBoard run: give run folders (lightning_logs/version_N) or lightning_logs.")
        folders.extend(inside)
    return folders


def event_file_problem(path: Path) -> Optional[str]:
    """Why TensorBoard would read the event file ``path`` in part or not at all, or None. Walks its records' framing
    (TFRecord: a length, the length's checksum, the data, the data's checksum), skipping the data: its checksum costs
    in pure Python what TensorBoard's own read costs, and damage inside a record is rarer than a file cut short."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            offset = 0
            while offset < size:
                header = f.read(12)
                if len(header) < 12:
                    return f"is cut short: a record's header at byte {offset:,} runs past its end ({size:,} bytes)"
                length, checksum = struct.unpack("<QI", header)
                if masked_crc32c(header[:8]) != checksum:
                    if offset == 0:
                        return "is not a TensorBoard event file (its first record's header fails its checksum)"
                    return f"is damaged at byte {offset:,} (a record's header fails its checksum)"
                if offset + 16 + length > size:
                    return f"is cut short: its record at byte {offset:,} needs {16 + length:,} bytes, {size - offset:,} are left"
                offset += 16 + length
                f.seek(offset)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    return "is empty (0 bytes)" if size == 0 else None


def run_problem(folder: Path) -> Optional[str]:
    """Why ``folder``'s runs cannot be compared as they are: its first damaged event file, or None."""
    for path in sorted(folder.glob("events.out.tfevents.*")):
        problem = event_file_problem(path)
        if problem is not None:
            return f"its event file {path.name} {problem}"
    return None


def read_runs(folders: list[Path]) -> tuple[list[Run], dict[Path, str]]:
    """The runs that can be read, and why each of the others cannot."""
    runs, unreadable = [], {}
    for folder in folders:
        problem = run_problem(folder)
        if problem is None:
            try:
                runs.append(read_run(folder))
                continue
            except Exception as err:  # intact records holding no event (TensorBoard's protobuf refuses them)
                problem = f"TensorBoard cannot read it ({type(err).__name__}: {err})"
        unreadable[folder] = problem
    return runs, unreadable


def read_run(folder: Path) -> Run:
    """The run's strategies label, flat settings and last value of each figure (NaN: not measured)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one line per event file read, otherwise
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    hparams: dict[str, object] = {}
    for meta in events.summary_metadata.values():
        if meta.plugin_data.plugin_name != "hparams":
            continue
        data = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)
        if data.HasField("session_start_info"):
            for name, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                hparams[name] = getattr(value, kind) if kind else None
    tags = set(events.Tags()["scalars"])
    figures = {}
    for name, tag in FIGURES.items():
        values = [e.value for e in events.Scalars(tag)] if tag in tags else []
        values = [v for v in values if not math.isnan(v)]
        if values:
            figures[name] = values[-1]
    if "best_val_ppl" not in figures and "val/ppl" in tags:  # a run from before hp/best_val_ppl: its best validation
        figures["best_val_ppl"] = min(e.value for e in events.Scalars("val/ppl"))
    # The picture's legend: the folder (two runs can have the same strategies) and the strategies.
    return Run(folder, f"{_name(folder)}: {strategies(hparams)}", figures, hparams)


def strategies(hparams: dict[str, object]) -> str:
    return str(hparams.get("Memory strategies", "(no HPARAMS row)"))


def pareto_front(runs: list[Run], x: str, y: str = "best_val_ppl") -> list[Run]:
    """The runs no other run beats on both ``x`` and ``y`` (lower is better on both), in order of ``x``."""
    measured = [r for r in runs if not math.isnan(r.get(x)) and not math.isnan(r.get(y))]

    def beaten(r: Run) -> bool:
        return any(
            o.get(x) <= r.get(x) and o.get(y) <= r.get(y) and (o.get(x) < r.get(x) or o.get(y) < r.get(y)) for o in measured
        )

    return sorted((r for r in measured if not beaten(r)), key=lambda r: (r.get(x), r.get(y)))


def quality(runs: list[Run], preferred: tuple[str, ...]) -> str:
    """The perplexity a panel plots: the first of ``preferred`` that every run with the panel's other figure has, so
    that one axis never mixes test and validation figures."""
    for name in preferred:
        if runs and all(not math.isnan(r.get(name)) for r in runs):
            return name
    return "best_val_ppl"


QUALITY_NAMES = {"best_val_ppl": "best validation perplexity", "test_ppl": "test perplexity", "export_test_ppl": "test perplexity of the export"}
# Per panel: the x figure, and the perplexities it prefers (the final model's, then the export's own when it ships).
PANELS = {"peak_memory_mib": ("test_ppl", "best_val_ppl"), "export_mib": ("export_test_ppl", "test_ppl", "best_val_ppl")}


def table(runs: list[Run]) -> str:
    def cell(value: float, fmt: str) -> str:
        return "—" if math.isnan(value) else format(value, fmt)

    lines = [
        "| run | memory strategies | best val ppl | test ppl | export test ppl | peak memory (MiB) | export (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(runs, key=lambda r: (math.isnan(r.get("best_val_ppl")), r.get("best_val_ppl"))):
        lines.append(
            f"| {_name(r.folder)} | {strategies(r.hparams)} | {cell(r.get('best_val_ppl'), '.2f')} | {cell(r.get('test_ppl'), '.2f')} | "
            f"{cell(r.get('export_test_ppl'), '.2f')} | {cell(r.get('peak_memory_mib'), ',.0f')} | {cell(r.get('export_mib'), ',.2f')} |"
        )
    return "\n".join(lines)


def _name(folder: Path) -> str:
    """The run folder as the user would type it: relative to here when it is below here."""
    relative = os.path.relpath(folder.absolute())
    return relative if not relative.startswith("..") else str(folder)


def plot(runs: list[Run], out: Path, title: Optional[str] = None) -> None:
    """Two panels, a perplexity against each of ``AXES`` (see ``PANELS``), one colour per run with the legend below,
    the Pareto front of each panel joined by a line and its runs ringed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    # Ten colours, then the same colours with another marker: neighbours in the legend never look alike.
    colour = {id(r): plt.get_cmap("tab10")(i % 10) for i, r in enumerate(runs)}
    marker = {id(r): "os^Dv"[i // 10 % 5] for i, r in enumerate(runs)}
    fig, axes = plt.subplots(1, len(AXES), figsize=(6.4 * len(AXES), 5.2))
    for ax, (x, name) in zip(axes, AXES.items()):
        with_x = [r for r in runs if not math.isnan(r.get(x))]
        y = quality(with_x, PANELS[x])
        shown = [r for r in with_x if not math.isnan(r.get(y))]
        front = pareto_front(shown, x, y)
        for r in shown:
            ringed = any(r is f for f in front)
            ax.scatter(r.get(x), r.get(y), s=80 if ringed else 50, zorder=3, color=colour[id(r)], marker=marker[id(r)],
                       edgecolors="black" if ringed else "none", linewidths=1.2)  # fmt: skip
        if len(front) > 1:
            ax.plot([r.get(x) for r in front], [r.get(y) for r in front], color="black", lw=0.8, ls="--", zorder=2)
        if not shown:
            ax.text(0.5, 0.5, f"no run measured {name}", transform=ax.transAxes, ha="center", color="gray")
        ax.set_xlabel(name)
        ax.set_ylabel(QUALITY_NAMES[y])
        ax.grid(alpha=0.3)
        ax.margins(x=0.15, y=0.15)
    handles = [plt.Line2D([], [], marker=marker[id(r)], ls="", color=colour[id(r)], label=r.label) for r in runs]
    handles.append(plt.Line2D([], [], marker="o", ls="--", color="black", markerfacecolor="white", label="Pareto front: no run is lower on both axes"))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title or "Perplexity against memory (lower left is better)")
    rows = math.ceil(len(handles) / 2)
    fig.tight_layout(rect=(0, min(0.45, 0.035 * rows + 0.03), 1, 1))
    try:
        with atomic_path(out) as tmp:  # a picture is replaced only when complete
            fig.savefig(tmp, dpi=110, format=out.suffix[1:])
    except Exception as err:
        # A full disk reaches here as ENOSPC, or as what a backend makes of it (the PDF writer's AttributeError).
        if disk_full(err):
            free = shutil.disk_usage(out.absolute().parent).free
            kept = "the old picture is left as it was" if out.exists() else "nothing was written"
            raise LMInputError(
                f"--out {out} cannot be written: the disk is full ({human_bytes(free)} free there; {kept}): free space "
                "there, or give a path on another disk."
            ) from None
        if isinstance(err, OSError):
            raise LMInputError(f"--out {out} cannot be written ({err.strerror or err}): give a path in a writable folder.") from None
        raise
    finally:
        plt.close(fig)


def compare_command(args: list[str]) -> list[Run]:
    parser = argparse.ArgumentParser(
        prog="python -m lm_lightning compare", description=__doc__.split("\n\n")[1], exit_on_error=False
    )
    parser.add_argument("runs", nargs="+", help="run folders (lightning_logs/version_N), or folders that hold runs")
    parser.add_argument("--out", type=Path, default=None, help="write the Pareto picture here (.png, .svg or .pdf)")
    parser.add_argument("--title", default=None, help="the picture's title")
    options = parser.parse_args(args)
    if options.out is not None and options.out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LMInputError(f"--out {options.out} names no picture format: end it in .png, .svg or .pdf.")
    named = {Path(p).absolute() for p in options.runs}
    runs, unreadable = read_runs(run_folders(options.runs))
    for folder, problem in unreadable.items():
        print(f"left out {_name(folder)}: {problem}.", file=sys.stderr)
    if not runs:
        raise LMInputError(
            f"none of the {len(unreadable)} run(s) in {' '.join(options.runs)} could be read (each is named above): "
            "give run folders whose event files are intact."
        )
    # Of the runs found inside a folder, the trained ones: a stand-alone validate/test/predict of no run's checkpoint
    # (lightning_logs/test_0, ...) writes no HPARAMS row.
    runs = [r for r in runs if r.hparams or r.folder.absolute() in named]
    print(table(runs))
    if options.out is not None:
        plot(runs, options.out, options.title)
        print(f"\nWrote {options.out}")
    return runs
