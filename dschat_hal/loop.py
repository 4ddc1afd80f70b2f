"""The supervised training loop shared by steps 1 and 2: forward, backward, step, report, checkpoint.

Losses stay on the device between reports; the host reads them only every `log_interval` steps,
so graph-compiling devices never wait inside the loop. Non-finite losses and DeepSpeed overflow
skips are counted at each report, and training stops past `--max_bad_steps`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from accel import Accelerator
from dschat_hal.errors import UserError
from dschat_hal.runtime import ScalarWriter, all_reduce_mean, is_rank0, print_rank0

LossFn = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]


class TrainingHealthError(UserError):
    """Training produced garbage (NaN/inf losses, repeated overflow) and was stopped."""


def supervised_loaders(args: argparse.Namespace, phase: int, tokenizer, backend: Accelerator):
    """Step 1 or 2's (train_set, eval_set, train_loader, eval_loader) from the shared flags."""
    from dschat_hal.data import Collator, DataSpec, cache_dir_for, load_or_build
    from dschat_hal.runtime import dataloader

    spec = DataSpec(
        args.data_path,
        args.data_split,
        phase,
        args.seed,
        args.max_seq_len,
        sft_only_data_path=args.sft_only_data_path if phase == 1 else [],
    )
    train_set, eval_set, _ = load_or_build(spec, tokenizer, cache_dir_for(args), args.preprocessing_num_workers)
    collate = Collator(phase, tokenizer.pad_token_id, backend, args.max_seq_len)
    train_loader = dataloader(train_set, collate, args.per_device_train_batch_size, args.seed)
    eval_loader = dataloader(eval_set, collate, args.per_device_eval_batch_size, args.seed, shuffle=False)
    return train_set, eval_set, train_loader, eval_loader


def total_optimizer_steps(loader, args: argparse.Namespace) -> int:
    """Optimizer steps in the planned epochs: the length of the learning-rate schedule."""
    return args.num_train_epochs * math.ceil(len(loader) / args.gradient_accumulation_steps)


def progress(iterable, total: int, description: str, args: argparse.Namespace):
    """A tqdm bar on rank 0 when stderr is a terminal and --quiet is off; the iterable otherwise."""
    if getattr(args, "quiet", False) or not is_rank0() or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False)


# ---- checkpoints ------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_dir(args: argparse.Namespace) -> str | None:
    """`--checkpoint_dir`, else a sibling of the output (the final save replaces the output directory)."""
    return args.checkpoint_dir or (f"{args.output_dir.rstrip('/')}_checkpoints" if args.output_dir else None)


def save_checkpoint(engines: dict, args: argparse.Namespace, position: dict) -> None:
    """DeepSpeed checkpoints (model, optimizer, scheduler) of each engine, plus RNG and data position."""
    root = checkpoint_dir(args)
    for name, engine in engines.items():
        engine.save_checkpoint(os.path.join(root, name), client_state={"position": position, "rng": rng_state()})


def load_checkpoint(engines: dict, args: argparse.Namespace) -> dict | None:
    """Resume every engine from its latest checkpoint; returns the saved data position and RNG state
    (None: fresh start). The caller restores the RNG at the first resumed batch, after the data
    loader's iterator has drawn its own seed, as it did in the uninterrupted run."""
    root = checkpoint_dir(args)
    if not (args.resume and root and os.path.exists(os.path.join(root, next(iter(engines)), "latest"))):
        if args.resume:
            print_rank0(f"--resume: no checkpoint under {root}; starting from scratch")
        return None
    client = None
    for name, engine in engines.items():
        path, client = engine.load_checkpoint(os.path.join(root, name), load_module_strict=False)
        if path is None:
            raise UserError(f"cannot load the checkpoint under {os.path.join(root, name)}; delete it or drop --resume")
    print_rank0(f"resumed from {root} at {client['position']}")
    return {**client["position"], "rng": client["rng"]}


# ---- health ----------------------------------------------------------------------------------
class HealthGuard:
    """Counts non-finite losses and optimizer overflow skips; raises past `max_bad_steps`."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps, self.bad_steps, self.skipped_seen = max_bad_steps, 0, 0

    def check(self, values, first_step: int, engine=None, what: str = "loss") -> None:
        """`values`: a tensor or sequence of this interval's numbers, the first one at `first_step`."""
        bad = (
            (~torch.isfinite(torch.as_tensor(values, dtype=torch.float32))).nonzero().flatten().tolist()
        )  # runs at report time only
        skipped = getattr(engine, "skipped_steps", 0) if engine is not None else 0
        new_skips, self.skipped_seen = skipped - self.skipped_seen, skipped
        if bad:
            print_rank0(f"warning: non-finite {what} at step {first_step + bad[0]} ({len(bad)} in this interval)")
        if new_skips:
            print_rank0(f"warning: {new_skips} optimizer steps skipped for gradient overflow")
        self.bad_steps += len(bad) + new_skips
        if self.bad_steps > self.max_bad_steps:
            raise TrainingHealthError(
                f"training stopped: {self.bad_steps} bad steps (non-finite {what} or overflow), more than "
                f"--max_bad_steps {self.max_bad_steps}; lower the learning rate, use --dtype bf16/fp32, or raise --max_bad_steps"
            )


# ---- the loop --------------------------------------------------------------------------------
def train(
    engine, loader, loss_fn: LossFn, backend: Accelerator, args: argparse.Namespace, writer: ScalarWriter, tag: str
) -> list[float]:
    """Run the epochs (or stop after `--max_steps`); returns the reported mean losses."""
    planned = total_optimizer_steps(loader, args)
    limit = min(planned, args.max_steps) if args.max_steps else planned
    position = load_checkpoint({tag: engine}, args) or {"epoch": 0, "batch": 0}
    guard = HealthGuard(args.max_bad_steps)
    reported: list[float] = []
    pending: list[torch.Tensor] = []
    start = time.time()
    engine.train()
    if engine.global_steps >= limit:
        return reported
    for epoch in range(position["epoch"], args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        skip = position["batch"] if epoch == position["epoch"] else 0
        for index, batch in enumerate(progress(loader, len(loader), f"{tag} epoch {epoch + 1}", args)):
            if index < skip:
                continue
            if "rng" in position:
                set_rng_state(position.pop("rng"))
            loss = loss_fn(engine, backend.to_device(batch))
            engine.backward(loss)
            backend.mark_step()
            engine.step()
            backend.mark_step()
            pending.append(loss.detach())
            done = engine.global_steps >= limit
            if len(pending) >= args.log_interval or done or args.print_loss:
                losses = torch.stack(pending).float()
                guard.check(losses, engine.global_steps - len(pending) + 1, engine)
                mean = all_reduce_mean(losses.mean()).item()
                pending.clear()
                reported.append(mean)
                writer.add({f"{tag}/loss": mean}, engine.global_steps)
                print_rank0(
                    f"[{tag}] epoch {epoch + 1} step {engine.global_steps}/{limit} loss {mean:.4f} "
                    f"({time.time() - start:.1f}s)"
                )
            if (
                args.save_interval
                and engine.is_gradient_accumulation_boundary()
                and engine.global_steps % args.save_interval == 0
            ):
                save_checkpoint({tag: engine}, args, {"epoch": epoch, "batch": index + 1})
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
