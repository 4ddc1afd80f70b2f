"""Fake `habana_frameworks.torch`: like the real one, importing it fixes lazy or eager mode from
PT_HPU_LAZY_MODE (later changes have no effect) and registers the `hpu_backend` compiler.

`IMPORT_ENV` records the variable as the import saw it, so a test can prove the defaults were set
first. An unset variable means eager here, so a bridge imported before the defaults shows up as a
mode the backend did not ask for.
"""

import os

IMPORT_ENV = os.environ.get("PT_HPU_LAZY_MODE")
LAZY_MODE = IMPORT_ENV == "1"

from habana_frameworks.torch import core, dynamo, hpex, hpu, utils  # noqa: E402, F401
from habana_frameworks.torch.utils import internal  # noqa: E402, F401

dynamo.register()
