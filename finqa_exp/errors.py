"""Bad input, and the one way the commands report it.

Every error that means "the input is wrong" (a config value, a data file, an unreachable
tracking store, a study or run that does not exist, a device that is not there) derives
from :class:`BadInput`. The commands (``python -m finqa_exp``, ``.report``, ``.ask``,
``.bench``) run under :func:`exit_on_bad_input`: bad input exits with code 2 and one line
naming the problem and the value; anything else is a bug or a crash and exits 1 with its
traceback, as Python does. The Hydra commands start under :func:`run_hydra_command`, so
Hydra's own config errors (an unknown key, a value of the wrong type, a config group
option that does not exist) are bad input too.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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


def hydra_error_line(err: BaseException) -> str:
    """One line for a Hydra or OmegaConf error: its first line, with its cause's first line
    (where Hydra puts the key and the value) when that is not already in it."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    override = getattr(err, "override", None)
    if override and override not in first:  # an override Hydra could not parse
        first = f"cannot parse override {override!r}: {first}"
    options = getattr(err, "options", None)
    if options:  # a config group option that does not exist: name the ones that do
        first += f" (options: {', '.join(options)})"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        line = str(cause).strip().splitlines()[0]
        if line not in first:
            first = f"{first.rstrip('.')}: {line}"
    return first


def run_hydra_command(main: Callable[[], Any], command: str) -> None:
    """Run a ``@hydra.main`` entry point with Hydra's config errors as bad input (exit 2).

    Hydra prints its composition errors over several lines and exits 1; asked for full
    errors (``HYDRA_FULL_ERROR=1``) it raises them instead, so this asks, and reports them
    the way every command reports bad input. A user who set ``HYDRA_FULL_ERROR`` gets the
    traceback, as Hydra promises.
    """
    from hydra.errors import CompactHydraException

    if os.environ.get("HYDRA_FULL_ERROR"):
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as err:  # composition, override parsing, a missing config
        logging.getLogger("finqa_exp").debug("%s: bad config", command, exc_info=True)
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT)
    finally:
        del os.environ["HYDRA_FULL_ERROR"]
