"""Run monitoring: throughput and ETA between progress reports, and where scalars go
(`--report_to`: TensorBoard, Weights & Biases, or nowhere).

Throughput counts every rank (samples and tokens summed over the world); the ETA extrapolates the
mean time per step of this run (a resumed run counts from its resume) over the steps left.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import TYPE_CHECKING, Any

from dschat_hal.errors import UserError

if TYPE_CHECKING:
    from dschat_hal.configs import LoggingConfig


def format_eta(seconds: float) -> str:
    """`seconds` as a short duration: 45s, 3m05s, 2h07m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RunClock:
    """Wall time per step since the previous report, and the run's ETA, for steps `done`..`total`."""

    def __init__(self, done: int, total: int) -> None:
        self.total, self.first, self.last_step = total, done, done
        self.start = self.last_time = time.time()

    def tick(self, step: int) -> tuple[float, float]:
        """(seconds since the previous tick, ETA in seconds) at optimizer step `step`."""
        now = time.time()
        interval, self.last_time, self.last_step = now - self.last_time, now, step
        done = step - self.first
        eta = (now - self.start) / done * max(self.total - step, 0) if done > 0 else float("nan")
        return interval, eta


def throughput(samples: float, tokens: float, seconds: float) -> dict[str, float]:
    """samples/s and tokens/s over `seconds` (0 when no time passed)."""
    seconds = max(seconds, 1e-9)
    return {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds}


def current_lr(engine: Any) -> float:
    """The first parameter group's learning rate of a DeepSpeed engine (host floats: no device sync)."""
    lrs = engine.get_lr() if hasattr(engine, "get_lr") else [g["lr"] for g in engine.optimizer.param_groups]
    return float(lrs[0])


def installed(package: str) -> bool:
    """Whether `package` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def resolve_report_to(logging_config: LoggingConfig) -> LoggingConfig:
    """`--report_to` resolved (a new config; the same for one already resolved): `--enable_tensorboard`
    (upstream's flag) means tensorboard when `--report_to` is not given, and `--report_to tensorboard` sets
    `--enable_tensorboard` (DeepSpeed's own monitor writes beside it). wandb asked for but not installed:
    one error line."""
    import dataclasses

    report_to = logging_config.report_to
    if report_to is None:
        report_to = "tensorboard" if logging_config.enable_tensorboard else "none"
    logging_config = dataclasses.replace(
        logging_config, report_to=report_to, enable_tensorboard=report_to == "tensorboard"
    )
    if report_to == "wandb" and not installed("wandb"):
        raise UserError(
            "--report_to wandb: the wandb package is not installed; pip install wandb "
            "(WANDB_MODE=offline logs without an account), or use --report_to tensorboard"
        )
    return logging_config


STEP_METRIC = "global_step"  # the x axis of every scalar in a wandb run


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


class WandbWriter:
    """Scalars to Weights & Biases; offline with WANDB_MODE=offline (wandb reads it), files under
    WANDB_DIR when set, else `directory`. Each row carries the optimizer step as `global_step`, every
    scalar's x axis: wandb's own step must only grow, and would drop rows logged after a later step
    (step 3 logs an evaluation before the per-step records of the steps up to it)."""

    def __init__(self, name: str, directory: str | None, config: dict[str, Any] | None = None) -> None:
        import wandb

        directory = os.environ.get("WANDB_DIR") or directory
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "dschat-hal"),
                name=name,
                dir=directory,
                config=config or {},
            )
        except Exception as err:  # no API key and no terminal to ask for one, no server reachable, ...
            raise UserError(
                f"--report_to wandb: wandb could not start a run ({type(err).__name__}: {_first_line(err)}); "
                "log in (wandb login, or WANDB_API_KEY), set WANDB_MODE=offline to log without an account, "
                "or use --report_to tensorboard"
            ) from None
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def add_scalar(self, key: str, value: float, step: int) -> None:
        self.log({key: value}, step)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, STEP_METRIC: step})

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()
