"""The library. `accel` is imported first: it sets the OpenMP and Gaudi environment defaults before
torch is imported (Habana's bridge fixes lazy or eager mode when torch loads it)."""

import accel  # noqa: F401
