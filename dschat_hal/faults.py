"""Surviving faults: writable-path checks, the output-directory lock, stale leftovers of killed runs
(temporary save directories, DeepSpeed op-build locks), file modes that follow the umask, and named
fault points that tests use to kill a run at an exact moment of a save."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accel._op_builds import clear_stale_build_locks as clear_stale_build_locks  # the layer loads the ops
from dschat_hal.errors import UserError, on_exit

log = logging.getLogger("dschat_hal")

KILL_ENV = "DSCHAT_HAL_KILL_AT"  # "POINT" or "POINT:N": SIGKILL this process the Nth time POINT is reached
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """A named moment (e.g. inside a save) where `DSCHAT_HAL_KILL_AT` kills the process, as kill -9 would."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (a save completes, then Ctrl-C acts as usual).
    kill -9 cannot be held: that is what publishing by rename is for."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda number, _: received.append(number)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


# ---- paths -----------------------------------------------------------------------------------
def require_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """`path` is (or can become) a writable directory: not a file, and its nearest existing
    ancestor accepts a new entry (probed by creating and removing one, which also catches
    read-only file systems and runs as root)."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target} is a file, not a directory; remove it or choose another path")
    probe_in = target
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UserError(f"{flag} {target}: {probe_in} is a file, so the directory cannot be created")
    try:
        Path(tempfile.mkdtemp(prefix=".write-probe-", dir=probe_in)).rmdir()
    except OSError as err:
        raise UserError(
            f"{flag} {target} is not writable ({err.strerror} in {probe_in}); choose a writable directory"
        ) from None


# ---- modes -------------------------------------------------------------------------------------
def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: str | os.PathLike) -> None:
    """Give `root` and everything under it the modes a plain mkdir/open would (`tempfile` makes 0700/0600)."""
    mask = current_umask()
    root = Path(root)
    os.chmod(root, 0o777 & ~mask)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            os.chmod(os.path.join(directory, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


# ---- the output lock ----------------------------------------------------------------------------
def lock_path(directory: str | os.PathLike) -> Path:
    """A sibling of the directory, so the lock survives the directory being replaced by a rename."""
    directory = Path(directory).expanduser().resolve()
    return directory.with_name(f".{directory.name}.lock")


def lock_output(directory: str | os.PathLike | None) -> None:
    """Hold an exclusive lock on `directory` until the run ends; a second run on it refuses at once.

    `flock` locks die with their process, so a killed run never leaves a stale lock behind.
    """
    if not directory:
        return
    import fcntl

    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held open until the run ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            raise BlockingIOError  # the previous holder removed it between our open and our lock
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{directory} is in use by another run ({owner}); wait for it to finish or choose another output directory"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()

    def release() -> None:
        path.unlink(missing_ok=True)  # before unlocking, so no one locks a file that is going away
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    on_exit(release)


# ---- leftovers of killed runs -----------------------------------------------------------------
TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(tmp|old)-(?P<pid>\d+)(?P<rest>-.*)?$")


def _host_tag() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def temp_prefix(name: str) -> str:
    """The prefix of a temporary entry beside `name` (for `tempfile.mkdtemp(prefix=...)`): it holds
    this process's id and host, so a later run removes it once the process is gone (and leaves
    alone the live builds of other machines sharing the directory)."""
    return f".{name}.tmp-{os.getpid()}-on-{_host_tag()}-"


def _of_another_host(rest: str | None) -> bool:
    return bool(rest) and rest.startswith("-on-") and not rest.startswith(f"-on-{_host_tag()}-")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID` entries in `directory` whose process is gone
    (only those of `name` when given); returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = TEMP_NAME.match(entry.name)
        if not match or (name is not None and match["name"] != name) or _of_another_host(match["rest"]):
            continue
        if pid_alive(int(match["pid"])):
            continue
        original = directory / match["name"]
        if entry.name.startswith(f".{match['name']}.old-") and not original.exists():
            entry.rename(original)  # killed between moving the old copy aside and publishing the new one
            log.warning("restored %s from the copy an interrupted save had moved aside", original)
            continue
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.warning("removed %d leftover(s) of an interrupted save in %s", len(removed), directory)
    return removed


# ---- disk full ---------------------------------------------------------------------------------
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded")
SHORT_WRITE_TEXT = ("unexpected pos", "file write failed")  # torch's zip writer, which drops the errno


class DiskFullError(UserError):
    """A write ran out of space; the partial output was removed."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    try:
        return shutil.disk_usage(_nearest_existing(Path(path).expanduser())).free
    except OSError:
        return None


def is_disk_full(err: BaseException, path: str | os.PathLike) -> bool:
    """Whether `err` (or what caused it) is a write that ran out of space under `path`. torch's
    writer reports a short write without its errno: counted when the file system is (nearly) full."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return True
        text = str(cause)
        if any(t in text for t in DISK_FULL_TEXT):
            return True
        if any(t in text for t in SHORT_WRITE_TEXT):
            free = free_bytes(path)
            return free is not None and free < 64 << 20
        cause = cause.__cause__ or cause.__context__
    return False


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


@contextmanager
def disk_full_is_one_line(path: str | os.PathLike, what: str, kept: str) -> Iterator[None]:
    """Turn running out of space while writing `what` under `path` into one line naming the path
    (`kept`: what is still intact). The block removes its own partial output before this runs."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not is_disk_full(err, path):
            raise
        raise DiskFullError(
            f"no space left on the device holding {path} while writing {what} ({_size(free_bytes(path))} free "
            f"there now); free space or choose another path and rerun; nothing half-written was kept, {kept}"
        ) from None
