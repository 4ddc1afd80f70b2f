"""Per-step datasets: disjoint seeded splits, batched tokenisation into a shared Arrow cache, collators.

Step 1 trains on prompt+chosen, step 2 on chosen/rejected pairs, step 3 on prompts only. Rows are
tokenised with `datasets.map(batched=True, num_proc=...)` into Arrow files keyed by everything that
changes them (the data files read, the split, the lengths, the tokenizer); rank 0 builds them once,
every rank memory-maps the same files. Token ids are stored unpadded; collators pad each batch to
`accel.bucket_length(...)`, the batch maximum on CPU/GPU and a static bucket on graph-compiling devices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dschat_hal.data.raw_datasets import RawDataset, get_raw_dataset, group_sources, source_files
from dschat_hal.data.tokens import Encoder, special_affixes
from dschat_hal.errors import UserError

log = logging.getLogger(__name__)
CACHE_VERSION = 3
COLUMNS = {1: ("input_ids",), 2: ("chosen", "rejected"), 3: ("prompt",)}


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
    """Samples, each a dict of token-id lists, over an Arrow table (memory-mapped) or a list."""

    def __init__(self, samples: Any) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.samples[int(index)]


# ---- tokenisation -------------------------------------------------------------------------------
def tokenize_batch(batch: dict[str, list], raw: RawDataset, encoder: Encoder, spec: DataSpec) -> dict[str, list]:
    """One `datasets.map` batch of raw rows to step `spec.phase`'s token columns."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if spec.phase == 1:
        return {"input_ids": encoder.sequences([raw.prompt_and_chosen(r) for r in rows], spec.max_seq_len)}
    if spec.phase == 2:
        return {
            "chosen": encoder.sequences([raw.prompt_and_chosen(r) for r in rows], spec.max_seq_len),
            "rejected": encoder.sequences([raw.prompt_and_rejected(r) for r in rows], spec.max_seq_len),
        }
    return {"prompt": encoder.prompts([raw.prompt(r) for r in rows])}


def _fits(prompts: list[list[int]], limit: int) -> list[bool]:
    return [len(ids) <= limit for ids in prompts]


def _differs(chosen: list[list[int]], rejected: list[list[int]]) -> list[bool]:
    return [c != r for c, r in zip(chosen, rejected, strict=True)]


class _Builder:
    """Tokenises row sets into Arrow files under `workdir` (in memory when None)."""

    def __init__(self, spec: DataSpec, tokenizer, workdir: Path | None, num_proc: int | None) -> None:
        self.spec, self.encoder, self.workdir, self.num_proc = spec, Encoder(tokenizer), workdir, num_proc
        self.count = 0

    def _file(self, tag: str) -> dict[str, Any]:
        self.count += 1
        if self.workdir is None:
            return {"keep_in_memory": True}
        return {"cache_file_name": str(self.workdir / f"{self.count:03d}_{tag}.arrow")}

    def tokenize(self, raw: RawDataset, rows) -> Any:
        """Step `spec.phase`'s token columns of `rows`."""
        import datasets

        features = datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in COLUMNS[self.spec.phase]})
        return rows.map(
            tokenize_batch,
            batched=True,
            num_proc=self._num_proc(rows),
            remove_columns=rows.column_names,
            features=features,
            fn_kwargs={"raw": raw, "encoder": self.encoder, "spec": self.spec},
            new_fingerprint=f"tok{self.count}",
            load_from_cache_file=False,
            desc=f"tokenising step {self.spec.phase} data",
            **self._file("tok"),
        )

    def drop_unusable(self, rows) -> tuple[Any, int]:
        """(rows, count dropped): step 2 drops pairs whose chosen and rejected tokens are identical
        (truncation cut off where they differ: they teach nothing), step 3 prompts over the limit."""
        if self.spec.phase == 1:
            return rows, 0
        if self.spec.phase == 2:
            keep, columns, kwargs = _differs, ["chosen", "rejected"], {}
        else:
            keep, columns, kwargs = _fits, "prompt", {"limit": self.spec.max_prompt_seq_len}
        kept = rows.filter(
            keep,
            batched=True,
            input_columns=columns,
            fn_kwargs=kwargs,
            num_proc=self._num_proc(rows),
            new_fingerprint=f"keep{self.count}",
            load_from_cache_file=False,
            **self._file("keep"),
        )
        return kept, len(rows) - len(kept)

    def _num_proc(self, rows) -> int | None:
        return self.num_proc if self.num_proc and self.num_proc > 1 and len(rows) >= 2 * self.num_proc else None


