"""The supervised training loop shared by steps 1 and 2: forward, backward, step, report.

Losses stay on the device between reports; the host reads them only every `log_interval` steps,
so graph-compiling devices never wait inside the loop.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from accel import Accelerator
from dschat_hal.runtime import ScalarWriter, all_reduce_mean, print_rank0

LossFn = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]


def total_optimizer_steps(loader, args: argparse.Namespace) -> int:
    steps = args.num_train_epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)
    return min(steps, args.max_steps) if args.max_steps else steps


def train(
    engine, loader, loss_fn: LossFn, backend: Accelerator, args: argparse.Namespace, writer: ScalarWriter, tag: str
) -> list[float]:
    """Run the epochs (or `--max_steps`); returns the reported mean losses."""
    limit = total_optimizer_steps(loader, args)
    reported: list[float] = []
    pending: list[torch.Tensor] = []
    start = time.time()
    engine.train()
    for epoch in range(args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            loss = loss_fn(engine, backend.to_device(batch))
            engine.backward(loss)
            backend.mark_step()
            engine.step()
            backend.mark_step()
            pending.append(loss.detach())
            done = engine.global_steps >= limit
            if len(pending) >= args.log_interval or done or args.print_loss:
                mean = all_reduce_mean(torch.stack(pending).float().mean()).item()
                pending.clear()
                reported.append(mean)
                writer.add({f"{tag}/loss": mean}, engine.global_steps)
                print_rank0(
                    f"[{tag}] epoch {epoch + 1} step {engine.global_steps}/{limit} loss {mean:.4f} "
                    f"({time.time() - start:.1f}s)"
                )
            if done:
                return reported
    return reported


@torch.no_grad()
def evaluate(engine, loader, metric_fn: Callable, backend: Accelerator) -> dict[str, float]:
    """Sum `metric_fn(engine, batch)` (a dict of tensors) over the loader, averaged over ranks."""
    engine.eval()
    totals: dict[str, torch.Tensor] = {}
    for batch in loader:
        for key, value in metric_fn(engine, backend.to_device(batch)).items():
            totals[key] = totals.get(key, 0) + value.detach().float()
        backend.mark_step()
    engine.train()
    return {key: all_reduce_mean(value).item() for key, value in totals.items()}
