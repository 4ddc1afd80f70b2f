"""The Gaudi runtime's environment defaults, set before torch or the bridge is imported.

Habana's bridge fixes lazy or eager mode when it is imported (and torch autoloads it on
`import torch` unless PT_HPU_LAZY_MODE is "1"), so `accel/__init__` applies these defaults before
it imports torch, whenever this process may use the HPU. Nothing here imports torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import MutableMapping, Sequence

HPU_ENV_DEFAULTS = {
    "PT_HPU_LAZY_MODE": "1",  # lazy graph mode, mark_step-driven (a value you set wins)
    "PT_HPU_ENABLE_LAZY_COLLECTIVES": "true",  # needed by ZeRO-3 / tensor parallelism in lazy mode
}


def requested_device(argv: Sequence[str], environ: MutableMapping[str, str]) -> str:
    """The device named by ACCEL_DEVICE or a `--device` flag on the command line ("" when none)."""
    if environ.get("ACCEL_DEVICE"):
        return environ["ACCEL_DEVICE"].lower()
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1].lower()
        if arg.startswith("--device="):
            return arg.split("=", 1)[1].lower()
    return ""


def may_use_hpu(argv: Sequence[str] | None = None, environ: MutableMapping[str, str] | None = None) -> bool:
    """HPU requested, or no device chosen yet and the bridge is installed (found, not imported)."""
    device = requested_device(sys.argv if argv is None else argv, os.environ if environ is None else environ)
    if device and device != "auto":
        return device == "hpu"
    return importlib.util.find_spec("habana_frameworks") is not None


def set_hpu_env_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set each default the environment does not already set; returns the names it set."""
    environ = os.environ if environ is None else environ
    missing = [key for key in HPU_ENV_DEFAULTS if key not in environ]
    for key in missing:
        environ[key] = HPU_ENV_DEFAULTS[key]
    return missing
