"""User-facing errors: one actionable line, exit code 2 (traceback too with --debug); Ctrl-C exits 130."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

_cleanups: list[Callable[[], None]] = []


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


def on_exit(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` when the current `cli_entry` main returns or fails (e.g. release a lock)."""
    _cleanups.append(cleanup)


def _run_cleanups() -> None:
    while _cleanups:
        try:
            _cleanups.pop()()
        except Exception:  # a failing cleanup must not hide the run's own outcome
            traceback.print_exc()


def _one_line(err: BaseException) -> str:
    if isinstance(err, PermissionError):
        return (
            f"permission denied: {err.filename or err}; make it readable/writable for this user or choose another path"
        )
    if isinstance(err, IsADirectoryError):
        return f"{err.filename} is a directory where a file was expected; pass a file"
    return str(err)


def cli_entry(main: F) -> F:
    """Wrap a `main(argv)`: user errors print one `error:` line and exit 2 (`--debug`: the traceback
    first, same exit code); Ctrl-C prints one line and exits 130."""
    from accel import DeviceUnavailableError, UnsupportedDtypeError

    user_errors = (
        UserError,
        DeviceUnavailableError,
        UnsupportedDtypeError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
    )

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None):
        argv = sys.argv[1:] if argv is None else argv
        try:
            return main(argv)
        except user_errors as err:
            if "--debug" in argv:
                traceback.print_exc()
            print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            if "--debug" in argv:
                traceback.print_exc()
            print(
                "error: interrupted (Ctrl-C); published checkpoints and outputs are intact, rerun with --resume",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            _run_cleanups()

    return wrapper  # type: ignore[return-value]
