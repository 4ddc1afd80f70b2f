"""Plain-text data for step 3's optional ptx loss: texts concatenated and cut into fixed blocks."""

from __future__ import annotations

from pathlib import Path

import torch

from dschat_hal.data.checks import parse_json_rows, read_text
from dschat_hal.data.pipeline import TokenDataset
from dschat_hal.data.tokens import Encoder
from dschat_hal.errors import UserError


def read_texts(name: str, config_name: str | None = None) -> list[str]:
    """Texts of a local .txt / .json / .jsonl file (rows with a `text` key, or prompt + chosen or TRL's
    prompt + completion) or a hub name."""
    path = Path(name).expanduser()
    if path.is_file():
        text = read_text(path)
        if path.suffix == ".txt":
            return [line for line in text.splitlines() if line.strip()]
        rows = parse_json_rows(path, text)
        try:
            return [
                row["text"]
                if "text" in row
                else row["prompt"] + (row["chosen"] if "chosen" in row else row["completion"])
                for row in rows
            ]
        except (KeyError, TypeError):
            raise UserError(
                f"{path}: every row needs a 'text' key (or 'prompt' and 'chosen', or 'prompt' and 'completion')"
            ) from None
    try:
        import datasets

        ds = datasets.load_dataset(name, config_name)
    except Exception as err:
        raise UserError(
            f"cannot load unsupervised dataset {name!r} ({str(err).splitlines()[0][:160]}); "
            "pass a local .txt/.json file when no hub is reachable"
        ) from None
    return [row["text"] for row in ds["train"] if row["text"].strip()]


def block_dataset(texts: list[str], tokenizer, block_size: int) -> TokenDataset:
    """Texts encoded with the tokenizer's default special tokens (BOS) and an EOS each, concatenated,
    cut into blocks of `block_size` (the tail shorter than a block is dropped)."""
    ids: list[int] = []
    encoder = Encoder(tokenizer)
    for start in range(0, len(texts), 1000):
        for seq in encoder.documents(texts[start : start + 1000]):
            ids.extend(seq)
    blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
    if not blocks:
        raise UserError(f"the unsupervised dataset has fewer than {block_size} tokens; add text or lower the lengths")
    return TokenDataset([{"input_ids": block} for block in blocks])


def collate_blocks(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([b["input_ids"] for b in batch], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