def _concatenate(parts: list) -> Any:
    import datasets

    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def build_datasets(
    spec: DataSpec,
    tokenizer,
    workdir: Path | None = None,
    num_proc: int | None = None,
    raw_cache_dir: str | None = None,
) -> tuple[Any, Any, dict[str, int]]:
    """Tokenised (train, eval) `datasets.Dataset`s of one step and the rows dropped from each
    (`Builder.drop_unusable`; eval pairs that are all identical are kept, to have something to measure)."""
    builder = _Builder(spec, tokenizer, workdir, num_proc)
    train, evaluation, dropped = [], [], {"train": 0, "eval": 0}
    for group in group_sources(spec.data_path):
        raw = get_raw_dataset(group, raw_cache_dir)
        for rows, out, split in ((raw.train, train, "train"), (raw.eval, evaluation, "eval")):
            picked = rows.select(phase_indices(len(rows), spec.data_split, spec.phase, spec.seed))
            samples = builder.tokenize(raw, picked if len(picked) or out is train else rows)
            kept, n_dropped = builder.drop_unusable(samples)
            if split == "eval" and spec.phase == 2 and not len(kept):
                kept, n_dropped = samples, 0
            out.append(kept)
            dropped[split] += n_dropped
    if spec.phase == 1:
        for group in group_sources(spec.sft_only_data_path):
            raw = get_raw_dataset(group, raw_cache_dir)
            train.append(builder.tokenize(raw, raw.train))
            evaluation.append(builder.tokenize(raw, raw.eval))
    train_set, eval_set = _concatenate(train), _concatenate(evaluation)
    if not len(train_set):
        if dropped["train"] and spec.phase == 2:
            raise UserError(
                f"every train pair is identical after truncation to --max_seq_len {spec.max_seq_len}; "
                "raise --max_seq_len"
            )
        if dropped["train"]:
            raise UserError(
                f"all {dropped['train']} step-3 prompts are longer than --max_prompt_seq_len "
                f"{spec.max_prompt_seq_len}; raise --max_prompt_seq_len or use shorter prompts"
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
    return train_set, eval_set, dropped


# ---- the cache ----------------------------------------------------------------------------------
def _file_fingerprint(name: str) -> str:
    stat = os.stat(name)
    return f"{Path(name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(spec: DataSpec, tokenizer) -> str:
    """A hash of the spec, the data files actually read (path, size, mtime) and the tokenizer."""
    sources = [group for path in (spec.data_path, spec.sft_only_data_path) for group in group_sources(path)]
    payload = {
        "version": CACHE_VERSION,
        "spec": asdict(spec),
        "files": [[_file_fingerprint(f) for f in source_files(group)] or group for group in sources],
        "tokenizer": [
            tokenizer.name_or_path,
            len(tokenizer),
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
            special_affixes(tokenizer),
            hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest(),
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir(output_dir: str | None) -> str:
    """Beside the run's output (`<output_dir>/../data_cache`, shared by the steps of one run), else
    the user's cache directory (`$XDG_CACHE_HOME/dschat_hal/data`)."""
    if output_dir:
        return str(Path(output_dir).expanduser().resolve().parent / "data_cache")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "dschat_hal" / "data")


def cache_dir_for(args) -> str | None:
    """`--data_output_path` resolved: '' disables the cache, unset means `default_cache_dir`."""
    if args.data_output_path == "":
        return None
    return args.data_output_path or default_cache_dir(getattr(args, "output_dir", None))


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_cache(spec: DataSpec, tokenizer, path: Path, num_proc: int | None) -> None:
    """Build into a temporary directory beside `path`, then rename it into place (atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        train, evaluation, dropped = build_datasets(
            spec, tokenizer, tmp / "work", num_proc, raw_cache_dir=str(path.parent / "raw")
        )
        train.save_to_disk(str(tmp / "train"))
        evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "meta.json").write_text(json.dumps({"dropped": dropped, "spec": asdict(spec)}))
        shutil.rmtree(tmp / "work", ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same key first: theirs is identical
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_build(
    spec: DataSpec, tokenizer, output_path: str | None, num_proc: int | None = None, _rebuilt: bool = False
) -> tuple[TokenDataset, TokenDataset, dict[str, int]]:
    """`build_datasets` (train, eval, rows dropped from each), cached under `output_path` by a hash of everything that changes the result.

    Rank 0 builds the Arrow cache (atomically); the other ranks wait, then all memory-map it.
    Without `output_path`, builds in memory.
    """
    if not output_path:
        train, evaluation, dropped = build_datasets(spec, tokenizer, None, num_proc)
        return TokenDataset(train), TokenDataset(evaluation), dropped
    import datasets

    path = Path(output_path).expanduser() / f"step{spec.phase}_{cache_key(spec, tokenizer)}"
    if _is_writer():
        if path.exists():
            log.info("step %d data: reusing the cache %s", spec.phase, path)
        else:
            log.info("step %d data: building the cache %s", spec.phase, path)
            _write_cache(spec, tokenizer, path, num_proc)
    _barrier()
    try:
        dropped = json.loads((path / "meta.json").read_text())["dropped"]
        train = datasets.load_from_disk(str(path / "train"))
        evaluation = datasets.load_from_disk(str(path / "eval"))
    except Exception as err:  # a damaged cache directory: rebuild it (rank 0; other ranks report it)
        if not _is_writer() or _rebuilt:
            raise
        log.warning("warning: data cache %s is unreadable (%s); rebuilding it", path, str(err).splitlines()[0][:120])
        shutil.rmtree(path, ignore_errors=True)
        if path.is_file():
            path.unlink()
        return load_or_build(spec, tokenizer, output_path, num_proc, _rebuilt=True)
    return TokenDataset(train), TokenDataset(evaluation), dropped


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
