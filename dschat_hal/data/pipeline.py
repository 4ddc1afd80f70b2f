"""Per-step datasets: disjoint seeded splits, tokenisation, a hash-keyed cache, and collators.

Step 1 trains on prompt+chosen, step 2 on chosen/rejected pairs, step 3 on prompts only. Token ids
are stored unpadded; collators pad each batch to `accel.bucket_length(...)`, which is the batch
maximum on CPU/GPU and a static bucket on graph-compiling devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dschat_hal.data.raw_datasets import RawDataset, get_raw_dataset
from dschat_hal.errors import UserError

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class DataSpec:
    """Everything that changes a step's tokenised data (and so its cache key)."""

    data_path: list[str]
    data_split: str = "2,4,4"
    phase: int = 1
    seed: int = 1234
    max_seq_len: int = 512
    max_prompt_seq_len: int = 256
    sft_only_data_path: list[str] = field(default_factory=list)


def split_fractions(data_split: str) -> list[float]:
    try:
        parts = [float(p) for p in data_split.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise UserError(f"--data_split {data_split!r} must be three non-negative numbers like 2,4,4 (steps 1, 2, 3)")
    total = sum(parts)
    return [p / total for p in parts]


def phase_indices(n: int, data_split: str, phase: int, seed: int) -> list[int]:
    """Indices of step `phase`'s slice of a seeded shuffle of range(n); slices are disjoint."""
    fractions = split_fractions(data_split)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + fraction)
    start, stop = (round(bounds[phase - 1] * n), round(bounds[phase] * n))
    return order[start:stop]


