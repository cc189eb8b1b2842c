"""Every bad input on the command line ends with one sentence (issue 8).

For each case: exit status 2, one ``error: ...`` line that names the flag (or file) and the fix, as the last line of
stderr (and its only line for parser errors, which used to print 70-80 lines of usage first), no traceback, no run
folder, and nothing else on disk changed: the working folder and the token cache list the same files before and after.
Most cases call ``main`` in-process for speed; a few run ``python -m lm_lightning`` to hold the real exit path.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_corpus

from lm_lightning.cli import main
from lm_lightning.storage.preflight import check_training_budget

LINES = ["the cat sat on the mat .", "the dog sat on the log .", "a cat and a dog ."]  # conftest.tiny_corpus
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_MODEL = ["--model.network.embedding_dim", "8", "--model.network.hidden_dim", "8", "--model.network.num_layers", "1", "--model.sample_length", "2"]
ONE_STEP = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """conftest's tiny corpus, once for the module, and its token cache built once (so every case is a cache hit)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = write_corpus(root / "tiny", *(["\n".join(LINES * 30) + "\n"] * 3))
    cache = root / "cache"
    data = ["--data.source", str(corpus), "--data.cache_dir", str(cache), "--data.tokenizer", "whitespace", "--data.min_freq", "1"]
    data += ["--data.batch_size", "2", "--data.eval_batch_size", "2", "--data.bptt", "4"]
    from lm_lightning.data import TokenDataModule

    assert TokenDataModule(source=str(corpus), cache_dir=str(cache), tokenizer="whitespace", min_freq=1, batch_size=2, bptt=4).vocab_size == 12
    files = root / "files"
    files.mkdir()
    (files / "broken.yaml").write_text("trainer:\n  max_epochs: [1\n")
    (files / "random.yaml").write_bytes(bytes(range(128, 256)) * 3)  # never valid UTF-8
    (files / "empty.yaml").write_text("")
    (files / "list.yaml").write_text("- 1\n- 2\n")
    (files / "typo.yaml").write_text("trainr:\n  max_epochs: 1\n")
    (files / "a_file").write_text("not a folder")
    return {"corpus": corpus, "cache": cache, "args": ["fit", *QUIET, *data, *TINY_MODEL, *ONE_STEP], "files": files}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def one_sentence(err: str, pattern: str, parser_error: bool) -> str:
    """The error line, after checking the shape every bad input must have."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if parser_error:  # no usage text, no logging: the sentence is all there is
        assert lines == errors, err
    assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    return errors[0]


# (id, arguments after the subcommand, the error line's pattern); {files} is the folder of prepared config files.
PARSER_CASES = [
    ("unknown-tokenizer", ["--data.tokenizer", "foo"], r"^error: --data.tokenizer 'foo' is not valid: give one of treebank, whitespace, char\.$"),
    ("mistyped-key", ["--data.batchsize", "3"], r"^error: --data.batchsize is not an option of TokenDataModule: did you mean --data.batch_size\?"),
    ("mistyped-model-key", ["--model.num_layer", "3"], r"^error: --model.num_layer is not an option of LanguageModel: did you mean --model.network.num_layers\?"),
    ("wrong-type", ["--data.batch_size", "ten"], r"^error: --data.batch_size 'ten' is not valid: give an integer\.$"),
    ("wrong-type-float", ["--model.optimizer.lr", "abc"], r"^error: --model.optimizer.lr 'abc' is not valid: give a number\.$"),
    ("wrong-type-bool", ["--model.network.tie_weights", "maybe"], r"^error: --model.network.tie_weights 'maybe' is not valid: give true/false\.$"),
    ("precision-nonsense", ["--trainer.precision", "nonsense"], r"^error: --trainer.precision 'nonsense' is not valid: give one of 64, 32, 16, .*bf16-mixed"),
    ("max-epochs-text", ["--trainer.max_epochs", "ten"], r"^error: --trainer.max_epochs 'ten' is not valid: give an integer or null\.$"),
    ("unknown-trainer-flag", ["--trainer.max_epocs", "3"], r"^error: --trainer.max_epocs is not an option: did you mean --trainer.max_epochs\? \(`python -m"),
    # No prefix matching (build_cli sets allow_abbrev=False): a typo is never silently taken for a longer option.
    ("prefix", ["--trainer.max", "3"], r"^error: --trainer.max is not an option: check the spelling"),
    ("typo-that-is-a-prefix", ["--trainer.max_epoch", "3"], r"^error: --trainer.max_epoch is not an option: did you mean --trainer.max_epochs\?"),
    ("stray-word", ["stray"], r"^error: stray is not a subcommand or option"),
    ("missing-value", ["--data.source"], r"^error: --data.source needs a value"),
    ("model-not-importable", ["--model", "foo.Bar"], r"^error: --model foo.Bar is not a class .*No module named 'foo'.*lm_lightning.systems.LanguageModel"),
    ("model-not-a-system", ["--model", "torch.nn.Linear"], r"^error: --model torch.nn.Linear is not a class .*subclass of StreamSystem"),
    ("optimizer-unknown", ["--model.optimizer", "torch.optim.Nope"], r"^error: --model.optimizer torch.optim.Nope is not a class .*torch.optim.AdamW"),
    ("config-missing", ["-c", "{files}/nope.yaml"], r"^error: -c .*nope.yaml: file does not exist: give the path of a YAML config"),
    ("config-folder", ["-c", "{files}"], r"^error: -c .*files: path is not a file"),
    ("config-broken-yaml", ["-c", "{files}/broken.yaml"], r"^error: -c .*broken.yaml is not valid YAML \(.*line \d+, column \d+\): fix the file"),
    ("config-binary", ["-c", "{files}/random.yaml"], r"^error: -c .*random.yaml is not a text file \(byte 0 is not UTF-8\)"),
    ("config-empty", ["-c", "{files}/empty.yaml"], r"^error: -c .*empty.yaml is empty: a config maps sections to settings"),
    ("config-list", ["-c", "{files}/list.yaml"], r"^error: -c .*list.yaml is a list, not a mapping of settings"),
    ("config-misspelled-section", ["-c", "{files}/typo.yaml"], r"^error: trainr.max_epochs \(in the -c file\) is not an option: did you mean --trainer.max_epochs\?"),
]


@pytest.mark.parametrize("case, extra, pattern", PARSER_CASES, ids=[c[0] for c in PARSER_CASES])
def test_parser_errors_are_one_sentence_without_usage(tiny, tmp_path, monkeypatch, capsys, case, extra, pattern):
    monkeypatch.chdir(tmp_path)
    extra = [arg.replace("{files}", str(tiny["files"])) for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *extra])
    assert exit_info.value.code == 2
    one_sentence(capsys.readouterr().err, pattern, parser_error=True)
    assert listing(tmp_path) == []


def test_unknown_subcommand_and_export_keys(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args, pattern in [
        (["bogus"], r"^error: 'bogus' is not a subcommand: use one of fit, validate, test, predict, export"),
        ([], r"^error: a subcommand is missing: use one of fit, validate, test, predict, export, e.g. `python -m lm_lightning fit`\.$"),
        (["export", "--data.batchsize", "3"], r"^error: --data.batchsize is not an option .*`python -m lm_lightning export --help`"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        one_sentence(capsys.readouterr().err, pattern, parser_error=True)
    assert listing(tmp_path) == []


# Settings that parse but cannot train (or would train on nothing); found before any run folder exists.
SETTING_CASES = [
    ("num-layers-0", ["--model.network.num_layers", "0"], r"--model.network.num_layers must be a positive integer, got 0"),
    ("embedding-0", ["--model.network.embedding_dim", "0", "--model.network.tie_weights", "false"], r"--model.network.embedding_dim must be a positive integer, got 0"),
    ("hidden-0", ["--model.network.hidden_dim", "0", "--model.network.tie_weights", "false"], r"--model.network.hidden_dim must be a positive integer, got 0"),
    ("tied-sizes-differ", ["--model.network.hidden_dim", "16"], r"tie_weights needs embedding_dim == hidden_dim \(got 8 and 16\).*--model.network.tie_weights false"),
    ("lr-negative", ["--model.optimizer.lr", "-1"], r"--model.optimizer.lr must be positive, got -1.0: give a learning rate"),
    ("lr-zero", ["--model.optimizer.lr", "0"], r"--model.optimizer.lr must be positive, got 0.0"),
    ("weight-decay-negative", ["--model.optimizer.weight_decay", "-1"], r"--model.optimizer was refused by torch \(Invalid weight_decay value: -1.0\)"),
    ("dropout-1.5", ["--model.network.dropout", "1.5"], r"--model.network.dropout must be in \[0, 1\), got 1.5"),
    ("dropout-negative", ["--model.network.dropout", "-0.1"], r"--model.network.dropout must be in \[0, 1\), got -0.1"),
    ("sample-length-negative", ["--model.sample_length", "-1"], r"--model.sample_length must be >= 0, got -1"),
    ("max-new-tokens-negative", ["--model.max_new_tokens", "-5"], r"--model.max_new_tokens must be >= 0, got -5"),
    ("temperature-negative", ["--model.temperature", "-1"], r"--model.temperature must be >= 0, got -1.0: give 0 for greedy"),
    ("top-k-0", ["--model.top_k", "0"], r"--model.top_k must be a positive integer, got 0"),
    ("max-new-tokens-too-many", ["--model.max_new_tokens", "1000000000000"], r"--model.max_new_tokens 1,000,000,000,000 is more than the 100,000 tokens one run generates: give 100,000 or fewer"),
    ("temperature-inf", ["--model.temperature", ".inf"], r"--model.temperature must be at most 100, got inf: hotter samples uniformly in effect"),
    ("temperature-tiny", ["--model.temperature", "1e-300"], r"--model.temperature must be 0 or at least 0.001, got 1e-300: colder is greedy in effect"),
    ("bptt-0", ["--data.bptt", "0"], r"--data.bptt must be a positive integer, got 0"),
    ("batch-size-0", ["--data.batch_size", "0"], r"--data.batch_size must be a positive integer, got 0"),
    ("eval-batch-size-0", ["--data.eval_batch_size", "0"], r"--data.eval_batch_size must be a positive integer, got 0"),
    ("min-freq-0", ["--data.min_freq", "0"], r"--data.min_freq must be a positive integer, got 0"),
    # The tiny corpus' most frequent word ("the") occurs 120 times in train.
    ("min-freq-too-high", ["--data.min_freq", "1000"], r"--data.min_freq 1000 leaves 0 words .*occurs 120 times\): lower --data.min_freq to 120 or less\.$"),
    ("max-vocab-1", ["--data.max_vocab_size", "1"], r"--data.max_vocab_size 1 leaves no room for a word .*give at least 3"),
    ("max-epochs-0", ["--trainer.max_epochs", "0", "--trainer.max_steps", "-1"], r"--trainer.max_epochs 0 trains nothing"),
    ("max-epochs-minus-2", ["--trainer.max_epochs", "-2"], r"Lightning refused the --trainer settings \(`max_epochs` must be a non-negative integer or -1"),
    ("max-steps-0", ["--trainer.max_steps", "0"], r"--trainer.max_steps 0 trains nothing"),
    ("limit-train-batches-0", ["--trainer.limit_train_batches", "0"], r"--trainer.limit_train_batches 0 trains nothing"),
    ("devices-text", ["--trainer.devices", "abc"], r"Lightning refused the --trainer settings \(`devices` selected with `CPUAccelerator`"),
    ("root-dir-under-a-file", ["--trainer.default_root_dir", "/dev/null/x"], r"The folder /dev/null/x cannot be created because /dev/null is a file.*--trainer.default_root_dir"),
    ("save-dir-under-a-file", ["--trainer.logger.init_args.save_dir", "{files}/a_file/logs"], r"a_file/logs/lightning_logs/version_0 cannot be created because .*a_file is a file.*save_dir"),
]


@pytest.mark.parametrize("case, extra, pattern", SETTING_CASES, ids=[c[0] for c in SETTING_CASES])
def test_bad_settings_are_one_sentence_before_any_run_folder(tiny, tmp_path, monkeypatch, capsys, case, extra, pattern):
    monkeypatch.chdir(tmp_path)
    extra = [arg.replace("{files}", str(tiny["files"])) for arg in extra]
    cache_before, files_before = listing(tiny["cache"]), listing(tiny["files"])
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny["args"], *extra])
    assert exit_info.value.code == 2
    one_sentence(capsys.readouterr().err, r"^error: .*" + pattern, parser_error=False)
    assert listing(tmp_path) == []  # no lightning_logs/version_N, nothing else
    assert listing(tiny["cache"]) == cache_before and listing(tiny["files"]) == files_before


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--data.num_prompts", "1000000000"], r"^error: --data.num_prompts 1,000,000,000 is more than the 10,000 samples one run generates: give 10,000 or fewer\.$"),
        (["--data.num_prompts", "5000", "--model.max_new_tokens", "90000"], r"^error: 5,000 samples \(--data.num_prompts\) of 90,002 tokens \(the prompt and --model.max_new_tokens\) need about 26.9 GiB of memory, more than the 1.0 GiB this process can still take: give fewer samples, or at most about 3,350 tokens each\.$"),
    ],
    ids=["num-prompts-too-many", "more-than-memory-holds"],
)
def test_predict_bounds_are_one_sentence_before_the_run(tiny, tmp_path, monkeypatch, capsys, extra, pattern):
    """--data.num_prompts is the datamodule's and the sampling settings the model's: predict checks them together, in
    the model's setup, before predict_dataloader builds a batch per prompt (10**9 of them filled the memory)."""
    from lm_lightning.deploy import sampling

    monkeypatch.setattr(sampling, "available_bytes", lambda: 1 << 30)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *tiny["args"][1:], *extra])
    assert exit_info.value.code == 2
    one_sentence(capsys.readouterr().err, pattern, parser_error=False)
    assert listing(tmp_path) == []


