"""User-facing errors: one actionable line, exit code 2 (traceback too with --debug); Ctrl-C exits 130;
output piped into a reader that left (`| head -1`) ends quietly with 141, as a tool killed by SIGPIPE does."""

from __future__ import annotations

import functools
import os
import select
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for `yes | head -1`'s yes

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


def rank_prefix() -> str:
    """'rank N: ' in a run of several processes (launchers set RANK and WORLD_SIZE), else ''."""
    try:
        several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        several = False
    return f"rank {os.environ.get('RANK', '?')}: " if several else ""


def _one_line(err: BaseException) -> str:
    if isinstance(err, PermissionError):
        return (
            f"permission denied: {err.filename or err}; make it readable/writable for this user or choose another path"
        )
    if isinstance(err, IsADirectoryError):
        return f"{err.filename} is a directory where a file was expected; pass a file"
    return str(err)


def _reader_gone(stream: object) -> bool:
    """Whether `stream` is a pipe whose reading end is closed (poll reports POLLERR on its descriptor)."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _quiet_broken_pipe() -> bool:
    """When stdout or stderr lost its reader: point it at /dev/null (so the flush at interpreter exit
    does not print "Exception ignored ... BrokenPipeError", as Python's signal docs recommend) and
    return True; False when the broken pipe is some other one (then it is a real error)."""
    broken = [stream for stream in (sys.stdout, sys.stderr) if stream is not None and _reader_gone(stream)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in broken:
        os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return bool(broken)


def cli_entry(main: F) -> F:
    """Wrap a `main(argv)`: user errors print one `error:` line and exit 2 (`--debug`: the traceback
    first, same exit code); Ctrl-C prints one line and exits 130; a reader of the output that left
    (`| head -1`) ends the program quietly with 141."""
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
            print(f"error: {rank_prefix()}{_one_line(err)}", file=sys.stderr, flush=True)
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
        except BrokenPipeError:
            if not _quiet_broken_pipe():
                raise
            raise SystemExit(EXIT_BROKEN_PIPE) from None
        finally:
            _run_cleanups()

    return wrapper  # type: ignore[return-value]
