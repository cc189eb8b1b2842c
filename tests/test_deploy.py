"""generate / score on an ONNX export with ONNX Runtime and numpy alone (lm_lightning/deploy/): the torch path's
perplexity and greedy text, its sentences for bad input, and a process that imports neither torch nor Lightning."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from gru_model import GRUNetwork

from lm_lightning.__main__ import main
from lm_lightning.data import StreamWindows, TokenDataModule, Vocabulary
from lm_lightning.data.preprocessing import Preprocessor, tokenize_lines
from lm_lightning.deploy import sampling
from lm_lightning.deploy.layout import GOOD_CHECKPOINT, sealed_manifest
from lm_lightning.deploy.runtime import OnnxModel
from lm_lightning.deploy.scoring import stream_windows
from lm_lightning.evaluation import perplexity
from lm_lightning.export.onnx_writer import export_onnx
from lm_lightning.export.quantization import dequantize_weight, quantize_weight
from lm_lightning.export.writer import export_model
from lm_lightning.generation import sample
from lm_lightning.networks import LSTMNetwork

LINES = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."]
TEXT = "\n".join(LINES * 6) + "\nthe zebra sat on the cat .\n"  # 146 tokens, 1 unknown
SETTINGS = TokenDataModule(eval_batch_size=3, bptt=5).export_settings()  # how the export step writes metadata["text"]
TORCH_FAMILY = {"torch", "lightning", "jsonargparse", "scipy"}


def vocabulary() -> Vocabulary:
    return Vocabulary.build(Counter(tokenize_lines("\n".join(LINES), Preprocessor(), False)))


V = len(vocabulary())  # 12: 10 words, <unk> and <eos>


def network(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    size = len(vocabulary())
    net = LSTMNetwork(size, 16, 16, 2, 0.0, True) if kind == "lstm" else GRUNetwork(size, 16, 16, 2)
    with torch.no_grad():  # trained-looking weights, so that int8 / int4 rounding moves the perplexity
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.eval()


def export(net: torch.nn.Module, folder: Path, bits=None) -> Path:
    metadata = {"text": SETTINGS, "evaluation": {"test_ppl": 9.87, "test_batches": 2}}
    export_onnx(net, folder, bits, 8, vocabulary(), metadata, accuracy_level=0)  # 0: float products, as torch's
    return folder


@pytest.fixture(scope="module")
def lstm_export(tmp_path_factory) -> Path:
    return export(network("lstm"), tmp_path_factory.mktemp("deploy") / "lstm")


def torch_perplexity(net: torch.nn.Module, text: str) -> float:
    ids = vocabulary().encode_array(tokenize_lines(text, Preprocessor(**SETTINGS["preprocessing"]), False))
    return perplexity(net, StreamWindows(ids, SETTINGS["eval_batch_size"], SETTINGS["bptt"]))


# --- score ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length, streams, bptt", [(130, 3, 5), (31, 3, 9), (40, 1, 39), (100, 7, 4), (12, 2, 5)])
def test_numpy_windows_are_stream_windows(length, streams, bptt):
    ids = np.random.default_rng(length).integers(0, 50, length).astype(np.int32)
    ours = list(stream_windows(ids, streams, bptt))
    theirs = list(StreamWindows(ids, streams, bptt))
    assert len(ours) == len(theirs) > 0
    for (inputs, targets), batch in zip(ours, theirs):
        assert np.array_equal(inputs, batch.inputs.numpy()) and np.array_equal(targets, batch.targets.numpy())
        assert targets.size == batch.divisor


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_score_is_the_torch_networks_perplexity(kind, bits, tmp_path):
    net = network(kind)
    model = OnnxModel.load(export(net, tmp_path / "e", bits))
    reference = copy.deepcopy(net)
    if bits:  # the network with the weights the export stores: every matrix through the project's rule
        with torch.no_grad():
            for p in reference.parameters():
                if p.dim() == 2:
                    p.copy_(dequantize_weight(*quantize_weight(p, bits, 8)))
    result = model.score_text(TEXT, "the text")
    expected = torch_perplexity(reference, TEXT)
    assert result["ppl"] == pytest.approx(expected, rel=1e-5)
    assert result["tokens"] == 146 and result["unknown"] == 1 and result["seconds"] >= 0
    if bits:  # the rounding is really there: the float network scores differently
        assert abs(torch_perplexity(net, TEXT) / expected - 1) > 1e-4


def test_score_prints_the_torch_paths_line(lstm_export, tmp_path, capsys):
    """The same network as a safetensors export: `score` prints the same line from either folder."""
    export_model(network("lstm"), tmp_path / "st", None, 32, vocabulary(), {"text": SETTINGS, "evaluation": {"test_ppl": 9.87}})
    (tmp_path / "t.txt").write_text(TEXT)
    lines = []
    for folder in (lstm_export, tmp_path / "st"):
        main(["score", str(folder), str(tmp_path / "t.txt")])
        lines.append(capsys.readouterr().out.strip())
    assert lines[0].split(", ")[0] == lines[1].split(", ")[0]  # all but the seconds
    assert "over 146 tokens (1 unknown: <unk>)" in lines[0] and "the export measured 9.87" in lines[0]


# --- generate ---------------------------------------------------------------------------------------
def test_generate_seeds_samples_and_prompts(lstm_export):
    model = OnnxModel.load(lstm_export)
    texts = model.generate("the cat", max_new_tokens=20, temperature=1.0, seed=3, num_samples=3)
    assert texts == model.generate("the cat", max_new_tokens=20, temperature=1.0, seed=3, num_samples=3)
    assert texts != model.generate("the cat", max_new_tokens=20, temperature=1.0, seed=4, num_samples=3)
    assert len(texts) == 3 and len(set(texts)) > 1 and all(t.startswith("the cat") for t in texts)
    greedy = model.generate("the cat", max_new_tokens=12, temperature=0)
    assert greedy == model.generate("the cat", max_new_tokens=12, temperature=0, seed=99)
    assert greedy == model.generate("the cat", max_new_tokens=12, temperature=0.8, top_k=1, seed=7)  # top-1 is greedy
    # As predict: unknown words become <unk>, an empty prompt starts after an end of line.
    assert model.encode_prompt("zebras unknown") == [model.vocab.unk_id] * 2
    assert model.generate("zebras unknown", max_new_tokens=3)[0].startswith("<unk> <unk>")
    assert model.encode_prompt("") == [model.vocab.eos_id]
    assert len(model.generate("", max_new_tokens=5)) == 1
    assert model.generate("the cat", max_new_tokens=0) == ["the cat"]


def test_greedy_text_is_the_torch_networks(lstm_export):
    model, net = OnnxModel.load(lstm_export), network("lstm")
    ids = torch.tensor([model.encode_prompt("the dog")] * 2)
    tokens = sample(net, ids, 15, temperature=0)[0].tolist()
    assert model.generate("the dog", max_new_tokens=15, temperature=0) == [model.preprocessor.detokenize(model.vocab.decode(tokens))]


def test_sampling_draws_the_softmax_of_the_top_k():
    logits = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=np.float32)).repeat(20_000, 0)
    rng = np.random.default_rng(0)
    counts = np.bincount(sampling.next_tokens(logits, 1.0, None, rng)[:, 0], minlength=5) / 20_000
    assert np.abs(counts - [0.5, 0.2, 0.15, 0.1, 0.05]).max() < 0.01
    counts = np.bincount(sampling.next_tokens(logits, 1.0, 2, rng)[:, 0], minlength=5) / 20_000
    assert counts[2:].sum() == 0 and abs(counts[0] - 0.5 / 0.7) < 0.01
    cold = np.bincount(sampling.next_tokens(logits, 0.25, None, rng)[:, 0], minlength=5) / 20_000  # p^4, renormalized
    assert abs(cold[0] - 0.5**4 / (0.5**4 + 0.2**4 + 0.15**4 + 0.1**4 + 0.05**4)) < 0.01


# --- the process ------------------------------------------------------------------------------------
def test_generate_and_score_import_no_torch(lstm_export, tmp_path, capsys):
    """The commands run in-process in a fresh interpreter, through the function `python -m lm_lightning` and the
    `lm-lightning` script call; then the modules it holds and its peak resident memory."""
    (tmp_path / "t.txt").write_text(TEXT)
    code = (
        "import sys\nfrom lm_lightning.__main__ import main\n"
        f"main(['generate', {str(lstm_export)!r}, '--prompt', 'the cat', '--max-new-tokens', '8', '--num-samples', '2'])\n"
        f"main(['score', {str(lstm_export)!r}, {str(tmp_path / 't.txt')!r}])\n"
        f"print('IMPORTED', sorted(m for m in sys.modules if m.split('.')[0] in {TORCH_FAMILY!r}))\n"
        "print('PEAK', next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    out = result.stdout.splitlines()  # a sample can span lines: <eos> is a line end
    assert out[0] == "--- sample 1 (seed 0)" and out[1].startswith("the cat") and "--- sample 2 (seed 0)" in out
    assert sum(": perplexity " in line and " over 146 tokens (1 unknown: <unk>), " in line for line in out) == 1
    assert out[-2] == "IMPORTED []"
    peak_mib = int(out[-1].split()[1]) / 1024
    with capsys.disabled():
        print(f"\n[deploy] generate + score on a tiny ONNX export: peak RSS {peak_mib:.1f} MiB, torch/lightning/jsonargparse/scipy: none")
    assert peak_mib < 150
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^lm-lightning = "lm_lightning.__main__:main"', pyproject, re.M)  # the script: the same dispatch


# --- bad input --------------------------------------------------------------------------------------
def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a file and list its new size and hash, so that only the runtime's own checks can refuse it."""
    (folder / name).write_bytes(data)
    edit_manifest(folder, lambda m: m["files"].update({name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


def edit_manifest(folder: Path, change, seal: bool = True) -> None:
    """Change the manifest and, as a careful tamperer would, seal it anew: the checks behind the seal are tested."""
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(sealed_manifest(manifest) if seal else json.dumps(manifest))


def nan_weight(f: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(f / "model.onnx"))
    bias = next(t for t in model.graph.initializer if t.name.endswith("decoder.bias"))
    values = numpy_helper.to_array(bias).copy()
    values[2] = np.nan
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    rewrite(f, "model.onnx", model.SerializeToString())


def truncate(f: Path) -> None:
    rewrite(f, "model.onnx", (f / "model.onnx").read_bytes()[:-700])


def flip_byte(f: Path) -> None:
    data = bytearray((f / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (f / "model.onnx").write_bytes(bytes(data))


def link_outside(f: Path) -> None:
    outside = f.parent / f"outside-{f.name}.onnx"
    (f / "model.onnx").rename(outside)
    (f / "model.onnx").symlink_to(outside)  # the same bytes, so only the lstat check refuses it


def vocab_short(f: Path) -> None:
    itos = json.loads((f / "vocab.json").read_text())["itos"]
    rewrite(f, "vocab.json", json.dumps({"itos": itos[:-1]}).encode())


BAD_FOLDERS = {
    "truncated": (truncate, "ONNX Runtime refuses model.onnx ("),
    "flipped byte": (flip_byte, "model.onnx does not match the manifest (size or SHA-256 differ)"),
    "link outside": (link_outside, "model.onnx is not a regular file (a link, a folder or a device)"),
    "graph missing": (lambda f: (f / "model.onnx").unlink(), "model.onnx is missing"),
    "foreign name": (
        lambda f: edit_manifest(f, lambda m: m["files"].update({"../model.onnx": m["files"]["model.onnx"]})),
        "its manifest lists '../model.onnx', not a file an ONNX export holds (model.onnx, vocab.json)",
    ),
    "extra file": (lambda f: (f / "notes.txt").write_text("x"), "notes.txt is in the folder but not in the manifest"),
    "vocabulary size": (vocab_short, f"vocab.json holds {V - 1} tokens, the graph predicts {V}"),
    "manifest garbage": (lambda f: (f / "manifest.json").write_bytes(b"\x00{not json"), "manifest.json cannot be read as JSON"),
    "manifest format": (lambda f: edit_manifest(f, lambda m: m.update(version=9)), "its manifest is ('lm_lightning.onnx', 9)"),
    "manifest edited by hand": (  # a change no other check sees: the graph's recorded operators
        lambda f: edit_manifest(f, lambda m: m["graph"].update(operators=[]), seal=False),
        "manifest.json does not match its own manifest_sha256: it was edited or damaged after the export",
    ),
    "NaN weight": (nan_weight, f"model.onnx holds NaN or infinite values (in network.decoder.bias); {GOOD_CHECKPOINT}."),
    "logits width": (
        lambda f: edit_manifest(f, lambda m: m["graph"].update(vocab_size=V + 1)),
        f"its graph's logits is tensor(float) ['batch', 'time', {V}], not float (batch, time, {V + 1})",
    ),
    "state name": (
        lambda f: edit_manifest(f, lambda m: m["graph"]["state"][1].update(input="h")),
        "its graph takes ['ids', 'state_0', 'state_1'], its manifest describes ['h', 'ids', 'state_0']",
    ),
    "state shape": (
        lambda f: edit_manifest(f, lambda m: m["graph"]["state"][0].update(shape=[2, None, 17])),
        "its graph's state state_0 is tensor(float) [2, 'batch', 16], its manifest describes float [2, None, 17]",
    ),
}


def one_sentence(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_damaged_folder_is_one_sentence(case, lstm_export, tmp_path, capsys):
    damage, expected = BAD_FOLDERS[case]
    folder = tmp_path / "e"
    shutil.copytree(lstm_export, folder)
    damage(folder)
    err = one_sentence(capsys, ["generate", str(folder)])
    assert err.startswith(f"error: {folder} is not a readable lm_lightning ONNX export: {expected}"), err
    assert err.endswith(("; export the model again.", f"; {GOOD_CHECKPOINT}."))


def test_bad_arguments_are_one_sentence(lstm_export, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("the cat\n")
    folder = str(lstm_export)
    for args, expected in [
        (["generate", str(tmp_path / "missing")], f"{tmp_path / 'missing'} does not exist: give an export folder"),
        (["generate", folder, "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1: give a number of tokens"),
        (["generate", folder, "--top-k", "-1"], "--top-k must be a positive integer, got -1"),
        (["generate", folder, "--threads", "0"], "--threads must be a positive integer, got 0."),
        (["generate", folder, "--dequantize"], "unrecognized arguments: --dequantize: see python -m lm_lightning generate --help."),
        (["score", folder], "the following arguments are required: file: see python -m lm_lightning score --help."),
        (["score", folder, str(tmp_path / "empty.txt")], "empty.txt is empty"),
        (["score", folder, str(tmp_path / "short.txt")], "short.txt has 3 tokens, fewer than one evaluation window needs"),
        (["score", folder, str(tmp_path / "none.txt")], "none.txt does not exist: give the text file to score."),
    ]:
        assert expected in one_sentence(capsys, args)
    # The real exit path: one line, status 2, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "lm_lightning", "score", folder, str(tmp_path / "empty.txt")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- the benchmark ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_inference_benchmark_measures_both_runtimes_and_scores_what_was_written(lstm_export, tmp_path):
    """benchmarks/inference.py on an ONNX export and the safetensors export of the same network: every column is
    filled, the ONNX row's process never imported torch, and `score` reproduces what each export wrote."""
    root = Path(__file__).resolve().parents[1]
    safetensors = tmp_path / "safetensors"
    export_model(network("lstm"), safetensors, None, 32, vocabulary(), {"text": SETTINGS})
    text = tmp_path / "test.txt"
    text.write_text(TEXT, encoding="utf-8")
    ppl = OnnxModel.load(lstm_export).score_file(text)["ppl"]
    out = tmp_path / "bench.json"
    command = [sys.executable, str(root / "benchmarks/inference.py"), "--test-file", str(text), "--tokens", "20",
               "--repeats", "1", "--rounds", "1", "--out", str(out), f"onnx={lstm_export}", f"torch={safetensors}"]  # fmt: skip
    table = subprocess.run(command, check=True, capture_output=True, text=True, cwd=root).stdout
    rows = json.loads(out.read_text())
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["onnx", "torch"]
    assert rows["onnx"]["onnx"] and not rows["onnx"]["torch_imported"] and rows["torch"]["torch_imported"]
    for row in rows.values():
        assert row["test_ppl"] == pytest.approx(ppl, rel=1e-5)  # the same network, both runtimes
        assert row["tokens_per_s"] > 0 and len(row["startup_runs"]) == 1 and row["startup_runs"][0] > 0
        assert row["rss_import_bytes"] <= row["rss_loaded_bytes"] <= row["peak_generate_bytes"] <= row["peak_score_bytes"]
    assert rows["onnx"]["peak_generate_bytes"] < rows["torch"]["rss_import_bytes"]  # ONNX Runtime's whole process < torch's import


def test_scoring_in_stream_groups_is_scoring_whole_windows(lstm_export, monkeypatch):
    """A window's streams run in groups whose logits fit SCORE_LOGITS_BYTES, each carrying its own state: the same
    perplexity as whole windows."""
    from lm_lightning.deploy import runtime

    whole = OnnxModel.load(lstm_export).score_text(TEXT)["ppl"]
    monkeypatch.setattr(runtime, "SCORE_LOGITS_BYTES", 1)  # one stream a group
    assert OnnxModel.load(lstm_export).score_text(TEXT)["ppl"] == pytest.approx(whole, rel=1e-6)
    assert len(runtime.stream_groups(3, 5, V, 1)) == 3 and len(runtime.stream_groups(3, 5, V, 1 << 20)) == 1
