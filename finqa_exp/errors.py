"""Bad input, and the one way the commands report it.

Every error that means "the input is wrong" (a config value, a data file, an unreachable
tracking store, a study or run that does not exist, a device that is not there) derives
from :class:`BadInput`. The commands (``python -m finqa_exp``, ``.report``, ``.ask``,
``.bench``) run under :func:`exit_on_bad_input`: bad input exits with code 2 and one line
naming the problem and the value; anything else is a bug or a crash and exits 1 with its
traceback, as Python does.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

BAD_INPUT_EXIT = 2


class BadInput(Exception):
    """The input is wrong; the message names the problem and the value."""


@contextmanager
def exit_on_bad_input(command: str) -> Iterator[None]:
    """Turn a BadInput error into ``error: <message>`` on stderr and exit code 2."""
    try:
        yield
    except BadInput as err:
        logging.getLogger("finqa_exp").debug("%s: bad input", command, exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT)
