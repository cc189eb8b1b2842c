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

# isort: off
# The CLI before nltk: with nltk imported first, jsonargparse parses "--trainer.limit_train_batches 1" as 1.0 (all
# batches) instead of 1 batch (nltk 3.10.4, jsonargparse 4.53.0). `python -m lm_lightning` imports the CLI first.
import lm_lightning.cli  # noqa: E402, F401
import nltk  # noqa: E402
from nltk.corpus.reader import StopwordsCorpusReader  # noqa: E402
from nltk.corpus.util import LazyCorpusLoader  # noqa: E402
import torch  # noqa: E402
# isort: on

# One intra-op thread, set before any fixture runs: the test models are tiny, so threads only add overhead, and
# on a loaded 2-core machine two threads per process made small fits ~10-40x slower (measured).
torch.set_num_threads(1)

# --- The CPU where a test means the CPU, the GPU where it means the GPU ------------------------------------------
# On a machine with a GPU, `--trainer.accelerator auto` (the CLI's default) and a bare L.Trainer() put a fit on it, and
# the CPU tests' assertions (bit-exact resume, oneDNN dtypes, RSS peaks) fail there. So the whole session, module-scoped
# fixtures included, sees no accelerator: Lightning's availability checks say no (in-process fits, and a GPU asked for
# by name fails), and CUDA_VISIBLE_DEVICES="" hides the GPUs from the CLI run in subprocesses. A test that means the
# GPU, marked `cuda` (or skipped without CUDA: see pytest_collection_modifyitems), gets both back for its duration.
from lightning.fabric import accelerators as fabric  # noqa: E402
from lightning.pytorch import accelerators as trainer  # noqa: E402

ACCELERATORS = (fabric.CUDAAccelerator, fabric.MPSAccelerator, trainer.CUDAAccelerator, trainer.MPSAccelerator)
REAL_AVAILABILITY = {cls: cls.__dict__["is_available"] for cls in ACCELERATORS}
VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
if torch.cuda.is_available():
    # Before hiding the GPUs: Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, under which an uninitialized torch reads
    # CUDA_VISIBLE_DEVICES at every is_available(); initialized, this process keeps the GPUs it found, for the CUDA tests.
    torch.cuda.init()
_pinned = pytest.MonkeyPatch()
for _cls in ACCELERATORS:
    _pinned.setattr(_cls, "is_available", staticmethod(lambda: False))
_pinned.setenv("CUDA_VISIBLE_DEVICES", "")


def _means_the_gpu(item: pytest.Item) -> bool:
    """Marked ``cuda``, or skipped where CUDA is missing (a ``skipif`` whose reason names CUDA or a GPU)."""
    reasons = [str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif")]
    return item.get_closest_marker("cuda") is not None or any("cuda" in r or "gpu" in r for r in reasons)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: means the GPU: runs with the accelerators visible (python -m pytest -m cuda)")


def pytest_unconfigure(config: pytest.Config) -> None:
    _pinned.undo()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _means_the_gpu(item) and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _accelerators_for_cuda_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda") is None:
        return
    for cls, real in REAL_AVAILABILITY.items():
        monkeypatch.setattr(cls, "is_available", real)
    if VISIBLE_DEVICES is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", VISIBLE_DEVICES)

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




@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk(kib)``: a folder on a tmpfs of that size, to fill up for real (skipped where mounting is not
    allowed: it needs root, or a container that permits it). Unmounted at the end."""
    import subprocess

    mounts = []

    def make(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip() or 'mount failed'})")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def shared(*parts: str) -> Path | None:
    """A path under the shared read-only data folder (next to the repository, or inside it), if present."""
    for base in (ROOT.parent / "shared", ROOT / "shared"):
        if base.joinpath(*parts).exists():
            return base.joinpath(*parts)
    return None


SHARED_NLTK = shared("nltk_data")
SHARED_PTB = shared("data", "ptb")
SHARED_WT2 = shared("data", "wikitext-2")


@pytest.fixture
def shared_nltk(monkeypatch):
    """NLTK searches ../shared/nltk_data first (skipped where that folder is absent)."""
    if SHARED_NLTK is None:
        pytest.skip("../shared/nltk_data is not present")
    monkeypatch.setattr(nltk.data, "path", [str(SHARED_NLTK), *nltk.data.path])
    return SHARED_NLTK


@pytest.fixture
def no_nltk_data(monkeypatch, tmp_path):
    """NLTK searches only an empty folder: every corpus (stopwords, wordnet, ...) is missing."""
    empty = tmp_path / "empty_nltk_data"
    empty.mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(empty)])
    return empty


def fresh_stopwords_loader(monkeypatch) -> None:
    """A not-yet-loaded ``nltk.corpus.stopwords``: once loaded, NLTK's lazy loader never looks at the path again."""
    loader = LazyCorpusLoader("stopwords", StopwordsCorpusReader, r"(?!README|\.).*", encoding="utf8")
    monkeypatch.setattr(nltk.corpus, "stopwords", loader)


# A corpus small enough to encode by hand (whitespace tokens, min_freq=1):
#   train counts: the 3, sat 2, cat/dog/mat/on 1 -> itos <unk> <eos> the sat cat dog mat on
TRAIN = "the cat sat on the mat\nthe dog sat\n"
VALID = "the cat ran\n"
TEST = "a dog sat\n"
ITOS = ["<unk>", "<eos>", "the", "sat", "cat", "dog", "mat", "on"]
TRAIN_IDS = [2, 4, 3, 7, 2, 6, 1, 2, 5, 3, 1]
VALID_IDS = [2, 4, 0, 1]  # "ran" is unknown
TEST_IDS = [0, 5, 3, 1]  # "a" is unknown


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "tiny", TRAIN, VALID, TEST)


def make_dm(source: Path, cache: Path, **overrides):
    """The token data module on a hand-encodable corpus (whitespace tokens, min_freq=1, tiny windows)."""
    from lm_lightning.data import TokenDataModule  # after the environment above is set

    settings = dict(tokenizer="whitespace", min_freq=1, batch_size=2, eval_batch_size=1, bptt=2)
    settings.update(overrides)
    return TokenDataModule(source=str(source), cache_dir=str(cache), **settings)


def cache_entries(cache: Path) -> list[str]:
    """Everything in the cache root, hidden temporary folders included."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


sys.path.insert(0, str(ROOT / "tests"))


def val_ppl(cli) -> list[float]:
    """The validation perplexity a fit logged, epoch by epoch (its TensorBoard events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("val/ppl")]
