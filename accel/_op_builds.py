"""Stale op-build locks. torch's JIT build of a DeepSpeed op (the CPU comm op that `init_distributed`
loads, CPU Adam, fused Adam, ...) holds a `lock` file in its build directory; a build killed midway
leaves it behind, and every later load of that op waits on it forever, silently (torch's
`FileBaton.wait`). `clear_stale_build_locks_once` runs before the layer loads an op, once per process
and extensions directory, for every caller (the steps, the RLHF API, tests, benchmarks).

One build per environment: before that, `prepare_op_builds` makes the environment's own cache
(sys.prefix/torch_extensions when TORCH_EXTENSIONS_DIR is unset) and its own `ninja` the ones used, so
that running through `.venv/bin/python` and with the venv activated no longer rebuild each other's op.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("accel")


def extensions_dir() -> Path:
    """Where torch builds ops (DeepSpeed's CPU Adam, shm comm, ...): TORCH_EXTENSIONS_DIR or its default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"


def _processes() -> Iterator[Path]:
    return (proc for proc in Path("/proc").glob("[0-9]*") if proc.name != str(os.getpid()))


def lock_holders(lock: Path) -> list[int]:
    """Local processes that hold `lock` open. torch's `FileBaton` creates the lock and keeps its file
    descriptor open until the build ends, so a live build always holds it; a killed one never does."""
    try:
        target = lock.stat()
    except FileNotFoundError:
        return []
    holders = []
    for proc in _processes():
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's process (which cannot write our build directory)
            continue
        for fd in fds:
            try:
                found = fd.stat()
            except OSError:
                continue
            if (found.st_ino, found.st_dev) == (target.st_ino, target.st_dev):
                holders.append(int(proc.name))
                break
    return holders


def _build_in_progress(build_dir: Path) -> bool:
    """Is any live process working inside `build_dir` (ninja and the compilers run there)?"""
    target = str(build_dir.resolve())
    for proc in _processes():
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if cwd == target or cwd.startswith(target + os.sep):
            return True
    return False


NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "fuse", "9p", "glusterfs")