def test_a_working_folder_that_cannot_be_written(tiny, monkeypatch, capsys):
    """/sys takes no new file, even for root (who ignores permission bits, so chmod 0555 would prove nothing)."""
    monkeypatch.chdir("/sys")
    with pytest.raises(SystemExit) as exit_info:
        main(tiny["args"])
    assert exit_info.value.code == 2
    one_sentence(capsys.readouterr().err, r"^error: The folder /sys/lightning_logs/version_0 cannot be written \(/sys: .*\): run from a writable folder", False)


def test_bad_input_found_after_the_run_folder_exists_takes_it_away(tiny, tmp_path, monkeypatch, capsys):
    """A quantization group that does not divide the network's width is found in the callback's setup, after Lightning
    made lightning_logs/version_0: the failed start removes it (and lightning_logs, which it also created)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    qat = ["--trainer.callbacks+=lm_lightning.callbacks.quantization.QuantizationAwareFinishing"]
    qat += ["--trainer.callbacks.bits", "4", "--trainer.callbacks.group_size", "3", "--trainer.max_epochs", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny["args"], *qat])
    assert exit_info.value.code == 2
    one_sentence(capsys.readouterr().err, r"^error: group_size 3 does not divide the input width 8", False)
    assert listing(tmp_path) == ["keep.txt"]


def test_an_existing_run_folder_is_never_removed(tiny, tmp_path, monkeypatch, capsys):
    """Only what the failed start created goes: earlier runs in lightning_logs stay."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    (tmp_path / "lightning_logs" / "version_0" / "events").write_text("an earlier run")
    qat = ["--trainer.callbacks+=lm_lightning.callbacks.quantization.QuantizationAwareFinishing"]
    qat += ["--trainer.callbacks.bits", "4", "--trainer.callbacks.group_size", "3", "--trainer.max_epochs", "1"]
    with pytest.raises(SystemExit):
        main([*tiny["args"], *qat])
    capsys.readouterr()
    assert listing(tmp_path) == ["lightning_logs", "lightning_logs/version_0", "lightning_logs/version_0/events"]


