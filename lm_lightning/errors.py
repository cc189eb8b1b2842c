"""One exception type for input a user can fix.

Anything raised as :class:`LMInputError` is printed by the CLI as one sentence and a non-zero exit status,
without a traceback: the message itself must name the bad input and the fix. The parser's own messages are turned
into such a sentence by ``parser_messages.py``. The CLI's two entries share the last step here, where importing it
loads nothing: ``cli.py`` (Lightning's commands) and ``deploy/commands.py`` (``generate`` and ``score``, torch-free).
"""

from __future__ import annotations

import sys
from typing import NoReturn, Optional


class LMInputError(ValueError):
    """Bad user input (a path, a setting, a corpus): the message says what is wrong and how to fix it."""


class StoppedBySigterm(BaseException):
    """SIGTERM arrived before training started (``cli.main``): a BaseException, so that no ``except Exception`` on the
    way (a corpus reader's, a cache's) takes it for a failure to recover from."""


def input_error(err: Optional[BaseException]) -> Optional[LMInputError]:
    """The LMInputError behind ``err``: jsonargparse wraps errors raised while it builds classes (callbacks)."""
    while err is not None and not isinstance(err, LMInputError):
        err = err.__cause__ or err.__context__
    return err


def flag_sentence(err: BaseException, command: str) -> str:
    """The sentence for an argparse error of a command with its own parser (``generate``, ``score``, ``compare``):
    argparse's message already names the option."""
    return f"{err}: see python -m lm_lightning {command} --help."


def exit_with(sentence: str) -> NoReturn:
    """The one line every bad input ends with: ``error: <sentence>`` on stderr, exit status 2, no traceback."""
    print(f"error: {sentence}", file=sys.stderr)
    raise SystemExit(2) from None
