"""One exception type for input a user can fix.

Anything raised as :class:`LMInputError` is printed by the CLI as one sentence and a non-zero exit status,
without a traceback: the message itself must name the bad input and the fix. The parser's own messages are turned
into such a sentence by ``parser_messages.py``.
"""

from __future__ import annotations

from typing import Optional


class LMInputError(ValueError):
    """Bad user input (a path, a setting, a corpus): the message says what is wrong and how to fix it."""


def input_error(err: Optional[BaseException]) -> Optional[LMInputError]:
    """The LMInputError behind ``err``: jsonargparse wraps errors raised while it builds classes (callbacks)."""
    while err is not None and not isinstance(err, LMInputError):
        err = err.__cause__ or err.__context__
    return err
