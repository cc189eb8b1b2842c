"""``generate`` and ``score`` on an export folder: ONNX Runtime for an ONNX export, the torch loader for the others.

    python -m lm_lightning generate EXPORT_DIR --prompt "the meaning of" --max-new-tokens 40 --num-samples 3
    python -m lm_lightning score EXPORT_DIR some_text.txt

The folder's contents choose the runtime: an ONNX export (``model.onnx``) runs in ``runtime.py``'s :class:`OnnxModel`,
in a process that never imports torch or Lightning (``__main__.py`` sends these two commands here first); any other
folder goes to ``export/commands.py``'s ``ExportedModel``, imported only then. Both print the same lines and refuse
bad input in the same sentences.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional

from lm_lightning.deploy.folder import is_onnx_export
from lm_lightning.deploy.sampling import MAX_NEW_TOKENS, MAX_SAMPLES, MAX_TEMPERATURE, MIN_TEMPERATURE, check_sampling
from lm_lightning.errors import LMInputError, exit_with, flag_sentence, input_error

__all__ = ["COMMANDS", "generate_command", "main", "score_command"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # also for a missing or unknown argument, where exit_on_error=False does not reach
        raise argparse.ArgumentError(None, message)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"python -m lm_lightning {prog}", description=description, exit_on_error=False)
    parser.add_argument("export_dir", help="an export folder (RUN/export-*; written by fit or `export`)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (ONNX export: default 1, the fastest for one token at a time)"
    )
    return parser


def _load(folder: str, threads: Optional[int]) -> Any:
    """The export's model: :class:`OnnxModel` for an ONNX export, ``ExportedModel`` otherwise."""
    if threads is not None and threads < 1:
        raise LMInputError(f"--threads must be a positive integer, got {threads}.")
    path = Path(folder)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise LMInputError(f"{folder} {what}: give an export folder (RUN/export-*, written by fit or `export`).")
    if is_onnx_export(path):
        from lm_lightning.deploy.runtime import OnnxModel

        return OnnxModel.load(path, threads or 1)
    import torch  # a safetensors export: the torch path, as before ONNX existed

    from lm_lightning.export.commands import ExportedModel

    if threads is not None:
        torch.set_num_threads(threads)
    return ExportedModel.load(path)


def generate_command(args: list[str]) -> list[str]:
    parser = _parser("generate", "Text from an export folder alone (token models); the likeliest next words (bag models).")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start after an end of line)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help=f"tokens generated per sample, 0 to {MAX_NEW_TOKENS:,}")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help=f"0 = greedy; otherwise from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}"
    )
    parser.add_argument(
        "--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0 = all (so does a k at or above the vocabulary size)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-samples", type=int, default=1, help=f"samples generated together (parallel streams), 1 to {MAX_SAMPLES:,}"
    )
    parser.epilog = (
        "Before the first step, the samples' tokens and one step's logits are checked against the memory this process "
        "can still take: a request that would not fit is refused in one sentence, not run into an out-of-memory error."
    )
    opts = parser.parse_args(args)
    top_k = opts.top_k or None
    check_sampling(opts.max_new_tokens, opts.temperature, top_k, opts.num_samples)  # before a model is loaded
    model = _load(opts.export_dir, opts.threads)
    if getattr(model, "is_bag_model", False):  # a torch export only: the ONNX writer refuses bag-of-words networks
        words = model.next_words(opts.prompt, opts.top_k or 10)
        line = ", ".join(f"{w} {p:.3f}" for w, p in words)
        print(f"likeliest words of the segment after {opts.prompt!r}: {line}")
        return [line]
    texts = model.generate(opts.prompt, opts.max_new_tokens, opts.temperature, top_k, opts.seed, opts.num_samples)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} (seed {opts.seed})")
        print(text)
    return texts


def score_command(args: list[str]) -> dict:
    parser = _parser("score", "Perplexity of a text file under an export, read as the export's training data was.")
    parser.add_argument("file", help="a UTF-8 text file")
    opts = parser.parse_args(args)
    model = _load(opts.export_dir, opts.threads)
    result = model.score_file(opts.file)
    evaluation = model.metadata.get("evaluation")
    known = evaluation.get("test_ppl") if isinstance(evaluation, dict) else None
    print(
        f"{opts.file}: perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens "
        f"({result['unknown']:,} unknown: <unk>), {result['seconds']:.1f}s"
        + (f"; the export measured {known:.2f} on its own test split when it was written" if isinstance(known, (int, float)) and known else "")
    )
    return result


COMMANDS = {"generate": generate_command, "score": score_command}


def main(args: list[str]) -> None:
    """``generate`` / ``score`` with the CLI's handling of bad input (``cli.main``'s, without importing Lightning)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        COMMANDS[args[0]](args[1:])
    except argparse.ArgumentError as err:
        exit_with(flag_sentence(err, args[0]))
    except Exception as err:
        cause = input_error(err)
        if cause is None:
            raise
        exit_with(str(cause))
