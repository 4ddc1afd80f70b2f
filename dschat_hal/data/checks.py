"""Reading data files with one-line errors: unreadable, not UTF-8, malformed JSON/JSONL (with the
real line number). The datasets loader calls the cheap checks when a load fails; the ptx reader parses with them."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from dschat_hal.errors import UserError


def read_text(path: Path) -> str:
    """The file's text, or one line saying why it cannot be read."""
    try:
        data = path.read_bytes()
    except PermissionError:
        raise UserError(f"data file {path} is not readable (permission denied); fix its permissions") from None
    except IsADirectoryError:
        raise UserError(f"data file {path} is a directory; pass a .json, .jsonl or .parquet file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}, line {line}); re-encode it as UTF-8") from None


def check_readable(path: Path) -> None:
    """One line when the data file cannot be opened (reads one byte; cheap for any size)."""
    try:
        with path.open("rb") as f:
            f.read(1)
    except PermissionError:
        raise UserError(f"data file {path} is not readable (permission denied); fix its permissions") from None
    except IsADirectoryError:
        raise UserError(f"data file {path} is a directory; pass a .json, .jsonl or .parquet file") from None


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """One line naming the first byte (and its line) that is not UTF-8; streams the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with path.open("rb") as f:
        while True:
            data = f.read(chunk)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                line = lines + (pending + data)[: err.start].count(b"\n") + 1
                raise UserError(
                    f"{path} is not UTF-8 text (byte {offset - len(pending) + err.start}, line {line}); "
                    "re-encode it as UTF-8"
                ) from None
            if not data:
                return
            offset += len(data)
            lines += data.count(b"\n")


def parse_json_rows(path: Path, text: str) -> Any:
    """A .json document or the rows of a .jsonl file; errors name the file's real line."""
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                "fix the file or regenerate it"
            ) from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path} is not valid JSONL (line {number}, column {err.colno}: {err.msg}); "
                "fix that line or regenerate the file"
            ) from None
    return rows
