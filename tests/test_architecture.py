"""The project's one rule: only accel/ names a device."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = re.compile(r"torch\.cuda|\.cuda\(|habana_frameworks|htcore|[\"'](cuda|hpu)(:\d+)?[\"']")


def offending_lines() -> list[str]:
    files = [
        *(ROOT / "dschat_hal").rglob("*.py"),
        *(ROOT / "training").rglob("*.py"),
        *(ROOT / "example_scripts").glob("**/*.py"),
        *(ROOT / "examples").glob("**/*.py"),
        *(ROOT / "benchmarks").glob("**/*.py"),
    ]
    hits = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return hits


def test_no_device_specifics_outside_accel():
    assert offending_lines() == []


def test_the_rule_catches_a_violation(tmp_path):
    assert FORBIDDEN.search('x = torch.device("cuda")')
    assert FORBIDDEN.search("model.cuda()")
    assert FORBIDDEN.search("import habana_frameworks.torch.core as htcore")
    assert not FORBIDDEN.search("backend.to_device(model)")
