"""The CPU backend keeps freed large host blocks for reuse (accel/_host_memory.py): a tensor allocated
again after it was freed is not page-faulted in again; settings of the user's own win."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
import accel
backend = accel.get("cpu")
backend.reuse_freed_host_memory()  # what each step's setup does
from accel import _host_memory

def faults_of_one_step(gradient):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fp32 = gradient.to(torch.float32)  # what a ZeRO step does with a bf16 gradient: a fresh 64 MB block
    torch.linalg.vector_norm(fp32)
    del fp32
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

gradient = torch.ones(16 * 2**20, dtype=torch.bfloat16)
faults = [faults_of_one_step(gradient) for _ in range(16)]
choice = _host_memory.choice
accel.release_host_memory()  # what the end of a step's main does
print(json.dumps({{"choice": choice, "faults": faults[12:], "after": _host_memory.choice,
                  "after_faults": [faults_of_one_step(gradient) for _ in range(4)]}}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "DSCHAT_HAL_HOST_MALLOC")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(ROOT))],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_reallocated_block_is_not_faulted_in_again():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    reused = probe()
    assert reused["choice"] == "freed blocks reused"
    assert sum(reused["faults"]) < pages // 10, reused
    # released: the freed heap went back to the system, so the next block is faulted in again (later ones may
    # reuse that block: glibc serves a fitting free chunk before it maps)
    assert reused["after"] == "allocator defaults" and reused["after_faults"][0] > pages // 2, reused
    defaults = probe(DSCHAT_HAL_HOST_MALLOC="default")
    assert defaults["choice"].startswith("glibc defaults")
    assert min(defaults["faults"]) > pages // 2, defaults  # mmap'd anew and faulted in, page by page


def test_an_allocator_setting_of_your_own_wins():
    mine = probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert mine["choice"] == "as set in the environment (MALLOC_MMAP_THRESHOLD_)"
