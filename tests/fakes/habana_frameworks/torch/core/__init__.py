"""Stand-in `habana_frameworks.torch.core`: `mark_step` is recorded (the graph flush itself is a no-op on
the CPU); `hpu` is the device module, as DeepSpeed's HPU accelerator reads it from here."""

from habana_frameworks.torch import hpu  # noqa: F401

calls: list[str] = []


def mark_step() -> None:
    calls.append("mark_step")


def reset() -> None:
    calls.clear()
