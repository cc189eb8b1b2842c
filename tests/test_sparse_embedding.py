"""Sparse embedding gradients (callbacks/sparse_gradients.py, configs/memory/sparse_gradients.yaml): the dense run's training, clipping included, with a
gradient the size of the rows a batch uses; and one sentence for every setting that cannot take a sparse gradient."""

from pathlib import Path

import pytest
import torch
from conftest import val_ppl

from lm_lightning.callbacks import SparseEmbeddingGradients
from lm_lightning.cli import build_cli
from lm_lightning.errors import LMInputError
from lm_lightning.memory.measure import storage_bytes
from lm_lightning.memory.monitor import MemoryMonitor
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
UNTIED_SGD = [
    "--model.network.tie_weights", "false", "--model.network.embedding_dim", "48", "--model.network.hidden_dim", "48", "--model.sample_length", "0",
    "--model.optimizer", "SGD", "--model.optimizer.lr", "5", "--model.optimizer.weight_decay", "0",
]  # fmt: skip


@pytest.mark.parametrize("clip", ["0.25", "0.01"])
def test_sparse_embedding_gradients_train_as_the_dense_ones(tmp_path, monkeypatch, clip):
    """SGD at lr 5 with gradient-norm clipping (0.01 clips every step): validation perplexity equal to the dense run's,
    and the embedding's gradient holds the batch's rows instead of the whole vocabulary."""
    monkeypatch.chdir(tmp_path)
    common = ["-c", str(ROOT / "configs/default.yaml"), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6"]
    common += [*UNTIED_SGD, "--trainer.gradient_clip_val", clip, "-c", str(ROOT / "configs/memory/monitor.yaml"), *FAST]
    common += ["--trainer.callbacks.log_every_n_steps", "1"]
    dense = build_cli(["fit", *common])
    sparse = build_cli(["fit", *common, "--trainer.callbacks+=SparseEmbeddingGradients"])
    assert sparse.model.network.embedding.sparse and not dense.model.network.embedding.sparse
    assert val_ppl(sparse) == pytest.approx(val_ppl(dense), rel=1e-4)

    history = {name: next(c for c in cli.trainer.callbacks if isinstance(c, MemoryMonitor)).history[-1] for name, cli in
               (("dense", dense), ("sparse", sparse))}  # fmt: skip
    vocab, width, tokens = dense.datamodule.vocab_size, 48, 32 * 35
    saved = history["dense"]["memory/grads_bytes"] - history["sparse"]["memory/grads_bytes"]
    # The dense gradient's vocab x 48 floats, against at most one row (and its int64 index) per token of the batch.
    assert saved >= vocab * width * 4 - tokens * (width * 4 + 8)


def test_the_sparse_gradient_is_counted_by_its_indices_and_values():
    embedding = torch.nn.Embedding(1000, 16, sparse=True)
    embedding(torch.tensor([[1, 2, 2, 7]])).sum().backward()
    grad = embedding.weight.grad
    assert grad.is_sparse and storage_bytes([grad]) == 4 * 8 + 4 * 16 * 4  # (1, 4) int64 row indices, (4, 16) floats (uncoalesced)


def test_sparse_embedding_settings_that_cannot_work_are_one_sentence(tmp_path, monkeypatch):
    with pytest.raises(LMInputError, match=r"^SparseEmbeddingGradients needs untied weights \(--model.network.init_args.tie_weights false\): a tied decoder"):
        SparseEmbeddingGradients().apply(LanguageModel(LSTMNetwork(50)))
    from gru_model import BareGRUNetwork

    SparseEmbeddingGradients().apply(bare := LanguageModel(BareGRUNetwork(50)))  # a fork's untied embedding
    assert bare.network.embedding.sparse
    monkeypatch.chdir(tmp_path)
    common = ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"), *FAST]
    common += [*UNTIED_SGD, "--trainer.callbacks+=SparseEmbeddingGradients"]
    with pytest.raises(LMInputError, match=r"needs an optimizer that takes sparse gradients, and AdamW does not: give --model.optimizer SGD"):
        build_cli([*common, "--model.optimizer", "AdamW"])
    with pytest.raises(LMInputError, match=r"with SGD needs --model.optimizer.init_args.weight_decay 0"):
        build_cli([*common, "--model.optimizer.weight_decay", "0.01"])
    assert not any((tmp_path / "lightning_logs").glob("*/checkpoints/*.ckpt"))  # refused before any step


def test_sparse_embedding_gradients_compose_with_pruning_and_qat(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        ["fit", "-c", str(ROOT / "configs/default.yaml"), "-c", str(ROOT / "configs/presets/debug.yaml"), *FAST, *UNTIED_SGD,
         "--trainer.callbacks+=SparseEmbeddingGradients", "-c", str(ROOT / "configs/memory/pruning.yaml"),
         "-c", str(ROOT / "configs/memory/qat.yaml"), "--trainer.callbacks.last_fraction", "1.0"]
    )  # fmt: skip
    assert cli.trainer.global_step == 5 and 1 < val_ppl(cli)[-1] < cli.datamodule.vocab_size
