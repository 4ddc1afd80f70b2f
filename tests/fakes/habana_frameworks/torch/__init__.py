"""Stand-in `habana_frameworks.torch`: like the real one, importing it fixes lazy or eager mode from
PT_HPU_LAZY_MODE (later changes have no effect), registers the `hpu_backend` compiler and makes
`torch.hpu` the device module (optimum-habana's checkpointing makes "hpu" torch's default device).

`IMPORT_ENV` records the variable as the import saw it, so a test can prove the defaults were set
first. An unset variable means eager here, so a bridge imported before the defaults shows up as a
mode the backend did not ask for.
"""

import os
import sys

import torch

IMPORT_ENV = os.environ.get("PT_HPU_LAZY_MODE")
LAZY_MODE = IMPORT_ENV == "1"

from habana_frameworks.torch import core, dynamo, hpex, hpu, utils  # noqa: E402, F401
from habana_frameworks.torch.utils import experimental, internal  # noqa: E402, F401

dynamo.register()
torch.hpu = hpu  # as torch._register_device_module("hpu", ...), which refuses a second registration
sys.modules["torch.hpu"] = hpu


def unregister() -> None:
    """Take `torch.hpu` away again (tests that load the stand-in into their own process)."""
    if getattr(torch, "hpu", None) is not None:
        del torch.hpu
    sys.modules.pop("torch.hpu", None)
