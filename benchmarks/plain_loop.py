"""The same model, data and optimizer as `python -m lm_lightning fit`, trained by a plain PyTorch loop.

The reference the Lightning runs are compared with in benchmarks/memory.py: what does the template cost in
tokens/s and memory over the ~40 lines a user would write by hand (pytorch/examples word_language_model style)?

    python benchmarks/plain_loop.py --epochs 2 --out plain.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

from lm_lightning.data import StreamWindows, TokenDataModule
from lm_lightning.evaluation import perplexity
from lm_lightning.models import LSTMNetwork


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="embedded")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokenizer", default="treebank")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train-batches", type=int, default=None, help="windows per epoch")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (like --trainer.max_steps)")
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    lowercase = args.tokenizer != "whitespace"
    dm = TokenDataModule(source=args.source, data_dir=args.data_dir, tokenizer=args.tokenizer, lowercase=lowercase,
                      min_freq=2 if lowercase else 1, batch_size=args.batch_size, bptt=args.bptt)
    train = StreamWindows(dm.ids("train"), args.batch_size, args.bptt)
    valid = StreamWindows(dm.ids("valid"), 10, args.bptt, split="valid")
    test = StreamWindows(dm.ids("test"), 10, args.bptt, split="test")
    tied = args.embedding_dim == args.hidden_dim and args.optimizer == "adamw"  # ptb_small (SGD) is untied
    network = LSTMNetwork(dm.vocab_size, args.embedding_dim, args.hidden_dim, args.num_layers, args.dropout, tied)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(network.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=0.01)

    # Tokens over wall time, everything in the loop included (as Lightning's ThroughputMonitor measures it),
    # after 5 warm-up steps.
    tokens, seconds, steps = 0, 0.0, 0
    for _ in range(args.epochs):
        network.train()
        hidden = None
        for step, batch in enumerate(train):
            inputs, targets = batch.inputs, batch.targets
            if args.limit_train_batches is not None and step >= args.limit_train_batches:
                break
            if args.max_steps is not None and steps >= args.max_steps:
                break
            if steps == 5:
                tokens, started = 0, time.perf_counter()
            logits, hidden = network(inputs, hidden)
            hidden = tuple(h.detach() for h in hidden)  # truncated BPTT: keep the state, cut the graph
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), args.clip)
            optimizer.step()
            tokens += targets.numel()
            steps += 1
        if steps > 5:
            seconds = time.perf_counter() - started
    result = {
        "name": "plain PyTorch loop",
        "tokens_per_sec": tokens / seconds if seconds else float("nan"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "val_ppl": perplexity(network, valid),
        "test_ppl": perplexity(network, test),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
