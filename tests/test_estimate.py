"""`python -m lm_lightning estimate` against what fits measure: 11 configurations (two vocabularies, precisions,
accumulation, chunked loss, recomputation, four optimizers, sparse gradients, pruning + QAT), each predicted and then
trained in its own process with the memory monitor on every step."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm_lightning.errors import LMInputError
from lm_lightning.memory.estimate import fixed_bytes, parse_size
from lm_lightning.memory.measure import allocated_bytes, human_bytes

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model.network.embedding_dim", "64", "--model.network.hidden_dim", "64", "--model.sample_length", "0"]
SGD = ["--model.optimizer", "SGD", "--model.optimizer.lr", "1", "--model.optimizer.weight_decay", "0"]
MEASURE = [
    "-c", str(ROOT / "configs/memory/monitor.yaml"), "--trainer.callbacks.log_every_n_steps", "1", "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "3",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--export.enabled", "false",
]  # fmt: skip
ESTIMATE = """
import dataclasses, json, sys
from lm_lightning.cli import estimate as run_estimate
estimate = run_estimate(sys.argv[1:])
print("ESTIMATE" + json.dumps({**dataclasses.asdict(estimate), "peak": estimate.peak}))
"""


def zipf_corpus(folder: Path, vocab: int = 20_000, tokens: int = 200_000) -> Path:
    """Words w0..w{vocab-1} with Zipf frequencies: a vocabulary of WikiText-2's order from a few MB of text."""
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, vocab + 1)
    words = np.array([f"w{i}" for i in range(vocab)])[rng.choice(vocab, size=tokens, p=p / p.sum())]
    lines = [" ".join(words[i : i + 20]) for i in range(0, tokens, 20)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", lines), ("valid", lines[:200]), ("test", lines[:200])):
        (folder / f"{name}.txt").write_text("\n".join(part) + "\n")
    return folder


def configurations(big: Path) -> dict[str, list[str]]:
    large = ["--data.source", str(big), "--data.tokenizer", "whitespace", "--data.min_freq", "1", "--data.batch_size", "20"]
    memory = ROOT / "configs" / "memory"
    return {
        "AdamW float32": [],
        "bf16-mixed": ["-c", str(memory / "bf16.yaml")],
        "accumulation 4 x 8 streams": ["-c", str(memory / "accumulation.yaml")],
        "chunked loss": ["--trainer.callbacks+=ChunkedLoss", "--trainer.callbacks.chunk_size", "64"],
        "recomputation": ["--trainer.callbacks+=Recomputation", "--trainer.callbacks.segments", "5"],
        "SGD with momentum": [*SGD, "--model.optimizer.momentum", "0.9"],
        "torchao 8-bit AdamW": ["--model.optimizer", "torchao.optim.AdamW8bit", "--model.optimizer.lr", "0.003"],
        "SGD, untied, sparse embedding gradient": [*SGD, "--model.network.tie_weights", "false", "--trainer.callbacks+=SparseEmbeddingGradients"],
        "pruning + int8 QAT": ["-c", str(memory / "pruning.yaml"), "-c", str(memory / "qat.yaml")],
        "vocabulary 20k": large,
        "vocabulary 20k, chunked loss": [*large, "--trainer.callbacks+=ChunkedLoss", "--trainer.callbacks.chunk_size", "256"],
    }


def run(args: list[str], cwd: Path, cache: Path) -> str:
    # A token cache of its own: what other tests leave in the session's cache cannot reach these processes.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LM_LIGHTNING_CACHE": str(cache)}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def predict_and_measure(name: str, extra: list[str], work: Path) -> tuple[dict, dict]:
    folder = work / name.replace(" ", "_").replace(",", "").replace("+", "and")
    folder.mkdir()
    common = ["-c", str(ROOT / "configs/default.yaml"), *SMALL, *extra]
    out = run([sys.executable, "-c", ESTIMATE, *common], folder, work / "cache")
    predicted = json.loads(next(line for line in out.splitlines() if line.startswith("ESTIMATE"))[len("ESTIMATE") :])
    run([sys.executable, "-m", "lm_lightning", "fit", *common, *MEASURE, "--trainer.logger.init_args.version", "m"], folder, work / "cache")
    events = EventAccumulator(str(folder / "lightning_logs" / "m"), size_guidance={"scalars": 0})
    events.Reload()
    measured = {tag.split("/")[1]: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("memory/")}
    return predicted, measured


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="estimate needs glibc's mallinfo2 (Linux)")
def test_predictions_match_eleven_measured_fits(tmp_path):
    big = zipf_corpus(tmp_path / "zipf")
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(configurations(big), pool.map(lambda item: predict_and_measure(*item, tmp_path), configurations(big).items())))
    report = []
    for name, (predicted, measured) in results.items():
        report.append(
            f"{name}: peak {predicted['peak'] / 2**20:.1f} (in fit {measured['predicted_peak_bytes'][0] / 2**20:.1f}) / "
            f"{max(measured['peak_bytes']) / 2**20:.1f} MiB, "
            f"activations {predicted['activations'] / 2**20:.2f} / {np.median(measured['retained_bytes'][1:]) / 2**20:.2f} MiB"
        )
        print(report[-1])
        # Exact: the same tensors, counted the same way (the monitor's values are logged as floats: exact below 2**24).
        assert predicted["params"] == measured["params_bytes"][-1], name
        assert predicted["grads"] == measured["grads_bytes"][-1], name
        assert predicted["optimizer"] == measured["optimizer_bytes"][-1], name
        # The fit's steady state: its first step also allocates what later steps reuse (oneDNN's primitive cache).
        assert predicted["activations"] == pytest.approx(np.median(measured["retained_bytes"][1:]), rel=0.05), name
        assert predicted["peak"] == pytest.approx(max(measured["peak_bytes"]), rel=0.15), (name, measured["peak_bytes"])
        # The same prediction, made by the monitor when the fit started (printed, logged, and in its summary).
        assert measured["predicted_peak_bytes"][0] == pytest.approx(max(measured["peak_bytes"]), rel=0.15), name
    sparse = results["SGD, untied, sparse embedding gradient"][0]
    assert sparse["grads"] < sparse["params"]  # the embedding's gradient is the batch's rows, not the whole matrix
    assert results["SGD with momentum"][0]["optimizer"] == results["SGD with momentum"][0]["params"]  # one buffer each
    eight_bit, adamw = results["torchao 8-bit AdamW"][0], results["AdamW float32"][0]
    assert eight_bit["optimizer"] < adamw["optimizer"]  # (tensors under 4,096 numbers stay float32 in torchao)
    plain, chunked = results["vocabulary 20k"][0], results["vocabulary 20k, chunked loss"][0]
    assert chunked["activations"] + chunked["temporaries"] < (plain["activations"] + plain["temporaries"]) / 3


