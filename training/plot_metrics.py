"""Plot a run's TensorBoard scalars (reward, reward EMA, losses, KL) into one PNG.

python training/plot_metrics.py --logdir step_tensorboard --out metrics.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TAGS = (
    "step3/reward",
    "step3/reward_ema",
    "step3/actor_loss",
    "step3/critic_loss",
    "step3/kl",
    "step1/loss",
    "step2/loss",
)


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under `logdir` (all event files, recursively)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events_dir in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(events_dir))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return series


def plot(
    series: dict[str, list[tuple[int, float]]], out: str | Path, tags: tuple[str, ...] = DEFAULT_TAGS
) -> list[str]:
    """Draw one panel per available tag; returns the tags drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [tag for tag in tags if series.get(tag)]
    if not drawn:
        raise ValueError(f"no scalars among {', '.join(tags)}")
    fig, axes = plt.subplots(len(drawn), 1, figsize=(7, 2.2 * len(drawn)), squeeze=False)
    for ax, tag in zip(axes[:, 0], drawn, strict=True):
        steps, values = zip(*sorted(series[tag]), strict=True)
        ax.plot(steps, values, marker=".")
        ax.set_title(tag, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", required=True, help="the --tensorboard_path of a run")
    p.add_argument("--out", default="metrics.png")
    args = p.parse_args(argv)
    if not Path(args.logdir).is_dir():
        print(
            f"error: --logdir {args.logdir} is not a directory; pass the --tensorboard_path of a run", file=sys.stderr
        )
        return 2
    try:
        drawn = plot(read_scalars(args.logdir), args.out)
    except ValueError as err:
        print(f"error: {err} under {args.logdir}; was the run started with --enable_tensorboard?", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