def on_network_file_system(path: Path) -> bool:
    """Whether `path` lies on a file system other machines may share (then their builds are invisible here)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return False
    resolved = str(path.resolve())
    best, kind = "", ""
    for point, fs_type in mounts:
        point = point.replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, kind = point, fs_type
    return kind.split(".")[0] in NETWORK_FILE_SYSTEMS


def clear_stale_build_locks(root: str | os.PathLike | None = None, min_age_s: float = 600.0) -> list[Path]:
    """Remove torch's op-build `lock` files that no live build holds, before anything waits on one
    (torch's `FileBaton.wait` polls forever, silently); say so. A lock a local process holds open is
    a live build: reported (a run then waits with a message, not silently). On a network file system
    a build on another machine is invisible here, so there a lock is stale only after `min_age_s`."""
    root = Path(root) if root else extensions_dir()
    removed: list[Path] = []
    if not root.is_dir() or not Path("/proc/self").exists():
        return removed
    for lock in root.glob("**/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            continue
        holders = lock_holders(lock)
        if holders or _build_in_progress(lock.parent):
            who = f"process {holders[0]}" if holders else "another process"
            log.warning("waiting: %s is building the op in %s (lock %s)", who, lock.parent, lock)
            continue
        if on_network_file_system(lock) and age < min_age_s:
            log.warning(
                "op-build lock %s is %.0f s old and no process here holds it: a build on another machine may "
                "hold it; if none does, remove the file",
                lock,
                age,
            )
            continue
        time.sleep(0.2)  # a holder that just closed its descriptor removes the file a moment later
        if not lock.exists() or lock_holders(lock):
            continue
        lock.unlink(missing_ok=True)
        removed.append(lock)
        log.warning(
            "removed a stale op-build lock %s (no process holds it: its build, started %.0f s ago, was killed)",
            lock,
            age,
        )
    return removed


_cleared: set[str] = set()


def clear_stale_build_locks_once() -> list[Path]:
    """`clear_stale_build_locks` of the current extensions directory, the first time this process
    asks about that directory (later calls return [] at once)."""
    root = str(extensions_dir().expanduser().resolve())
    if root in _cleared:
        return []
    _cleared.add(root)
    return clear_stale_build_locks(root)


# ---- one build per environment ------------------------------------------------------------------
# Why an op rebuilt for minutes when one checkout ran once through `.venv/bin/python` and once with the
# venv activated: not its flags (build.ninja came out byte for byte the same) but the `ninja` found on
# PATH: the system's (1.11) without activation, the venv's (the `ninja` wheel DeepSpeed requires, 1.13)
# with it. ninja records a hash of each command in the build directory's `.ninja_log`, and ninja 1.12
# changed that hash function (MurmurHash2 to rapidhash): each ninja reads the other's entries as
# "command line changed" (`ninja -d explain`) and recompiles everything. So the layer makes every
# process of an environment build with that environment's ninja, in that environment's cache.


def in_environment() -> bool:
    """Whether this interpreter runs in a virtual or conda environment (not the system's Python)."""
    return sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix


def environment_ninja() -> Path | None:
    """The environment's own `ninja` (sys.prefix/bin/ninja), when it runs in one that has it."""
    ninja = Path(sys.prefix) / "bin" / "ninja"
    return ninja if in_environment() and os.access(ninja, os.X_OK) else None


def use_environment_ninja() -> str | None:
    """Put the environment's bin folder first on PATH when its ninja is not the one PATH finds (what
    activating it does), so that every process of the environment builds ops with one ninja whatever
    PATH it was started with; returns that ninja (None: no environment ninja, PATH left as is)."""
    import shutil

    ninja = environment_ninja()
    if ninja is None:
        return None
    found = shutil.which("ninja")
    if found is None or os.path.realpath(found) != os.path.realpath(ninja):
        os.environ["PATH"] = os.pathsep.join([str(ninja.parent), os.environ.get("PATH", "")]).rstrip(os.pathsep)
    return str(ninja)


def environment_extensions_dir() -> Path | None:
    """The environment's own op cache, sys.prefix/torch_extensions (None: not in an environment, or
    its folder is not writable)."""
    prefix = Path(sys.prefix)
    return prefix / "torch_extensions" if in_environment() and os.access(prefix, os.W_OK) else None


def use_environment_extensions_dir() -> Path:
    """TORCH_EXTENSIONS_DIR unset: set it to the environment's own cache (torch's default,
    ~/.cache/torch_extensions/pyXY_cpu, is shared by every environment of that Python, whose torch and
    paths differ: each would rebuild the others' ops). Returns the root ops are built under."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        own = environment_extensions_dir()
        if own is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = str(own)
    return op_build_dir(SHM_COMM_OP).parent


def prepare_op_builds() -> list[Path]:
    """Before the layer loads a DeepSpeed op: the environment's cache and ninja (one build per
    environment, `use_environment_extensions_dir`, `use_environment_ninja`), then no stale lock
    (`clear_stale_build_locks_once`); returns the locks removed."""
    use_environment_extensions_dir()
    use_environment_ninja()
    return clear_stale_build_locks_once()


# ---- announcing a build ------------------------------------------------------------------------
SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op (`ShareMemCommBuilder.NAME`)
NINJA_MARKER = ".dschat_hal_ninja"  # which ninja built the op last (written after a load)


def op_build_dir(name: str) -> Path:
    """The directory torch's JIT builds op `name` in (`torch.utils.cpp_extension._get_build_directory`,
    without creating it): TORCH_EXTENSIONS_DIR/name, else the default root's pyXY_<device> folder."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / name
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        device = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        device = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        device = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{device}" / name


def _ninja() -> str:
    import shutil

    return os.path.realpath(shutil.which("ninja") or "ninja")


def build_reason(build_dir: Path, name: str = SHM_COMM_OP, ninja: str | None = None) -> str | None:
    """Why loading op `name` from `build_dir` will compile it (None: a built op is there): no built
    `.so` yet, or a different `ninja` built it (another ninja rewrites the build log: all rebuilt)."""
    if not (build_dir / f"{name}.so").is_file():
        return "not built yet"
    marker = build_dir / NINJA_MARKER
    ninja = ninja or _ninja()
    try:
        built_with = marker.read_text().strip()
    except OSError:
        return None
    if built_with and built_with != ninja:
        return f"last built with {built_with}, now {ninja} is on PATH"
    return None


def announce_comm_op_build(name: str = SHM_COMM_OP, stream=None) -> str | None:
    """Before DeepSpeed loads its CPU communication op: print one line (first local rank) when the
    load will build it, which takes about a minute, silently otherwise; returns the line."""
    build_dir = op_build_dir(name)
    reason = build_reason(build_dir, name)
    if reason is None or os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    line = (
        f"building DeepSpeed's CPU communication op once, ~1 min; cache: {build_dir.parent} "
        f"({reason}; ninja: {_ninja()})"
    )
    print(line, file=stream or sys.stderr, flush=True)
    return line


def record_comm_op_build(name: str = SHM_COMM_OP) -> None:
    """After the op loaded: note which ninja its build directory belongs to (best effort)."""
    build_dir = op_build_dir(name)
    if (build_dir / f"{name}.so").is_file():
        try:
            (build_dir / NINJA_MARKER).write_text(_ninja() + "\n")
        except OSError:
            pass