@pytest.mark.parametrize(
    "text, expected",
    [("2GiB", 2 * 2**30), ("2 GB", 2 * 2**30), ("1.5G", int(1.5 * 2**30)), ("800MiB", 800 * 2**20), ("123456", 123456), ("64k", 65536)],
)
def test_budget_sizes(text, expected):
    assert parse_size(text) == expected


def test_a_bad_budget_is_one_sentence():
    with pytest.raises(LMInputError, match=r"^--budget 'two gigs' is not a size: give a number with a unit, such as 2GiB"):
        parse_size("two gigs")


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="estimate needs glibc's mallinfo2 (Linux)")
def test_a_budget_gets_the_cheapest_fit_line_or_the_smallest_reachable_peak(tmp_path, monkeypatch, capsys):
    from lm_lightning import cli
    from lm_lightning.memory import estimate

    # In this (pytest) process the resident set grows from call to call; the search is what is tested here (the
    # baseline against real fits in the test above), so it is held at a fixed value.
    monkeypatch.setattr(estimate, "rss_bytes", lambda: 500 * 2**20)
    estimate_command = cli.estimate
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), *SMALL]
    as_configured = estimate_command(common)
    # Half the activations and temporaries over the rest: the search must change something, and say what.
    budget = as_configured.peak - (as_configured.activations + as_configured.temporaries) // 2
    found = estimate_command([*common, "--budget", str(budget)])
    out = capsys.readouterr().out
    assert found.peak <= budget and found.settings != as_configured.settings
    line = next(text for text in out.splitlines() if text.startswith("python -m lm_lightning fit"))
    assert line.startswith("python -m lm_lightning fit " + " ".join(common))
    chosen = found.settings
    assert (chosen.loss_chunk_size and "--trainer.callbacks+=ChunkedLoss" in line) or (
        chosen.micro_batch_size < 32 and f"--trainer.callbacks.micro_batch_size {chosen.micro_batch_size}" in line
    )
    # Least recomputation first: nothing recomputed when a micro-batch or the chunked loss is enough.
    assert chosen.recompute_segments == 0

    # A byte above what no lever changes: the search tries every setting and reports the smallest peak it reached.
    budget = fixed_bytes(as_configured) + 1
    smallest = estimate_command([*common, "--budget", str(budget)])
    out = capsys.readouterr().out
    assert f"Budget {human_bytes(budget)}: nothing fits. The smallest reachable peak is" in out
    assert "its largest part is the process baseline" in out and smallest.peak > budget
    assert "glibc's heap keeps freed buffers on top of them" in out  # the headroom a budget answer needs

    estimate_command([*common, "-c", str(ROOT / "configs/memory/lean.yaml"), "--budget", "100GiB"])
    assert "glibc's heap keeps" not in capsys.readouterr().out  # the lean preset returns them


