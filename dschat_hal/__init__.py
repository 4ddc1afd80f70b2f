"""dschat-hal's library. `accel` is imported first: it sets the OpenMP wait policy, which torch reads once
when it loads, so every entry point that imports the library (the step mains run directly) gets it in time."""

import accel  # noqa: F401
