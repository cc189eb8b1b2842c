"""Embedding + LSTM language model, the classic recipe of Zaremba et al. (2014), "Recurrent Neural Network
Regularization" (arXiv:1409.2329), as in pytorch/examples ``word_language_model``:

    token ids -> embedding -> dropout -> multi-layer LSTM -> dropout -> linear decoder -> logits

With ``tie_weights`` the decoder reuses the embedding matrix (Press & Wolf 2017, "Using the Output Embedding to
Improve Language Models", arXiv:1608.05859; Inan et al. 2017): it removes ``vocab_size x hidden_dim``
parameters, often the largest single matrix, and usually lowers perplexity.

The LSTM is :class:`StackedLSTM`, an ``nn.LSTM`` (same parameters, same ``state_dict`` names) whose dropout between
layers is drawn by torch's generator while training, so recomputation and resume redraw the same masks on GPU too.

This file knows nothing about Lightning; it keeps the network contract of ``networks/contract.py``, with the
optional output-layer hook (``features`` and ``decoder``) that the chunked loss uses.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.backends.cudnn import rnn as cudnn_rnn

from lm_lightning.errors import LMInputError

Hidden = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, batch, hidden_dim)


class StackedLSTM(nn.LSTM):
    """``nn.LSTM`` whose dropout between layers comes from torch's random generator: one fused call per layer, with
    ``F.dropout`` between them, while training with ``dropout > 0`` and always on CUDA; otherwise (CPU with dropout 0,
    one layer, evaluation, export tracing, which runs on CPU) exactly ``nn.LSTM``'s single call.

    Why: cuDNN draws the inter-layer dropout of a stacked ``nn.LSTM`` from a state of its own, which neither
    ``torch.utils.checkpoint`` nor a checkpoint's saved CUDA generator restores, so on a GPU a recomputed segment
    (``callbacks/recompute.py``) drew other masks than its forward pass (wrong gradients, silently) and a resumed run
    other masks than the uninterrupted one. ``F.dropout`` draws from the generator both restore. On CPU PyTorch's kernels
    already apply ``dropout`` between layers this way: both paths give the same numbers to the last bit, masks included,
    at the same speed (``tests/test_cuda_correctness.py``, docs/reliability.md). The parameters and their names are
    ``nn.LSTM``'s, so checkpoints, exports, pruning and QAT (which hook or subclass the module) see an ``nn.LSTM``; on
    CUDA the weights lie in one cuDNN buffer per layer instead of one for the stack (:meth:`flatten_parameters`).
    """

    def forward(self, input: torch.Tensor, hx: Optional[Hidden] = None):  # noqa: A002 (nn.LSTM's own argument name)
        plain = not isinstance(input, torch.Tensor) or input.dim() != 3 or self.bidirectional or self.proj_size
        if plain or self.num_layers == 1 or not (input.is_cuda or (self.training and self.dropout > 0)):
            return super().forward(input, hx)
        # As nn.LSTM.forward: a pruning pre-hook may have replaced the weights, and QAT's forward (a subclass, see
        # export/fake_quantization.py) has put its fake-quantized ones in _flat_weights before calling this.
        self._update_flat_weights()
        if hx is None:
            zeros = input.new_zeros(self.num_layers, input.size(0 if self.batch_first else 1), self.hidden_size)
            hx = (zeros, zeros)
        self.check_forward_args(input, hx, None)
        per_layer = len(self._flat_weights) // self.num_layers
        output, states_h, states_c = input, [], []
        for k in range(self.num_layers):
            weights = self._flat_weights[k * per_layer : (k + 1) * per_layer]
            # torch.lstm is the kernel nn.LSTM calls (torch._VF.lstm): one layer, no dropout of its own.
            state = (hx[0][k : k + 1], hx[1][k : k + 1])
            output, h, c = torch.lstm(output, state, weights, self.bias, 1, 0.0, self.training, False, self.batch_first)
            if k < self.num_layers - 1 and self.training and self.dropout > 0:
                output = F.dropout(output, self.dropout, training=True)
            states_h.append(h)
            states_c.append(c)
        return output, (torch.cat(states_h), torch.cat(states_c))

    def flatten_parameters(self) -> None:
        """One cuDNN weight buffer per layer instead of one for the stack: cuDNN takes a layer's weights as they lie only
        from the start of their buffer (``try_get_weight_buf`` in aten/src/ATen/native/cudnn/RNN.cpp), and would copy
        layers 1.. into a new buffer at every call otherwise ("RNN module weights are not part of single contiguous
        chunk of memory"). A no-op off CUDA, as ``nn.LSTM``'s."""
        super().flatten_parameters()  # its checks (CUDA, accepted by cuDNN, one dtype, no aliasing), then one buffer
        weights = self._flat_weights
        if self.num_layers == 1 or self.bidirectional or self.proj_size or not weights:
            return
        if not all(isinstance(w, torch.Tensor) and w.is_cuda for w in weights):
            return
        if len({w.untyped_storage().data_ptr() for w in weights}) != 1:  # nn.LSTM's checks declined: left as they are
            return
        per_layer = len(weights) // self.num_layers
        with torch.cuda.device_of(weights[0]), torch.no_grad():
            for k in range(self.num_layers):  # the call nn.RNNBase.flatten_parameters makes, for one layer at a time
                torch._cudnn_rnn_flatten_weight(
                    weights[k * per_layer : (k + 1) * per_layer], per_layer, self.input_size if k == 0 else self.hidden_size,
                    cudnn_rnn.get_cudnn_mode(self.mode), self.hidden_size, self.proj_size, 1, self.batch_first, False,
                )  # fmt: skip


def init_weights(embedding: nn.Module, lstm: nn.LSTM, decoder: nn.Linear) -> None:
    """Small uniform init for the embedding/decoder as in word_language_model; a large init on a tied matrix
    makes the first logits huge. The LSTM keeps PyTorch's U(-1/sqrt(h), 1/sqrt(h)) init, except the forget-gate
    bias, set to 1 so early gradients flow through time (Jozefowicz et al. 2015)."""
    nn.init.uniform_(embedding.weight, -0.1, 0.1)
    nn.init.zeros_(decoder.bias)
    if decoder.weight is not embedding.weight:
        nn.init.uniform_(decoder.weight, -0.1, 0.1)
    h = lstm.hidden_size
    for name, param in lstm.named_parameters():
        if name.startswith("bias_ih"):
            with torch.no_grad():
                param[h : 2 * h].fill_(1.0)  # gate order: input, forget, cell, output


def check_network_args(
    vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int, dropout: float, tie_weights: bool
) -> None:
    """The settings every embedding + LSTM network shares, checked once with a sentence that names the fix."""
    if vocab_size < 2:
        raise LMInputError(
            f"vocab_size must be at least 2, got {vocab_size}: the corpus produced an (almost) empty vocabulary; "
            "check --data.source and lower --data.min_freq."
        )
    for name, value in (("embedding_dim", embedding_dim), ("hidden_dim", hidden_dim), ("num_layers", num_layers)):
        if value < 1:
            raise LMInputError(f"--model.network.{name} must be a positive integer, got {value}: give 1 or more (the default is a good start).")
    if tie_weights and embedding_dim != hidden_dim:
        raise LMInputError(
            f"tie_weights needs embedding_dim == hidden_dim (got {embedding_dim} and {hidden_dim}): "
            "make them equal or pass --model.network.tie_weights false."
        )
    if not 0 <= dropout < 1:  # also refuses NaN
        raise LMInputError(f"--model.network.dropout must be in [0, 1), got {dropout}: give a rate such as 0.2 (0 turns dropout off).")


class LSTMNetwork(nn.Module):
    """Token ids -> logits over the next token (the ``nn.Module``; ``systems/tokens.py`` trains it).

    Args:
        vocab_size: Tokens in the vocabulary.
        embedding_dim: Width of the token embedding.
        hidden_dim: Width of each LSTM layer.
        num_layers: Stacked LSTM layers.
        dropout: Dropout on embeddings, between LSTM layers and before the decoder.
        tie_weights: Share the embedding and decoder matrices; needs embedding_dim == hidden_dim.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int = 256,
        hidden_dim: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        # The arguments, which an export needs to rebuild this network (first line: locals() holds only them yet).
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__", "dropout")}
        check_network_args(vocab_size, embedding_dim, hidden_dim, num_layers, dropout, tie_weights)
        self.vocab_size, self.hidden_dim, self.num_layers = vocab_size, hidden_dim, num_layers
        self.embedding = self.make_embedding(vocab_size, embedding_dim)
        self.dropout = nn.Dropout(dropout)
        # Dropout between LSTM layers only (not on the recurrent connections), as in Zaremba et al.
        self.lstm = StackedLSTM(embedding_dim, hidden_dim, num_layers, dropout=dropout if num_layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self.embedding, self.lstm, self.decoder)

    def make_embedding(self, vocab_size: int, embedding_dim: int) -> nn.Module:
        """The input layer; a network that reads another kind of input overrides it and :meth:`embed`
        (``networks/bag.py``: bags of words)."""
        return nn.Embedding(vocab_size, embedding_dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(batch, time)`` ids -> ``(batch, time, embedding_dim)`` vectors."""
        return self.embedding(ids)

    def features(self, ids: torch.Tensor, hidden: Optional[Hidden] = None) -> tuple[torch.Tensor, Hidden]:
        """What the decoder reads, (batch, time, hidden_dim), and the new hidden state: the chunked loss
        (``callbacks/chunked_loss.py``) starts here instead of from the logits."""
        output, hidden = self.lstm(self.dropout(self.embed(ids)), hidden)
        return self.dropout(output), hidden

    def forward(self, ids: torch.Tensor, hidden: Optional[Hidden] = None) -> tuple[torch.Tensor, Hidden]:
        """``ids``: (batch, time) -> logits (batch, time, vocab) and the new hidden state."""
        output, hidden = self.features(ids, hidden)
        return self.decoder(output), hidden
