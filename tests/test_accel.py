"""The hardware abstraction layer: one interface, every backend conforming, clear errors."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch

import accel
from accel.base import Accelerator


def backends(fake_hpu_module=None):
    names = ["cpu", "hpu"]
    if torch.cuda.is_available():
        names.append("cuda")
    return names


@pytest.mark.parametrize(
    "name",
    [
        "cpu",
        "hpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ],
)
def test_every_backend_implements_the_interface(name, fake_hpu):
    backend = accel.get(name)
    assert isinstance(backend, Accelerator)
    abstract = {n for n, v in inspect.getmembers(Accelerator) if getattr(v, "__isabstractmethod__", False)}
    assert abstract, "the interface declares abstract methods"
    for method in abstract:
        assert not getattr(getattr(type(backend), method), "__isabstractmethod__", False), method
    # exercise every public member once
    assert backend.device.type in ("cpu", "cuda", "hpu")
    t = backend.to_device({"a": torch.ones(2), "b": [torch.zeros(1)]})
    assert t["a"].device.type == backend.device.type and t["b"][0].device.type == backend.device.type
    backend.mark_step()
    assert backend.bucket_length(5) >= 5
    assert backend.pad_to_static(torch.ones(2, 3), 1, 5, 0).shape == (2, 5)
    assert issubclass(backend.optimizer_class(), torch.optim.Optimizer)
    assert issubclass(backend.optimizer_class(fused=False), torch.optim.Optimizer)
    assert isinstance(backend.compute_fp32_loss("opt"), bool)
    assert backend.default_dtype in backend.supported_dtypes
    assert backend.dist_backend in ("gloo", "nccl", "hccl")
    assert backend.comm_backend() in ("gloo", "nccl", "hccl")
    backend.manual_seed(3)
    backend.synchronize()
    stats = backend.memory_stats()
    assert set(stats) == {"allocated", "peak"} and stats["peak"] >= 0
    backend.empty_cache()
    model = torch.nn.Linear(2, 2)
    with backend.generation_context(model) as generating:
        assert generating is model
    assert backend.capture_decode_step(model) is model  # graphs only when asked (use_graphs)
    assert backend.generate_kwargs() == {}  # optimum-habana's generate options only where it is installed
    free = backend.available_memory()
    assert free is None or free > 0
    assert os.environ["DS_ACCELERATOR"] == backend.ds_name


def test_auto_picks_cpu_here_and_ds_agrees():
    backend = accel.get("auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend.name == expected
    from accel._deepspeed import ds_accelerator

    assert ds_accelerator(backend.ds_name).device_name() == expected


def test_unavailable_and_unknown_devices_fail_with_one_clear_line():
    with pytest.raises(
        accel.DeviceUnavailableError,
        match="habana_frameworks is not importable; run inside a Gaudi image or use --device cpu",
    ):
        accel.get("hpu")
    with pytest.raises(accel.DeviceUnavailableError, match="unknown device 'tpu'"):
        accel.get("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(accel.DeviceUnavailableError, match="CUDA requested"):
            accel.get("cuda")


def test_benchmark_headers_name_the_cpu_as_it_reports_itself(monkeypatch):
    """Every CPU figure depends on the model, torch's kernel level and native bf16: the benchmarks say them."""
    import accel.cpu

    monkeypatch.setattr(accel.cpu, "cpu_model_name", lambda: "Some CPU 9000")
    monkeypatch.setattr(accel.cpu, "native_bf16_flags", lambda: ())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert accel.cpu.describe_cpu() == "Some CPU 9000, torch CPU kernels AVX2, no native bf16"
    monkeypatch.setattr(accel.cpu, "native_bf16_flags", lambda: ("avx512_bf16", "amx_bf16"))
    assert accel.cpu.describe_cpu().endswith("native bf16 (avx512_bf16, amx_bf16)")
    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    timed = [p.name for p in benchmarks.glob("bench_*.py")]
    assert timed and all("describe_cpu()" in (benchmarks / name).read_text() for name in timed), timed