@pytest.mark.parametrize("args", [["--budget", "0"], ["--budget=0B"], ["--budget", "0.4"]], ids=["0", "0B", "under-a-byte"])
def test_a_budget_of_no_memory_is_one_sentence_before_anything_is_built(args, monkeypatch, capsys):
    from lm_lightning import cli

    monkeypatch.setattr(cli, "build_cli", lambda *a, **k: pytest.fail("built the run for a budget of no memory"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["estimate", "-c", str(ROOT / "configs/default.yaml"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert re.match(r"^error: --budget 0\S* is not a positive size: give the memory a fit may take, such as 2GiB or 800MiB\.$", err[0])


@pytest.mark.skipif(allocated_bytes(torch.device("cpu")) is None, reason="estimate needs glibc's mallinfo2 (Linux)")
def test_a_budget_below_what_no_setting_changes_says_nothing_fits_without_a_search(tmp_path, monkeypatch, capsys):
    """1 B is under the process baseline: nothing can fit, and the probes of a search would only spend time."""
    from lm_lightning import cli
    from lm_lightning.memory import estimate

    monkeypatch.setattr(estimate, "rss_bytes", lambda: 500 * 2**20)
    monkeypatch.setattr(estimate, "speed_line", lambda probe, current: "")  # timed probe steps: not what is tested here
    monkeypatch.setattr(estimate, "search", lambda *args: pytest.fail("searched below what no setting changes"))
    monkeypatch.chdir(tmp_path)
    tiny = ["--model.network.embedding_dim", "8", "--model.network.hidden_dim", "8", "--model.sample_length", "0", "--data.bptt", "8"]
    result = cli.estimate(["-c", str(ROOT / "configs/default.yaml"), *tiny, "--budget", "1B"])
    out = capsys.readouterr().out
    assert result.baseline == 500 * 2**20 - result.params + estimate.FIT_OVERHEAD_BYTES
    assert (
        f"\nBudget 1 B: nothing fits. What no setting of the search changes (the process baseline, parameters, gradients, "
        f"optimizer state) already takes {human_bytes(fixed_bytes(result))} before a training step, and its largest part is "
        f"the process baseline ({human_bytes(result.baseline)}). That is Python, torch, Lightning and the data, loaded before "
        "any model: a budget must be larger than it.\n"
    ) in out
    assert "leave some headroom" not in out and "python -m lm_lightning fit" not in out


def test_estimate_refuses_the_bag_path_in_one_sentence(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lm_lightning", "estimate", "-c", str(ROOT / "configs/bag_embedded.yaml")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: estimate covers the token path (LanguageModel)")


def test_the_printed_fit_line_runs_with_the_chosen_settings(tmp_path, monkeypatch):
    """fit_line's flags, as a user would paste them: the accumulation preset with the chosen micro-batch, the chunked
    loss and the recomputation reach the run."""
    import shlex

    from lm_lightning.callbacks.accumulation import MicroBatchAccumulation
    from lm_lightning.cli import build_cli
    from lm_lightning.memory.estimate import fit_line
    from lm_lightning.memory.probe import Settings

    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"), *SMALL]
    line = fit_line(common, Settings(32, 0, 0), Settings(8, 256, 6))
    args = shlex.split(line)[4:]  # after "python -m lm_lightning fit"
    cli = build_cli(["fit", *args, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    accumulation = next(c for c in cli.trainer.callbacks if isinstance(c, MicroBatchAccumulation))
    assert accumulation.sizes[0] == 8 and cli.trainer.global_step == 2  # 5 micro-batches of 8 streams: 4 + 1 steps
    assert cli.model.loss_head.chunk_size == 256 and cli.model.window_runner.segments == 6


def test_the_cli_loads_no_library_a_plain_run_does_not_use():
    """The template's own share of the process baseline: torchao (13 MB resident) only with QAT or an integer export,
    NLTK (36 MB) only with its tokenizers. Lightning's own imports (torch._dynamo, torchmetrics with scipy.signal and
    matplotlib: 179 MB over `import torch`) are the fixed term."""
    code = "import sys, lm_lightning.cli; print(sorted(m for m in ('torchao', 'nltk', 'sklearn') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]


def test_a_low_bit_optimizer_that_keeps_float32_state_is_named_with_the_block_size_that_fixes_it():
    """torchao's AdamW8bit leaves a weight's state in float32 when its size is not a multiple of block_size (256): a
    60 x 100 weight (6,000 numbers) keeps 47 KiB of state instead of ~12. The note says so and which block size
    quantizes it (250); with that block size there is nothing to say."""
    from torchao.optim import AdamW8bit

    from lm_lightning.memory.probe import block_size_note

    def stepped(**options):
        layer = torch.nn.Linear(60, 100)
        optimizer = AdamW8bit(layer.parameters(), lr=1e-3, **options)
        layer(torch.randn(2, 60)).sum().backward()
        optimizer.step()
        return optimizer

    note = block_size_note(stepped())
    assert note == (
        "Note: AdamW8bit keeps 46.9 KiB of its state in float32: those weights' sizes are not multiples of its "
        "block_size (256). --model.optimizer.block_size 250 would quantize 46.9 KiB of it."
    )
    assert block_size_note(stepped(block_size=250)) == ""
    assert block_size_note(torch.optim.AdamW(torch.nn.Linear(60, 100).parameters())) == ""
