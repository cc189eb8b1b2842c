"""Sampling text from any network of the template's contract (``forward(ids, hidden) -> (logits, hidden)``): the
systems' ``predict`` and validation samples, and ``generate`` from an export folder, call this one function."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lm_lightning.deploy.sampling import check_memory


@torch.no_grad()
def sample(
    network: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Continue each row of ``prompt`` (streams, T) by ``max_new_tokens`` tokens; returns (streams, T + max_new_tokens).
    ``temperature`` 0 is greedy; ``top_k`` keeps the k likeliest tokens before sampling. The network is put in eval mode
    for the call and back as it was. The settings' bounds are the callers' (``deploy/sampling.py``'s ``check_sampling``);
    what memory allows is checked here, where the vocabulary is known, before the first sampled step."""
    was_training = network.training
    network.eval()
    try:
        logits, hidden = network(prompt)
        check_memory(prompt.size(0), prompt.size(1) + max_new_tokens, logits.size(-1))
        tokens = [prompt]
        for _ in range(max_new_tokens):
            next_logits = logits[:, -1].float()
            if temperature == 0:
                token = next_logits.argmax(-1, keepdim=True)
            else:
                next_logits = next_logits / temperature
                if top_k is not None and top_k < next_logits.size(-1):
                    kth = torch.topk(next_logits, top_k).values[:, -1:]
                    next_logits = next_logits.masked_fill(next_logits < kth, -math.inf)
                token = torch.multinomial(next_logits.softmax(-1), 1, generator=generator)
            tokens.append(token)
            logits, hidden = network(token, hidden)
    finally:  # a refused request (or Ctrl-C) leaves the network as it found it
        network.train(was_training)
    return torch.cat(tokens, dim=1)
