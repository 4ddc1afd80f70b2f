"""The library. `accel` is imported first: it sets the OpenMP wait policy and the Gaudi environment
defaults before torch is imported (torch reads the first once; Habana's bridge fixes lazy or eager mode
when torch loads it), so every entry point that imports the library gets them in time."""

import accel  # noqa: F401
