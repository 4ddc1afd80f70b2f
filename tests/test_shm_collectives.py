"""On the CPU, with every rank on one host, ZeRO's gradient all-reduce and ZeRO-3's parameter
all-gathers go over DeepSpeed's shared-memory all-reduce (`accel/_shm_collectives.py`) instead of gloo's
TCP loopback: exact results, the kernel only where it is safe (a sum, a dtype it reduces, contiguous, the
whole world), and ZeRO-3 training gives bit-identical weights on either path."""

from __future__ import annotations

import json

import torch
from conftest import run_script


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
    on_kernel = {"bf16", "fp32", "fp32_odd_large", "gather_bf16", "gather_fp32_in_place", "gather_async"}
    for rank in ranks:
        assert rank["routed"]
        for name, (correct, took_kernel) in rank["cases"].items():
            assert correct, name
            assert took_kernel == (name in on_kernel), name  # int64, MAX, strided, a sub-group: gloo
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
