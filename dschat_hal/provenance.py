"""How an output was made, written beside it: the resolved flags (`args.json`) and the command,
versions and source revision (`made_by.json`). Written into the directory a save is building, so
the record is published with the output by the same rename (`checkpoint.atomic_directory`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

ARGS_FILE = "args.json"
MADE_BY_FILE = "made_by.json"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "deepspeed", "transformers")


def project_version() -> str:
    """dschat-hal's version: the installed distribution's, else the checkout's pyproject.toml."""
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return metadata.version("dschat-hal")
    except metadata.PackageNotFoundError:
        return "unknown"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_revision() -> dict[str, Any] | None:
    """The checkout's git commit and whether tracked files differ from it (None outside a git checkout)."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "modified": bool(status) if status is not None else None}


def versions() -> dict[str, str | None]:
    """dschat-hal's, Python's and the installed torch/DeepSpeed/transformers versions (None: not installed)."""
    found: dict[str, str | None] = {"dschat_hal": project_version(), "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def resolved_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Every flag after parsing and validation, as JSON (values JSON cannot hold, e.g. a dtype, as text)."""
    return json.loads(json.dumps(dict(flags), default=str))


def record(flags: Mapping[str, Any], program: str) -> dict[str, dict[str, Any]]:
    """The two files' contents for an output of `program` (e.g. "step1") run with `flags`."""
    made_by = {
        "program": program,
        "command": [sys.executable, *sys.argv],
        "versions": versions(),
        "source": source_revision(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return {ARGS_FILE: resolved_flags(flags), MADE_BY_FILE: made_by}


def write_record(directory: str | os.PathLike | None, flags: Mapping[str, Any], program: str) -> None:
    """Write `args.json` (the run's resolved `flags`: every flag's value after parsing and validation,
    as the command line gave them, e.g. `vars(args)`) and `made_by.json` into `directory` (a save's
    temporary directory; None: a rank that does not write), each file whole or not at all."""
    if directory is None:
        return
    for name, content in record(flags, program).items():
        path = Path(directory, name)
        partial = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            partial.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