def test_minus_one_epochs_is_lightnings_no_limit(tiny):
    """-1 (no limit, with --trainer.max_steps as the budget) is Lightning's documented meaning: accepted."""
    from lightning import Trainer

    check_training_budget(Trainer(max_epochs=-1, max_steps=5, logger=False, enable_checkpointing=False))
    with pytest.raises(Exception, match="max_epochs 0 trains nothing"):
        check_training_budget(Trainer(max_epochs=0, logger=False, enable_checkpointing=False))


@pytest.mark.parametrize(
    "extra, pattern, first_line",
    [
        (["--data.tokenizer", "foo"], r"^error: --data.tokenizer 'foo' is not valid: give one of treebank, whitespace, char\.$", True),
        (["--model.optimizer.lr", "-1"], r"^error: --model.optimizer.lr must be positive, got -1.0", False),
    ],
    ids=["parser", "negative-lr"],
)
def test_the_real_exit_path(tiny, tmp_path, extra, pattern, first_line):
    """`python -m lm_lightning`: exit status 2, no traceback; parser errors print the sentence alone."""
    extra = [arg.replace("{files}", str(tiny["files"])) for arg in extra]
    args = ["fit", *extra] if first_line else [*tiny["args"], *extra]
    env = {**os.environ, "LM_LIGHTNING_CACHE": str(tiny["cache"])}
    proc = subprocess.run([sys.executable, "-m", "lm_lightning", *args], cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stderr
    one_sentence(proc.stderr, pattern, parser_error=first_line)
    assert listing(tmp_path) == []