class TokenDataset(Dataset):
    """A list of samples, each a dict of token-id lists."""

    def __init__(self, samples: list[dict[str, list[int]]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.samples[index]


def _encode(tokenizer, text: str, max_len: int, add_eos: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_eos:
        ids = ids[: max_len - 1] + [tokenizer.eos_token_id]
    return ids[:max_len]


def tokenize_rows(raw: RawDataset, rows: list, tokenizer, spec: DataSpec) -> tuple[list[dict], int]:
    """Samples for `spec.phase`, and the number of prompts dropped as too long (step 3)."""
    samples, dropped = [], 0
    for row in rows:
        if spec.phase == 1:
            samples.append({"input_ids": _encode(tokenizer, raw.prompt_and_chosen(row), spec.max_seq_len, True)})
        elif spec.phase == 2:
            samples.append(
                {
                    "chosen": _encode(tokenizer, raw.prompt_and_chosen(row), spec.max_seq_len, True),
                    "rejected": _encode(tokenizer, raw.prompt_and_rejected(row), spec.max_seq_len, True),
                }
            )
        else:
            ids = tokenizer(raw.prompt(row), add_special_tokens=False)["input_ids"]
            if len(ids) > spec.max_prompt_seq_len:
                dropped += 1
            else:
                samples.append({"prompt": ids})
    return samples, dropped


def _file_fingerprint(name: str) -> str:
    path = Path(name).expanduser()
    if not path.exists():
        return name
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
    return ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_key(spec: DataSpec, tokenizer) -> str:
    from dschat_hal.models.tiny import DATA_DIR

    sources = [str(DATA_DIR) if p == "local/jsonfile" else p for p in spec.data_path + spec.sft_only_data_path]
    payload = {
        "version": CACHE_VERSION,
        "spec": asdict(spec),
        "files": [_file_fingerprint(p) for p in sources],
        "tokenizer": [
            tokenizer.name_or_path,
            len(tokenizer),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def build_datasets(spec: DataSpec, tokenizer) -> tuple[TokenDataset, TokenDataset, int]:
    """Tokenised (train, eval) datasets of one step and the count of dropped over-long prompts."""
    train, evaluation, dropped = [], [], 0
    for name in spec.data_path:
        raw = get_raw_dataset(name)
        train_rows = [raw.train[i] for i in phase_indices(len(raw.train), spec.data_split, spec.phase, spec.seed)]
        eval_rows = [raw.eval[i] for i in phase_indices(len(raw.eval), spec.data_split, spec.phase, spec.seed)]
        for rows, out in ((train_rows, train), (eval_rows or raw.eval, evaluation)):
            samples, n_dropped = tokenize_rows(raw, rows, tokenizer, spec)
            out.extend(samples)
            dropped += n_dropped if out is train else 0
    if spec.phase == 1:
        for name in spec.sft_only_data_path:
            raw = get_raw_dataset(name)
            train.extend(tokenize_rows(raw, raw.train, tokenizer, spec)[0])
            evaluation.extend(tokenize_rows(raw, raw.eval, tokenizer, spec)[0])
    if not train:
        if dropped:
            raise UserError(
                f"all {dropped} step-3 prompts are longer than --max_prompt_seq_len {spec.max_prompt_seq_len}; "
                "raise --max_prompt_seq_len or use shorter prompts"
            )
        sizes = {name: len(get_raw_dataset(name).train) for name in spec.data_path}
        if sum(sizes.values()) < 10:
            shares = [len(phase_indices(sum(sizes.values()), spec.data_split, p, spec.seed)) for p in (1, 2, 3)]
            raise UserError(
                f"the dataset is too small: {sum(sizes.values())} training rows, split by --data_split "
                f"{spec.data_split} into {shares[0]}/{shares[1]}/{shares[2]} rows for steps 1/2/3, so step "
                f"{spec.phase} gets none; add rows"
            )
        raise UserError(
            f"step {spec.phase} gets no training rows from --data_split {spec.data_split}; "
            f"give step {spec.phase} a non-zero share (e.g. 2,4,4)"
        )
    return TokenDataset(train), TokenDataset(evaluation), dropped


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_or_build(spec: DataSpec, tokenizer, output_path: str | None) -> tuple[TokenDataset, TokenDataset, int]:
    """`build_datasets`, cached under `output_path` by a hash of everything that changes the result.

    Rank 0 builds and writes the cache (atomically); the other ranks wait and then read it.
    """
    if not output_path:
        return build_datasets(spec, tokenizer)
    path = Path(output_path) / f"step{spec.phase}_{cache_key(spec, tokenizer)}.pt"
    if _is_writer() and not path.exists():
        train, evaluation, dropped = build_datasets(spec, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"train": train.samples, "eval": evaluation.samples, "dropped": dropped}, tmp)
        os.replace(tmp, path)
    _barrier()
    try:
        blob = torch.load(path, weights_only=True)
    except Exception as err:  # truncated/corrupted cache file: any unpickling error
        if not _is_writer():
            raise
        log.warning("warning: data cache %s is unreadable (%s); rebuilding it", path, str(err).splitlines()[0][:120])
        path.unlink(missing_ok=True)
        return load_or_build(spec, tokenizer, output_path)
    return TokenDataset(blob["train"]), TokenDataset(blob["eval"]), blob["dropped"]


# ---- collators ----------------------------------------------------------------------------------
def pad_sequences(
    seqs: list[list[int]], pad_id: int, length: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into (ids, attention_mask) of width `length`, padding right (or left)."""
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for row, seq in enumerate(seqs):
        seq = seq[:length]
        span = slice(length - len(seq), length) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


class Collator:
    """Pads a step's batch to the accelerator's bucket for its longest sample."""

    def __init__(self, phase: int, pad_id: int, accelerator, max_len: int) -> None:
        self.phase, self.pad_id, self.accel, self.max_len = phase, pad_id, accelerator, max_len

    def _length(self, seqs: list[list[int]]) -> int:
        return self.accel.bucket_length(max(len(s) for s in seqs), maximum=self.max_len)

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if self.phase == 1:
            seqs = [b["input_ids"] for b in batch]
            ids, mask = pad_sequences(seqs, self.pad_id, self._length(seqs))
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        if self.phase == 2:
            seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
            ids, mask = pad_sequences(seqs, self.pad_id, self._length(seqs))
            return {"input_ids": ids, "attention_mask": mask}
        seqs = [b["prompt"] for b in batch]
        ids, mask = pad_sequences(seqs, self.pad_id, self._length(seqs), left=True)
        return {"prompt": ids, "prompt_att_mask": mask}
