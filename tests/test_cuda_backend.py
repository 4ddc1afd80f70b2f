"""The CUDA backend's decisions, checked on the CPU: the backend object is built without touching CUDA
(its constructor asks nothing of the device), and the compiler its decode-step capture calls is swapped
for one that runs here."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from accel.cpu import FusedAdamW
from accel.cuda import CAPTURE_CALLS, CudaAccelerator


@pytest.fixture
def cuda_backend() -> CudaAccelerator:
    return CudaAccelerator(local_rank=0)


def test_default_optimizer_is_torch_fused_adamw_and_deepspeed_fused_adam_is_opt_in(cuda_backend):
    """No op to build by default (#28): DeepSpeed's FusedAdam JIT-builds with nvcc on first use."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    assert cuda_backend.optimizer_class() is FusedAdamW
    assert cuda_backend.describe_optimizer() == "torch.optim.AdamW(fused=True)"
    assert cuda_backend.optimizer_class(fused=False) is torch.optim.AdamW
    assert cuda_backend.optimizer_class(offload=True) is DeepSpeedCPUAdam
    cuda_backend.optimizer_choice = "deepspeed_fused"
    assert cuda_backend.optimizer_class() is FusedAdam  # the class only: building its op needs nvcc
    assert cuda_backend.describe_optimizer() == "deepspeed.ops.adam.fused_adam.FusedAdam"
    assert cuda_backend.optimizer_class(fused=False) is torch.optim.AdamW  # --no_fused_kernels still wins
    assert cuda_backend.optimizer_class(offload=True) is DeepSpeedCPUAdam


@pytest.mark.parametrize("flags", [[], ["--optimizer", "deepspeed_fused"]])
def test_start_up_line_names_the_optimizer(flags, cuda_backend, monkeypatch, capsys):
    from dschat_hal import runtime
    from dschat_hal.args import step1_parser

    monkeypatch.setattr(cuda_backend, "init_distributed", lambda: None)
    monkeypatch.setattr(cuda_backend, "_bf16_ok", lambda: True)
    monkeypatch.setattr(runtime.accel, "get", lambda *args, **kwargs: cuda_backend)
    runtime.setup(step1_parser().parse_args(["--device", "cuda", *flags]))
    expected = "deepspeed.ops.adam.fused_adam.FusedAdam" if flags else "torch.optim.AdamW(fused=True)"
    out = capsys.readouterr().out
    assert f"\noptimizer: {expected}\n" in f"\n{out}" and "note:" not in out


@pytest.mark.parametrize(
    ("device", "extra", "note"),
    [
        ("cuda", [], None),
        ("cpu", [], "does nothing on cpu: DeepSpeed's FusedAdam is a CUDA optimizer"),
        (
            "cuda",
            ["--offload"],
            "does nothing with --offload, which picks deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam",
        ),
        ("cuda", ["--no_fused_kernels"], "does nothing with --no_fused_kernels, which picks torch.optim.adamw.AdamW"),
    ],
)
def test_deepspeed_fused_where_it_does_nothing_is_noted(device, extra, note, cuda_backend):
    import accel
    from dschat_hal.args import step1_parser
    from dschat_hal.inert_flags import inert_flag_notes

    backend = cuda_backend if device == "cuda" else accel.get("cpu")
    args = step1_parser().parse_args(["--optimizer", "deepspeed_fused", *extra])
    backend.optimizer_choice = args.optimizer  # as runtime.setup does before it collects the notes
    notes = inert_flag_notes(args, backend, 1)
    if note is None:
        assert notes == []
    else:
        assert (
            len(notes) == 1 and note in notes[0] and notes[0].endswith("drop the flag" if not extra else "of the two")
        )


class GraphBreak(torch.nn.Module):
    """A decode step with a graph break (a data-dependent branch): without fullgraph, dynamo would split it
    and part of it would run outside the CUDA graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


class Whole(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2


@pytest.fixture
def cpu_compile(monkeypatch):
    """torch.compile as the CUDA backend calls it, recorded, compiling for the CPU with a counting backend."""
    real, calls, counter = torch.compile, [], CompileCounter()

    def compile_(model, **kwargs):
        calls.append(kwargs)
        return real(model, backend=counter, fullgraph=kwargs.get("fullgraph", False), dynamic=kwargs.get("dynamic"))

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    torch._dynamo.reset()
    yield calls, counter
    torch._dynamo.reset()


def test_capture_asks_for_one_whole_cuda_graph(cuda_backend, cpu_compile, caplog):
    calls, counter = cpu_compile
    cuda_backend.use_graphs = True
    step, x = Whole(), torch.randn(3, 4)
    captured = cuda_backend.capture_decode_step(step)
    assert calls and calls[0]["fullgraph"] is True and calls[0]["dynamic"] is False
    assert calls[0]["options"]["triton.cudagraphs"] is True  # reduce-overhead's CUDA graphs
    assert calls[0]["options"].get("triton.cudagraph_or_error", True) is True  # a skipped graph is an error
    with caplog.at_level(logging.INFO):
        for _ in range(CAPTURE_CALLS + 2):
            torch.testing.assert_close(captured(x), step(x))
    assert counter.frame_count == 1 and "eager" not in caplog.text
    assert cuda_backend.graphs_fallback_reason == ""


def test_a_step_that_does_not_capture_whole_decodes_eager_said_in_one_line(cuda_backend, cpu_compile, caplog):
    calls, counter = cpu_compile
    cuda_backend.use_graphs = True
    step, x = GraphBreak(), torch.randn(3, 4)
    captured = cuda_backend.capture_decode_step(step)
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            torch.testing.assert_close(captured(x), step(x))  # the first call fails to compile, then eager
        again = cuda_backend.capture_decode_step(GraphBreak())  # the next shape bucket: eager at once
    assert again.__class__ is GraphBreak and len(calls) == 1 and counter.frame_count == 0
    lines = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "decodes eager" in lines[0] and cuda_backend.graphs_fallback_reason in lines[0]
    assert "data-dependent branching" in cuda_backend.graphs_fallback_reason.lower(), (
        cuda_backend.graphs_fallback_reason
    )
