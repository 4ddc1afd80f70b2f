"""The layer's two user-facing errors, in a module without torch (so `--help` and `cli_entry` need none)."""

from __future__ import annotations


class DeviceUnavailableError(RuntimeError):
    """An explicitly requested device is not present or not usable."""


class UnsupportedDtypeError(ValueError):
    """A dtype the device cannot train in, or an unknown dtype name."""
