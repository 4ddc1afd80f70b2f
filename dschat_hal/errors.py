"""User-facing errors: one actionable line, exit code 2, traceback only with --debug."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


def cli_entry(main: F) -> F:
    """Wrap a `main(argv)` so that user errors print one line instead of a traceback."""
    from accel import DeviceUnavailableError, UnsupportedDtypeError

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None):
        argv = sys.argv[1:] if argv is None else argv
        try:
            return main(argv)
        except (UserError, DeviceUnavailableError, UnsupportedDtypeError, FileNotFoundError) as err:
            if "--debug" in argv:
                raise
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
