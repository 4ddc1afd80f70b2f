"""The small pieces `lm.py`, `tiny.py` and `end_tokens.py` share: whether the model hub is reachable,
a config's dropout keys, and the one-line refusal of an unusable attention implementation.

Below all three (it imports none of them), so none of them imports another in a circle."""

from __future__ import annotations

import os
from typing import Any

from dschat_hal.errors import UserError

DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "attention_probs_dropout_prob")

_hub_reachable: bool | None = None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can the model hub be reached (one quick TCP connect, remembered)? False when HF_HUB_OFFLINE is set."""
    global _hub_reachable
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    if _hub_reachable is None:
        import socket
        from urllib.parse import urlparse

        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
            _hub_reachable = True
        except OSError:
            _hub_reachable = False
    return _hub_reachable


def set_dropout(config: Any, dropout: float | None) -> None:
    """Set every dropout rate `config` has to `dropout` (None: leave the config's own)."""
    if dropout is None:
        return
    for key in DROPOUT_KEYS:
        if hasattr(config, key):
            setattr(config, key, dropout)


def unusable_attention(attention: str | None, name_or_path: str, err: Exception) -> UserError | None:
    """The one-line error for transformers refusing `--attn_implementation` (not installed, not
    supported by the model or the device); None when `err` is about something else."""
    if attention is None or not any(word in str(err).lower() for word in ("attention", "attn", "flash")):
        return None
    return UserError(
        f"--attn_implementation {attention} cannot be used for {name_or_path!r} here "
        f"({str(err).splitlines()[0][:160]}); choose another (eager always works) or leave it out"
    )
