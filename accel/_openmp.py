"""How OpenMP threads wait between parallel regions: chosen before torch loads its OpenMP runtime.

Measured on 2 cores (benchmarks/RESULTS_startup.md): threads that sleep at once (PASSIVE) make every
small op pay a wake-up, so the demo takes 1.3x longer on idle cores than with a brief spin; threads
that spin (libgomp's default 300k iterations, or ACTIVE) collapse when other processes share the
cores, where PASSIVE is 1.7-2.4x faster than even a brief spin. So: spin briefly when the cores are
idle at start-up, sleep at once when they are already loaded. A value you set wins.
"""

from __future__ import annotations

import os

SPIN_COUNT = 30000  # libgomp iterations a waiting thread spins before it sleeps
choice = "as set in the environment"  # what `set_wait_defaults` decided, for the start-up line


def set_wait_defaults(environ: os._Environ | dict = os.environ) -> str:
    """Set OMP_WAIT_POLICY (and GOMP_SPINCOUNT, for libgomp) unless either is set; returns the choice."""
    global choice
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        choice = "as set in the environment"
        return choice
    load, cpus = os.getloadavg()[0], len(os.sched_getaffinity(0))
    environ["OMP_WAIT_POLICY"] = "PASSIVE"  # other OpenMP runtimes: sleep at once
    if load < cpus:
        environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        choice = f"spin then sleep (load average {load:.1f} < {cpus} CPUs at start)"
    else:
        choice = f"sleep at once (load average {load:.1f} >= {cpus} CPUs at start)"
    return choice
