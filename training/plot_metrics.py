"""Plot every scalar a run logged (losses, rewards, KL, evaluations, learning rate, throughput,
ETA) into one PNG, one panel per scalar: from its TensorBoard event files, or from the
training_summary.json beside its outputs.

python training/plot_metrics.py --logdir step_tensorboard --out metrics.png
python training/plot_metrics.py --summary output/step3/training_summary.json --out metrics.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def read_summary(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """The scalar series of a step's training_summary.json: step 3's per-step `history`, step 1-2's
    reported `losses` (numbered by report) and the `evaluations` at their steps."""
    summary = json.loads(Path(path).read_text())
    series: dict[str, list[tuple[int, float]]] = {}
    for index, record in enumerate(summary.get("history") or []):
        for key, value in record.items():
            if isinstance(value, int | float):
                series.setdefault(key, []).append((index + 1, float(value)))
    for index, value in enumerate(summary.get("losses") or []):
        series.setdefault("loss (per report)", []).append((index + 1, float(value)))
    for record in summary.get("evaluations") or []:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float):
                series.setdefault(f"eval_{key}", []).append((int(record.get("step", 0)), float(value)))
    return series


def plot(series: dict[str, list[tuple[int, float]]], out: str | Path, tags: tuple[str, ...] | None = None) -> list[str]:
    """Draw one panel per tag with values (every tag in `series` by default); returns the tags drawn."""
    tags = tuple(sorted(series)) if tags is None else tags
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [tag for tag in tags if series.get(tag)]
    if not drawn:
        raise ValueError(f"no scalars among {', '.join(tags) or 'none'}")
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
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--logdir", help="the --tensorboard_path of a run")
    source.add_argument("--summary", help="a step's training_summary.json (runs without TensorBoard)")
    p.add_argument("--out", default="metrics.png")
    args = p.parse_args(argv)
    if args.summary:
        if not Path(args.summary).is_file():
            print(
                f"error: --summary {args.summary} is not a file; pass a step's training_summary.json", file=sys.stderr
            )
            return 2
        try:
            drawn = plot(read_summary(args.summary), args.out)
        except (ValueError, json.JSONDecodeError) as err:
            print(f"error: {args.summary}: {err}; pass a step's training_summary.json", file=sys.stderr)
            return 2
        print(f"wrote {args.out} ({', '.join(drawn)})")
        return 0
    if not Path(args.logdir).is_dir():
        print(
            f"error: --logdir {args.logdir} is not a directory; pass the --tensorboard_path of a run", file=sys.stderr
        )
        return 2
    try:
        drawn = plot(read_scalars(args.logdir), args.out)
    except ValueError as err:
        print(f"error: {err} under {args.logdir}; was the run started with --report_to tensorboard?", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
