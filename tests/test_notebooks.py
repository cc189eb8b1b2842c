"""The notebooks are documentation that runs: execute each one, and keep them stripped of outputs in git.

Execution happens on an in-memory copy in a temporary working directory with a temporary token cache, so a test
run writes nothing into the repository (no outputs in the .ipynb, no ``lightning_logs``).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def repo_notebooks() -> list[Path]:
    """Every notebook in the repository, skipping hidden folders (.venv, .ipynb_checkpoints, .git) and installed packages."""
    found = []
    for path in ROOT.rglob("*.ipynb"):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in {"site-packages", "node_modules", "venv"} for p in parts):
            continue
        found.append(path)
    return sorted(found)


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", repo_notebooks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_is_stripped(path: Path) -> None:
    """Committed notebooks carry no outputs and no execution counts (run them to see results)."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: code cells {dirty} have outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    original = path.read_bytes()
    had_logs = (ROOT / "lightning_logs").exists()

    workdir = tmp_path / "run"
    workdir.mkdir()
    # The kernel inherits this environment: a throw-away token cache, and the repository importable even
    # without an editable install. (jupyter_client starts the "python3" kernel with this interpreter.)
    monkeypatch.setenv("LM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's tempfile.mkdtemp() logs land under tmp_path

    nb = nbformat.reads(original.decode("utf-8"), as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, with the failing cell and traceback, if any cell raises
    finally:
        # Keep the executed copy next to the test's temporary files for debugging; never in the repository.
        nbformat.write(nb, tmp_path / path.name)
    print(f"{path.name} executed in {time.perf_counter() - start:.1f}s (python {sys.version.split()[0]})")

    assert path.read_bytes() == original, f"executing {path.name} modified the file in the repository"
    if not had_logs and (ROOT / "lightning_logs").exists():
        shutil.rmtree(ROOT / "lightning_logs", ignore_errors=True)
        pytest.fail(f"executing {path.name} left a lightning_logs folder in the repository")
