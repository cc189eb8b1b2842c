"""Shared test set-up: offline, CPU, a throw-away token cache, NLTK data from ../shared when present."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Before lm_lightning is imported anywhere: never write the user's ~/.cache from tests.
os.environ["LM_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="lm_lightning_test_cache_")
if (SHARED / "nltk_data").is_dir():
    os.environ.setdefault("NLTK_DATA", str(SHARED / "nltk_data"))
# Subprocesses (CLI tests) must import this checkout and the test-only models in tests/.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses started by tests

import torch  # noqa: E402

# One intra-op thread, set before any fixture runs: the test models are tiny, so threads only add overhead, and
# on a loaded 2-core machine two threads per process made small fits ~10-40x slower (measured).
torch.set_num_threads(1)

requires_shared = pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is not present next to the project")


def write_corpus(folder: Path, train: str, valid: str, test: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A short, repetitive corpus a small model can learn in a few steps."""
    lines = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."]
    text = "\n".join(lines * 30) + "\n"
    return write_corpus(tmp_path / "tiny", text, text, text)


sys.path.insert(0, str(ROOT / "tests"))
