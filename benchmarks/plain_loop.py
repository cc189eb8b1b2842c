"""A recipe trained by a plain PyTorch loop instead of Lightning: the same network, data, optimizer, schedule and
clipping, read from the recipe's YAML (pytorch/examples word_language_model style: train, validate every epoch, keep
the best weights, test them).

The reference the template is compared with: what does Lightning cost in tokens/s and memory over the ~60 lines a
user would write by hand, and does it reach the same perplexity?

    python benchmarks/plain_loop.py --epochs 2 --out plain.json                             # configs/default.yaml
    python benchmarks/plain_loop.py --recipe configs/ptb_small.yaml   # all 13 epochs (offline: --data-dir DIR)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lm_lightning.data import StreamWindows, TokenDataModule
from lm_lightning.evaluation import perplexity
from lm_lightning.memory.measure import storage_bytes
from lm_lightning.networks import LSTMNetwork
from lm_lightning.systems import LanguageModel

ROOT = Path(__file__).resolve().parents[1]


def settings(recipe: Path) -> tuple[dict, dict, dict]:
    """The recipe's (trainer, model, data) arguments, with the classes' own defaults for what it leaves out."""
    cfg = yaml.safe_load(recipe.read_text())
    model = {k: p.default for k, p in inspect.signature(LanguageModel.__init__).parameters.items() if p.default is not p.empty}
    model.update(cfg.get("model", {}).get("init_args", {}))
    # The network's arguments: LSTMNetwork's defaults, then the recipe's (--model.network.init_args.*).
    network = {k: p.default for k, p in inspect.signature(LSTMNetwork.__init__).parameters.items() if p.default is not p.empty}
    network.update((model.get("network") or {}).get("init_args", {}))
    model["network"] = network
    data = {k: p.default for k, p in inspect.signature(TokenDataModule.__init__).parameters.items() if p.default is not p.empty}
    data.update(cfg.get("data", {}).get("init_args", {}))
    trainer = {"max_epochs": 1000, "gradient_clip_val": None, **cfg.get("trainer", {}), "seed": cfg.get("seed_everything", 0)}
    return trainer, model, data


def instantiate(spec: dict | None, *args):
    """``{class_path, init_args}`` from a recipe, as LightningCLI builds it (Lightning's ReduceLROnPlateau subclass
    only adds the ``monitor`` argument: the loop steps torch's with the validation perplexity itself)."""
    if spec is None:
        return None
    module, name = spec["class_path"].rsplit(".", 1)
    init = dict(spec.get("init_args", {}))
    if name == "ReduceLROnPlateau":
        module, _ = "torch.optim.lr_scheduler", init.pop("monitor", None)
    return getattr(importlib.import_module(module), name)(*args, **init)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--data-dir", default=None, help="folder of the recipe's corpus (a folder holding train.txt, valid.txt, test.txt; default: downloaded by name)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's max_epochs")
    parser.add_argument("--limit-train-batches", type=int, default=None, help="windows per epoch")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (like --trainer.max_steps)")
    parser.add_argument("--eval-batches", type=int, default=None, help="validate and test on the first N windows only")
    parser.add_argument("--out", default=None, help="write the measurements as JSON here")
    parser.add_argument(
        "--state", type=Path, default=None, help="save the loop after every epoch here, and go on from it if it exists"
    )
    args = parser.parse_args()

    trainer, model, data = settings(args.recipe)
    torch.manual_seed(trainer["seed"])
    dm = TokenDataModule(**{**data, "data_dir": args.data_dir or data["data_dir"]})
    train = StreamWindows(dm.ids("train"), data["batch_size"], data["bptt"])
    valid = StreamWindows(dm.ids("valid"), data["eval_batch_size"], data["bptt"], split="valid")
    test = StreamWindows(dm.ids("test"), data["eval_batch_size"], data["bptt"], split="test")
    network = LSTMNetwork(dm.vocab_size, **model["network"])
    optimizer = instantiate(model["optimizer"], network.parameters())
    scheduler = instantiate(model["lr_scheduler"], optimizer)
    epochs = args.epochs or trainer["max_epochs"]

    # Tokens over wall time, everything in the loop included (as Lightning's ThroughputMonitor measures it),
    # after 5 warm-up steps; validation is outside the clock.
    tokens, seconds, steps, best, val_curve = 0, 0.0, 0, None, []
    if args.state is not None and args.state.is_file():  # a long run (WikiText-2: ~3 h here) killed between epochs
        saved = torch.load(args.state, weights_only=False)
        network.load_state_dict(saved["network"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        tokens, seconds, steps, best, val_curve = (saved[k] for k in ("tokens", "seconds", "steps", "best", "val_curve"))
        print(f"resumed from {args.state} after epoch {len(val_curve)}", flush=True)
    started = time.perf_counter()
    for _ in range(len(val_curve), epochs):
        network.train()
        hidden = None
        for step, batch in enumerate(train):
            if (args.limit_train_batches is not None and step >= args.limit_train_batches) or steps == args.max_steps:
                break
            if steps == 5:
                tokens, seconds, started = 0, 0.0, time.perf_counter()
            logits, hidden = network(batch.inputs, hidden)
            hidden = tuple(h.detach() for h in hidden)  # truncated BPTT: keep the state, cut the graph
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trainer["gradient_clip_val"]:
                torch.nn.utils.clip_grad_norm_(network.parameters(), trainer["gradient_clip_val"])
            optimizer.step()
            tokens += batch.targets.numel()
            steps += 1
        seconds += time.perf_counter() - started
        val_curve.append(perplexity(network, valid, max_batches=args.eval_batches))
        if best is None or val_curve[-1] < min(val_curve[:-1]):
            best = copy.deepcopy(network.state_dict())
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_curve[-1])
        elif scheduler is not None:
            scheduler.step()
        print(f"epoch {len(val_curve)}: val ppl {val_curve[-1]:.2f}", flush=True)
        if args.state is not None:
            state = {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": torch.get_rng_state(),
                **dict(tokens=tokens, seconds=seconds, steps=steps, best=best, val_curve=val_curve),
            }
            torch.save(state, args.state.with_suffix(".tmp"))
            args.state.with_suffix(".tmp").replace(args.state)  # a kill during the save keeps the previous epoch's
        started = time.perf_counter()
    network.load_state_dict(best)
    result = {
        "name": "plain PyTorch loop",
        "recipe": str(args.recipe),
        "tokens_per_sec": tokens / seconds if steps > 5 and seconds else float("nan"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        # Parameters, their gradients (still there after the last step) and the optimizer's state, as the monitor counts.
        "state_bytes": storage_bytes([*network.parameters(), *(p.grad for p in network.parameters() if p.grad is not None),
                                      *(t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor))]),
        "val_ppl_per_epoch": val_curve,
        "val_ppl": min(val_curve),
        "test_ppl": perplexity(network, test, max_batches=args.eval_batches),  # of the best-validation weights, as the template's `test` of best-*.ckpt
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
