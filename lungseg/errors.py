"""The one exception type lungseg raises for problems the user can fix, and how entry points
report it."""

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class LungsegError(Exception):
    """Bad input or configuration. The message names the file or setting, what was
    expected and how to fix it; entry points print it as one paragraph, without a traceback."""


def user_error(error: BaseException | None) -> LungsegError | None:
    """The LungsegError behind ``error``, if any: Hydra's ``instantiate`` wraps exceptions
    raised in constructors (``InstantiationException`` with the original as ``__cause__``)."""
    while error is not None:
        if isinstance(error, LungsegError):
            return error
        error = error.__cause__
    return None


def run_cli(task: Callable[[], T]) -> T:
    """Run an entry point's task. A LungsegError ends the process with one line on stderr,
    ``lungseg: error: <message>``, and exit status 1; any other exception propagates with its
    traceback (that is a bug in lungseg, not in the user's input)."""
    try:
        return task()
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"lungseg: error: {cause}", file=sys.stderr)
        sys.exit(1)
