"""The bounds of every generation (``deploy/sampling.py``): ``generate`` on an export, ``OnnxModel.generate`` and
``generation.sample`` in Python, and ``predict``'s flags. A request past a fixed cap, a temperature that is not a
finite one, or more text than memory holds is refused in one sentence before the first step; it used to run into a
MemoryError traceback, run on for days, or sample uniformly (``--temperature inf``)."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from test_deploy import lstm_export, network, one_sentence  # noqa: F401  (lstm_export: the module's fixture)

from lm_lightning.__main__ import main
from lm_lightning.deploy import sampling
from lm_lightning.deploy.runtime import OnnxModel
from lm_lightning.deploy.sampling import MAX_NEW_TOKENS, MAX_SAMPLES, PREDICT_FLAGS, check_sampling, sampling_bytes
from lm_lightning.errors import LMInputError
from lm_lightning.generation import sample
from lm_lightning.systems import LanguageModel

# (keyword arguments over the defaults, the sentence's start); the same sentences from the CLI and the Python API.
BAD_SETTINGS = [
    ({"max_new_tokens": 10**12}, "--max-new-tokens 1,000,000,000,000 is more than the 100,000 tokens one run generates"),
    ({"max_new_tokens": -1}, "--max-new-tokens must be >= 0, got -1"),
    ({"max_new_tokens": 2.5}, "--max-new-tokens must be an integer, got 2.5"),
    ({"temperature": float("inf")}, "--temperature must be at most 100, got inf"),
    ({"temperature": 1e300}, "--temperature must be at most 100, got 1e+300"),
    ({"temperature": 1e-300}, "--temperature must be 0 or at least 0.001, got 1e-300: colder is greedy in effect"),
    ({"temperature": float("nan")}, "--temperature must be >= 0, got nan"),
    ({"temperature": "hot"}, "--temperature must be a number, got 'hot'"),
    ({"top_k": 0}, "--top-k must be a positive integer, got 0"),
    ({"top_k": 2.5}, "--top-k must be a positive integer, got 2.5"),
    ({"num_samples": 10**9}, "--num-samples 1,000,000,000 is more than the 10,000 samples one run generates"),
    ({"num_samples": 0}, "--num-samples must be a positive integer, got 0"),
]
DEFAULTS = {"max_new_tokens": 5, "temperature": 0.8, "top_k": 50, "num_samples": 1}


@pytest.mark.parametrize("change, expected", BAD_SETTINGS, ids=[str(c) for c, _ in BAD_SETTINGS])
def test_out_of_bounds_settings_are_one_sentence_in_the_python_api(lstm_export, change, expected):  # noqa: F811
    settings = {**DEFAULTS, **change}
    with pytest.raises(LMInputError, match="^" + expected.replace("(", r"\(").replace("+", r"\+")):
        OnnxModel.load(lstm_export).generate("the cat", **settings)
    assert issubclass(LMInputError, ValueError)  # what a caller of the API catches


def test_the_edges_are_accepted(lstm_export):  # noqa: F811
    model = OnnxModel.load(lstm_export)
    assert model.generate("the", 3, temperature=0) == model.generate("the", 3, temperature=0.001, top_k=1)  # 0: greedy
    assert len(model.generate("the", 2, temperature=100, top_k=10**12, num_samples=3)) == 3  # k past the vocabulary: all
    check_sampling(MAX_NEW_TOKENS, 0.8, None, MAX_SAMPLES)


def test_generate_refuses_them_on_the_command_line_and_states_the_limits(lstm_export, capsys):  # noqa: F811
    folder = str(lstm_export)
    for args, expected in [
        (["--num-samples", "1000000000"], "--num-samples 1,000,000,000 is more than the 10,000 samples one run generates: give 10,000 or fewer."),
        (["--max-new-tokens", "1000000000000"], "--max-new-tokens 1,000,000,000,000 is more than the 100,000 tokens one run generates"),
        (["--temperature", "inf"], "--temperature must be at most 100, got inf"),
    ]:
        assert one_sentence(capsys, ["generate", folder, *args]).startswith(f"error: {expected}")
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0 to 100,000" in help_text and "1 to 10,000" in help_text and "from 0.001 to 100" in help_text and "0 = greedy" in help_text
    for number in ("100,000", "10,000", "0.001 to 100"):  # predict's flags: their docstring is their --help
        assert number in " ".join(LanguageModel.__doc__.split())


def test_more_text_than_memory_holds_is_refused_before_the_first_step(lstm_export, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(sampling, "available_bytes", lambda: 4 << 20)
    model = OnnxModel.load(lstm_export)
    model.generate("the cat", 1000, num_samples=10)  # 0.7 MiB: fits
    with pytest.raises(LMInputError, match=r"^1,000 samples \(--num-samples\) of 10,002 tokens \(the prompt and --max-new-tokens\) need about 615\.7 MiB of memory, more than the 4\.0 MiB this process can still take: give fewer samples, or at most about 59 tokens each\.$"):  # fmt: skip
        model.generate("the cat", 10_000, num_samples=1000)
    err = one_sentence(capsys, ["generate", str(lstm_export), "--prompt", "the cat", "--num-samples", "1000", "--max-new-tokens", "10000"])
    assert "need about 615.7 MiB of memory" in err
    # The torch path (a safetensors export, predict, the validation sample): the same check, the network left as it was.
    net = network("lstm").train()
    with pytest.raises(LMInputError, match="need about"):
        sample(net, torch.zeros(1000, 2, dtype=torch.long), 10_000)
    assert net.training


def test_the_memory_formula_bounds_what_generating_allocates(lstm_export):  # noqa: F811
    """``sampling_bytes`` is an upper bound of the bytes Python and numpy hold at the peak of a generation (ONNX
    Runtime's own arena aside), for many short rows, a few long ones, and the graph's top-k."""
    model = OnnxModel.load(lstm_export)
    prompt = len(model.encode_prompt("the cat"))
    for rows, new, top_k in [(1, 1500, None), (100, 100, None), (30, 200, 5)]:
        tracemalloc.start()
        try:
            model.generate("the cat", new, 1.0, top_k, 0, rows)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= sampling_bytes(rows, prompt + new, min(top_k or 12, 12)), (rows, new, top_k, peak)


def test_predict_flags_are_refused_when_the_model_is_built():
    for kwargs, expected in [
        ({"max_new_tokens": 10**6}, "--model.max_new_tokens 1,000,000 is more than the 100,000 tokens one run generates"),
        ({"sample_length": 10**6}, "--model.sample_length 1,000,000 is more than the 100,000 tokens"),
        ({"temperature": float("inf")}, "--model.temperature must be at most 100, got inf"),
        ({"temperature": 1e-9}, "--model.temperature must be 0 or at least 0.001, got 1e-09"),
        ({"top_k": 0}, "--model.top_k must be a positive integer, got 0: give e.g. 50, or null to sample from all tokens."),
    ]:
        with pytest.raises(LMInputError, match="^" + expected.replace("(", r"\(")):
            LanguageModel(network("lstm"), **kwargs)
    with pytest.raises(LMInputError, match=r"^--data.num_prompts 20,000 is more than the 10,000 samples"):
        check_sampling(5, 0.8, None, 20_000, PREDICT_FLAGS)