def test_cpu_backend_answers(monkeypatch):
    import accel.cpu

    cpu = accel.get("cpu")
    monkeypatch.setattr(accel.cpu, "native_bf16_flags", lambda: ("avx512_bf16",))
    assert cpu.resolve_dtype("auto") == torch.bfloat16 and "native bf16 (avx512_bf16)" in cpu.default_dtype_reason()
    monkeypatch.setattr(accel.cpu, "native_bf16_flags", lambda: ())
    assert cpu.resolve_dtype("auto") == torch.float32 and "no native bf16" in cpu.default_dtype_reason()
    assert cpu.dist_backend == "gloo"
    assert cpu.optimizer_class() is accel.cpu.FusedAdamW
    assert cpu.optimizer_class(offload=True) is accel.cpu.FusedAdamW
    assert cpu.optimizer_class(fused=False) is torch.optim.AdamW
    assert cpu.compute_fp32_loss("bloom") is False and cpu.compute_fp32_loss("bloom", True) is True
    assert cpu.resolve_dtype("bf16") == torch.bfloat16 and cpu.resolve_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="--dtype fp16 is not supported on cpu"):
        cpu.resolve_dtype("fp16")
    with pytest.raises(ValueError, match="unknown --dtype"):
        cpu.resolve_dtype("int4")
    assert cpu.bucket_length(37) == 37 and cpu.bucket_length(37, maximum=64) == 37  # dynamic off HPU


def test_openmp_waits_spin_on_idle_cores_and_sleep_on_loaded_ones(monkeypatch):
    from accel import _openmp

    monkeypatch.setattr(_openmp, "choice", _openmp.choice)  # restored after the test
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus - 0.5, 0.0, 0.0))
    idle: dict[str, str] = {}
    assert _openmp.set_wait_defaults(idle).startswith("spin then sleep")
    assert idle == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(_openmp.SPIN_COUNT)}
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 1.0, 0.0, 0.0))
    loaded: dict[str, str] = {}
    assert _openmp.set_wait_defaults(loaded).startswith("sleep at once")
    assert loaded == {"OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert _openmp.set_wait_defaults(mine) == "as set in the environment" and mine == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert "OpenMP waits: as set in the environment" in accel.get("cpu").runtime_notes()


def test_buckets_and_static_padding():
    cpu = accel.get("cpu")
    cpu.set_buckets([64, 16, 32])
    assert [cpu.bucket_length(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    assert cpu.bucket_length(100) == 100  # longer than every bucket: not truncated
    cpu.set_buckets(None)
    x = torch.tensor([[1, 2, 3]])
    assert cpu.pad_to_static(x, 1, 5, 0, left=True).tolist() == [[0, 0, 1, 2, 3]]
    assert cpu.pad_to_static(x, 1, 5, 9).tolist() == [[1, 2, 3, 9, 9]]
    with pytest.raises(ValueError):
        cpu.pad_to_static(x, 1, 2, 0)


def test_lm_loss_in_fp32_matches_reference():
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    loss = Accelerator.lm_loss(logits, labels, fp32=True)
    assert loss.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(loss, ref)
    assert Accelerator.lm_loss(logits, labels, fp32=False).dtype == torch.bfloat16


def test_shape_audit_records_distinct_shapes():
    cpu = accel.get("cpu")
    audit = cpu.enable_shape_audit()
    cpu.audit_shape("actor", torch.ones(2, 3))
    cpu.audit_shape("actor", torch.ones(2, 3))
    cpu.audit_shape("actor", torch.ones(2, 4))
    assert len(audit["actor"]) == 2


def test_the_process_group_is_destroyed_before_the_interpreter_shuts_down():
    """Left to interpreter shutdown, gloo's threads can abort a finished rank (SIGABRT, seen in CI)."""
    import subprocess
    import sys

    code = (
        "import atexit, accel, torch.distributed as dist\n"
        "accel.get('cpu').init_distributed()\n"
        "assert dist.is_initialized()\n"
        "atexit._run_exitfuncs()\n"
        "print('initialized after exit handlers:', dist.is_initialized())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "initialized after exit handlers: False" in result.stdout
