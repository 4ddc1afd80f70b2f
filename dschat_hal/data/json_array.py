"""Streaming conversion of a top-level JSON array of objects to JSON lines.

`datasets` reads a JSON-array file whole through pandas (about 7x the file's size in memory);
JSON lines it reads in blocks through pyarrow. Converting first keeps preparation memory flat.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dschat_hal.faults import temp_prefix

CHUNK = 1 << 20  # characters read at a time


def is_json_array(path: Path) -> bool:
    """Whether the file's first non-blank character opens an array."""
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith("[")


def array_to_lines(source: Path, target: Path) -> bool:
    """Write each object of `source`'s top-level array as one line of `target` (atomically).

    Returns False (writing nothing) when the array holds something other than objects or is not
    valid JSON: the caller then lets `datasets` read the file and report the problem.
    """
    decoder = json.JSONDecoder()
    tmp = target.with_name(temp_prefix(target.name) + "part")  # a killed run's copy: the next run removes it
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(source, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
            buf, pos, eof = f.read(CHUNK).lstrip("\ufeff \t\r\n")[1:], 0, False
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(buf) and not eof:
                    buf, pos = f.read(CHUNK), 0
                    eof = not buf
                    continue
                if pos >= len(buf) or buf[pos] == "]":
                    break
                if buf[pos] != "{":
                    return False
                try:
                    _, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    more = f.read(CHUNK)
                    if not more:
                        return False
                    buf, pos = buf[pos:] + more, 0
                    continue
                out.write(
                    buf[pos:end].replace("\r", " ").replace("\n", " ") + "\n"
                )  # raw newlines cannot sit in JSON strings
                pos = end
        os.replace(tmp, target)
        return True
    finally:
        tmp.unlink(missing_ok=True)
