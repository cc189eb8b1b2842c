"""``python -m lm_lightning COMMAND`` and the ``lm-lightning`` script: only dispatches.

``generate`` and ``score`` go to ``deploy/commands.py`` before anything imports torch or Lightning, so an ONNX export
runs in a process of ONNX Runtime, numpy and the tokenizer alone; every other command goes to ``cli.py``.
"""

from __future__ import annotations

import sys
from typing import Optional

TORCH_FREE = ("generate", "score")


def main(args: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if args is None else args
    if args[:1] and args[0] in TORCH_FREE:
        from lm_lightning.deploy.commands import main as run
    else:
        from lm_lightning.cli import main as run
    run(args)


if __name__ == "__main__":
    main()
