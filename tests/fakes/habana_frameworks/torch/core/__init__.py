"""Fake `habana_frameworks.torch.core`: `mark_step` is recorded (the graph flush itself is a no-op on the CPU)."""

calls: list[str] = []


def mark_step() -> None:
    calls.append("mark_step")


def reset() -> None:
    calls.clear()
