"""On the CPU, with every rank on one host, ZeRO's gradient all-reduce and ZeRO-3's parameter
all-gathers go over DeepSpeed's shared-memory all-reduce (`accel/_shm_collectives.py`) instead of gloo's
TCP loopback: exact results, the kernel only where it is safe (a sum, a dtype it reduces, contiguous, the
whole world), and ZeRO-3 training gives bit-identical weights on either path."""

from __future__ import annotations

import json
import platform

import torch
from conftest import run_script

# The vector level at which DeepSpeed's kernel reduces each case's dtype (1: AVX2, fp32; 2: AVX-512BW, bf16/fp16).
KERNEL_LEVEL_NEEDED = {
    "bf16": 2, "fp32": 1, "fp32_odd_large": 1, "gather_bf16": 2, "gather_fp32_in_place": 1, "gather_async": 2,
}  # fmt: skip


def kernel_level_of_this_cpu() -> int:
    """What DeepSpeed's shm op should report here, read from the CPU's flags (not from the op itself);
    off x86 the op has no probe and always says 2."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return 2
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return 2 if "avx512bw" in flags else 1 if "avx2" in flags else 0


def run_workers(tmp_path, port: int, env: dict | None = None) -> list[dict]:
    result = run_script(
        *("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)),
        "tests/workers/shm_collectives.py",
        str(tmp_path),
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_zero_collectives_take_shared_memory_exactly_where_safe_and_train_identically(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_SIZE", raising=False)  # torchrun: accel copies LOCAL_WORLD_SIZE
    shm_dir, gloo_dir = tmp_path / "shm", tmp_path / "gloo"
    shm_dir.mkdir(), gloo_dir.mkdir()
    ranks = run_workers(shm_dir, 29641)
    assert ranks[0]["level"] == ranks[1]["level"] == kernel_level_of_this_cpu()
    for rank in ranks:
        assert rank["routed"]
        for level, cases in ((rank["level"], rank["cases"]), (min(rank["level"], 1), rank["cases_at_level_1"])):
            for name, (correct, took_kernel) in cases.items():
                assert correct, (name, level)
                # int64, MAX, strided, a sub-group: gloo at any level; bf16 only at AVX-512BW (level 2)
                assert took_kernel == (level >= KERNEL_LEVEL_NEEDED.get(name, 99)), (name, level)
    assert "subgroup" in ranks[0]["cases"]

    assert [r["routed"] for r in run_workers(gloo_dir, 29643, env={"DSCHAT_HAL_SHM_COLLECTIVES": "gloo"})] == [
        False,
        False,
    ]
    for rank in (0, 1):
        shm_run, gloo_run = (torch.load(d / f"weights{rank}.pt") for d in (shm_dir, gloo_dir))
        assert shm_run["losses"] == gloo_run["losses"]
        assert shm_run["state"].keys() == gloo_run["state"].keys()
        for key, value in shm_run["state"].items():
            assert torch.equal(value, gloo_run["state"][key]), key
