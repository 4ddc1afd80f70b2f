"""One optimizer step on the CPU over an OPT-125m-shape parameter set (fp32, per-tensor): the candidates.

    DS_ACCELERATOR=cpu python benchmarks/bench_optimizer.py [--repeats 5] [--no_deepspeed]

torch AdamW single-tensor (`foreach=False`, the CPU default before), foreach, fused (`fused=True`, what
accel/cpu.py now returns) and DeepSpeedCPUAdam (its op is JIT-built on first use; the time to load it
into a fresh process, even when cached, is printed too). Median and min of `--repeats` timed steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SETTINGS = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def parameters(shapes: list[torch.Size]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def time_steps(optimizer: torch.optim.Optimizer, repeats: int) -> list[float]:
    optimizer.step()  # the first step allocates the moments
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_deepspeed", action="store_true", help="skip DeepSpeedCPUAdam")
    args = p.parse_args()
    from transformers import OPTConfig, OPTForCausalLM

    from accel.cpu import describe_cpu

    shapes = [q.shape for q in OPTForCausalLM(OPTConfig()).parameters()]
    print(f"{sum(s.numel() for s in shapes) / 1e6:.1f}M parameters in {len(shapes)} tensors, "
          f"{torch.get_num_threads()} threads on {describe_cpu()}")  # fmt: skip
    candidates = {
        "AdamW single-tensor": lambda ps: torch.optim.AdamW(ps, foreach=False, **SETTINGS),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **SETTINGS),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **SETTINGS),
    }
    if not args.no_deepspeed:
        started = time.perf_counter()
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])
        print(f"DeepSpeedCPUAdam: import + op load {time.perf_counter() - started:.1f} s")
        candidates["DeepSpeedCPUAdam"] = lambda ps: DeepSpeedCPUAdam(ps, adamw_mode=True, **SETTINGS)
    for name, make in candidates.items():
        times = time_steps(make(parameters(shapes)), args.repeats)
        print(f"| {name} | {statistics.median(times) * 1e3:.0f} ms | {min(times) * 1e3:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
