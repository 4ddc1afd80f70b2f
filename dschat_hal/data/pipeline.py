"""Per-step datasets: disjoint seeded splits, batched tokenisation into a shared Arrow cache, collators.

Step 1 trains on prompt+chosen, step 2 on chosen/rejected pairs, step 3 on prompts only. Rows are
tokenised with `datasets.map(batched=True, num_proc=...)` into Arrow files keyed by everything that
changes them (the data files read, the split, the lengths, the tokenizer); rank 0 builds them once
(and the first rank of a node that cannot see them builds that node's), every rank memory-maps its
node's files. Token ids are stored unpadded; collators pad each batch to `accel.bucket_length(...)`,
the batch maximum on CPU/GPU and a static bucket on graph-compiling devices (step-3 prompts also
wherever the decode step is captured in a device graph).
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
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset

from dschat_hal.data.raw_datasets import RawDataset, as_text, get_raw_dataset, group_sources, source_files
from dschat_hal.data.tokens import Encoder, special_affixes
from dschat_hal.errors import UserError
from dschat_hal.faults import disk_full_is_one_line, fault_point, remove_stale_temporaries, temp_prefix

if TYPE_CHECKING:
    from dschat_hal.configs import DataConfig

log = logging.getLogger(__name__)
CACHE_VERSION = 6
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
    end_token: str = ""  # ends training sequences instead of EOS (a registered special token)
    prompt_format: str = "plain"  # or "chat_template" (`chat_format`)
    column_keys: dict[str, str] = field(default_factory=dict)  # role -> column (--prompt_key, ...)


def split_fractions(data_split: str) -> list[float]:
    """The shares of steps 1, 2, 3 as fractions; one line naming what is wrong otherwise."""
    import math

    try:
        parts = [float(p) for p in data_split.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3:
        raise UserError(f"--data_split {data_split!r} must be three comma-separated shares like 2,4,4 (steps 1, 2, 3)")
    if not all(math.isfinite(p) and p >= 0 for p in parts):
        raise UserError(f"--data_split {data_split!r}: each share must be a finite number >= 0 (e.g. 2,4,4)")
    if sum(parts) <= 0:
        raise UserError(
            f"--data_split {data_split!r} gives no step any data: the shares must not all be 0 (e.g. 2,4,4)"
        )
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
def tokenize_batch(
    batch: dict[str, list], raw: RawDataset, encoder: Encoder, spec: DataSpec, drop: bool = True
) -> dict[str, list]:
    """One `datasets.map` batch of raw rows to step `spec.phase`'s token columns. With `drop`, rows
    that cannot train leave here (the batch comes back shorter): step 1 sequences of one token
    (empty text: no next token to learn), step 2 pairs whose chosen and rejected tokens are
    identical (truncation cut off where they differ), step 3 prompts that are empty or over
    `max_prompt_seq_len`."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    if spec.phase == 1:
        texts = [encoder.join(raw.prompt(r), raw.chosen(r)) for r in rows]
        sequences = encoder.sequences(texts, spec.max_seq_len)
        return {"input_ids": [ids for ids in sequences if len(ids) > 1 or not drop]}
    if spec.phase == 2:
        chosen = encoder.sequences([encoder.join(raw.prompt(r), raw.chosen(r)) for r in rows], spec.max_seq_len)
        rejected = encoder.sequences([encoder.join(raw.prompt(r), raw.rejected(r)) for r in rows], spec.max_seq_len)
        pairs = [(c, r) for c, r in zip(chosen, rejected, strict=True) if c != r or not drop]
        return {"chosen": [c for c, _ in pairs], "rejected": [r for _, r in pairs]}
    prompts = encoder.prompts([raw.prompt(r) for r in rows])
    return {"prompt": [ids for ids in prompts if 0 < len(ids) <= spec.max_prompt_seq_len or not drop]}


def features(phase: int):
    import datasets

    return datasets.Features({c: datasets.Sequence(datasets.Value("int32")) for c in COLUMNS[phase]})


def empty_dataset(phase: int):
    import datasets

    return datasets.Dataset.from_dict({c: [] for c in COLUMNS[phase]}, features=features(phase))


class _Builder:
    """Tokenises row sets into Arrow files under `workdir` (in memory when None)."""

    def __init__(self, spec: DataSpec, tokenizer, workdir: Path | None, num_proc: int | None) -> None:
        self.spec, self.workdir, self.num_proc = spec, workdir, num_proc
        self.tokenizer = tokenizer
        self.encoder = Encoder(tokenizer, spec.end_token, spec.prompt_format)
        self.chat_encoder = self.encoder if spec.prompt_format == "chat_template" else None
        self.count = 0

    def encoder_for(self, raw: RawDataset) -> Encoder:
        """The encoder of `raw`'s rows: conversations are always rendered with the chat template (as TRL does)."""
        if not raw.conversational:
            return self.encoder
        if self.chat_encoder is None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise UserError(
                    f"{raw.name} holds conversations (lists of role/content messages), which are rendered with "
                    f"the tokenizer's chat template, and the tokenizer of {self.tokenizer.name_or_path!r} has none; "
                    "use a model whose tokenizer has one (chat_template in its tokenizer_config.json) or give the "
                    "data as text columns (prompt/chosen/rejected)"
                )
            self.chat_encoder = Encoder(self.tokenizer, self.spec.end_token, "chat_template")
        return self.chat_encoder

    def tokenize(self, raw: RawDataset, rows, drop: bool = True) -> tuple[Any, int]:
        """(step `spec.phase`'s token columns of `rows`, count of rows dropped: see `tokenize_batch`)."""
        self.count += 1
        if self.spec.phase == 2 and not raw.has_rejected:
            raise UserError(
                f"{raw.name} has no rejected answers (columns {', '.join(rows.column_names)}), and step 2 "
                "trains on chosen/rejected pairs; map the rejected column with --rejected_key COLUMN, or train "
                "step 1 on this data (--sft_only_data_path, or --data_split 10,0,0)"
            )
        if not len(rows):
            return empty_dataset(self.spec.phase), 0
        num_proc = self.num_proc if self.num_proc and self.num_proc > 1 and len(rows) >= 2 * self.num_proc else None
        where = {"keep_in_memory": True}
        if self.workdir is not None:
            where = {"cache_file_name": str(self.workdir / f"{self.count:03d}.arrow")}
        out = rows.map(
            tokenize_batch,
            batched=True,
            num_proc=num_proc,
            remove_columns=rows.column_names,
            features=features(self.spec.phase),
            fn_kwargs={"raw": raw, "encoder": self.encoder_for(raw), "spec": self.spec, "drop": drop},
            new_fingerprint=f"tok{self.count}",
            load_from_cache_file=False,
            desc=f"tokenising step {self.spec.phase} data",
            **where,
        )
        if not len(out):  # `map` hands back a view of its input when nothing is left
            return empty_dataset(self.spec.phase), len(rows)
        return out, len(rows) - len(out)


def _concatenate(parts: list, phase: int) -> Any:
    import datasets

    parts = [part for part in parts if len(part)]
    if not parts:
        return empty_dataset(phase)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def build_parts(
    spec: DataSpec,
    tokenizer,
    workdir: Path | None = None,
    num_proc: int | None = None,
    raw_cache_dir: str | None = None,
) -> tuple[list, list, dict[str, int]]:
    """One step's tokenised train and eval parts (a `datasets.Dataset` per source, each its own
    Arrow file(s) under `workdir`), and the rows dropped from each split (`tokenize_batch`; eval
    pairs that are all identical are kept, to have something to measure)."""
    builder = _Builder(spec, tokenizer, workdir, num_proc)
    train, evaluation, dropped = [], [], {"train": 0, "eval": 0}
    train_rows: list[tuple[RawDataset, Any]] = []
    for group in group_sources(spec.data_path):
        raw = get_raw_dataset(group, raw_cache_dir, spec.column_keys)
        for rows, out, split in ((raw.train, train, "train"), (raw.eval, evaluation, "eval")):
            picked = rows.select(phase_indices(len(rows), spec.data_split, spec.phase, spec.seed))
            picked = picked if len(picked) or out is train else rows
            if out is train:
                train_rows.append((raw, picked))
            samples, n_dropped = builder.tokenize(raw, picked)
            if split == "eval" and spec.phase == 2 and n_dropped and not len(samples):
                samples, n_dropped = builder.tokenize(raw, picked, drop=False)
            out.append(samples)
            dropped[split] += n_dropped
    if spec.phase == 1:
        for group in group_sources(spec.sft_only_data_path):
            raw = get_raw_dataset(group, raw_cache_dir, spec.column_keys)
            train.append(builder.tokenize(raw, raw.train)[0])
            evaluation.append(builder.tokenize(raw, raw.eval)[0])
    if not sum(len(part) for part in train):
        _raise_for_empty_text(spec, train_rows)
        _raise_for_no_train_rows(spec, dropped["train"])
    return train, evaluation, dropped


PHASE_TEXT = {1: ("prompt + chosen", "prompt_and_chosen"), 3: ("prompt", "prompt")}


def _raise_for_empty_text(spec: DataSpec, train_rows: list[tuple[RawDataset, Any]], sample: int = 2000) -> None:
    """One line when the step's rows hold no text (empty strings), e.g. a file of "" values (error path
    only; looks at the first `sample` rows of each source)."""
    checked, empty, where = 0, 0, []
    for raw, rows in train_rows:
        head = [rows[i] for i in range(min(len(rows), sample))]
        if spec.phase == 2:
            texts = [as_text(raw.prompt_and_chosen(r)) + as_text(raw.prompt_and_rejected(r)) for r in head]
            same = [raw.chosen(r) == raw.rejected(r) for r in head]
            if head and all(same):
                kind = "empty" if not any(t.strip() for t in texts) else "the same text"
                raise UserError(
                    f"{raw.name}: every train pair's chosen and rejected answers are {kind}, so there is no "
                    "preference to learn; fill the rows with two different answers"
                )
            continue
        label, accessor = PHASE_TEXT[spec.phase]
        texts = [as_text(getattr(raw, accessor)(r)) for r in head]
        checked += len(texts)
        empty += sum(not t.strip() for t in texts)
        where.append(raw.name)
    if checked and empty == checked:
        raise UserError(
            f"{', '.join(where)}: every train row's {label} is empty text, so step {spec.phase} has nothing to "
            "train on; fill the rows' strings (or fix the column names)"
        )


def _raise_for_no_train_rows(spec: DataSpec, dropped: int) -> None:
    if dropped and spec.phase == 1:
        raise UserError(
            f"every step-1 sequence is a single token at --max_seq_len {spec.max_seq_len}, with no next token "
            "to learn; raise --max_seq_len"
        )
    if dropped and spec.phase == 2:
        raise UserError(
            f"every train pair is identical after truncation to --max_seq_len {spec.max_seq_len}; raise --max_seq_len"
        )
    if dropped:
        raise UserError(
            f"all {dropped} step-3 prompts are longer than --max_prompt_seq_len {spec.max_prompt_seq_len}; "
            "raise --max_prompt_seq_len or use shorter prompts"
        )
    sizes = {name: len(get_raw_dataset(name, keys=spec.column_keys).train) for name in spec.data_path}
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


def build_datasets(spec: DataSpec, tokenizer, num_proc: int | None = None) -> tuple[Any, Any, dict[str, int]]:
    """Tokenised (train, eval) `datasets.Dataset`s of one step, in memory, and the rows dropped from each."""
    train, evaluation, dropped = build_parts(spec, tokenizer, None, num_proc)
    return _concatenate(train, spec.phase), _concatenate(evaluation, spec.phase), dropped


# ---- the cache ----------------------------------------------------------------------------------
def _file_fingerprint(name: str) -> str:
    stat = os.stat(name)
    return f"{Path(name).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def cache_key(spec: DataSpec, tokenizer) -> str:
    """A hash of the spec, the data files actually read (path, size, mtime) and the tokenizer."""
    sources = [group for path in (spec.data_path, spec.sft_only_data_path) for group in group_sources(path)]
    payload = {
        "version": CACHE_VERSION,
        "spec": {
            k: v for k, v in asdict(spec).items() if (k, v) not in (("prompt_format", "plain"), ("column_keys", {}))
        },
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
    if spec.prompt_format != "plain" or getattr(tokenizer, "chat_template", None):  # conversations use it
        payload["chat_template"] = tokenizer.chat_template
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir(output_dir: str | None) -> str:
    """Beside the run's output (`<output_dir>/../data_cache`, shared by the steps of one run), else
    the user's cache directory (`$XDG_CACHE_HOME/dschat_hal/data`)."""
    if output_dir:
        return str(Path(output_dir).expanduser().resolve().parent / "data_cache")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "dschat_hal" / "data")


def cache_dir_for(data: DataConfig, output_dir: str | None) -> str | None:
    """`--data_output_path` resolved: '' disables the cache, unset means `default_cache_dir` (beside
    the run's `output_dir`)."""
    if data.data_output_path == "":
        return None
    return data.data_output_path or default_cache_dir(output_dir)


def _ranks() -> tuple[int, int]:
    """(global rank, rank within its node) of this process; (0, 0) outside torch.distributed. The
    node rank is the launcher's LOCAL_RANK (torchrun, deepspeed, DeepSpeed's MPI discovery), the
    global rank when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 0
    rank = dist.get_rank()
    return rank, int(os.environ.get("LOCAL_RANK", rank))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _move_files(parts: list, directory: Path) -> list[str]:
    """Move the Arrow files behind `parts` into `directory` as 00000.arrow, ... in data order (each
    part is what one `map` wrote: its own files, no indices mapping); their names."""
    directory.mkdir()
    names: list[str] = []
    for part in parts:
        if not len(part):
            continue
        assert part._indices is None, "a tokenised part is the Arrow files its map wrote"
        for cache in part.cache_files:
            names.append(f"{len(names):05d}.arrow")
            os.replace(cache["filename"], directory / names[-1])
    return names


def _write_cache(spec: DataSpec, tokenizer, path: Path, num_proc: int | None) -> None:
    """Tokenise into a temporary directory beside `path`, then rename it into place (atomic). The
    Arrow files `map` writes are the cache itself: nothing is copied."""
    import pyarrow as pa

    # Arrow's default allocator (mimalloc) keeps freed blocks for reuse: ~15 MB more at the peak of
    # reading 158 MB of JSON. After preparing, this process only memory-maps Arrow files.
    pa.set_memory_pool(pa.system_memory_pool())
    with disk_full_is_one_line(
        path.parent, "the data cache", "and the data files are fine (run with --data_output_path '' to skip the cache)"
    ):
        _build_cache(spec, tokenizer, path, num_proc)


def _build_cache(spec: DataSpec, tokenizer, path: Path, num_proc: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)  # builds killed by a signal (SIGTERM skips the cleanup below)
    remove_stale_temporaries(path.parent / "raw" / "json_lines")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    try:
        fault_point("data_cache_building")
        train, evaluation, dropped = build_parts(
            spec, tokenizer, tmp / "work", num_proc, raw_cache_dir=str(path.parent / "raw")
        )
        meta = {
            "dropped": dropped,
            "spec": asdict(spec),
            "rows": {"train": sum(map(len, train)), "eval": sum(map(len, evaluation))},
            "files": {"train": _move_files(train, tmp / "train"), "eval": _move_files(evaluation, tmp / "eval")},
        }
        del train, evaluation
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(tmp / "work", ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same key first: theirs is identical
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(path: Path, phase: int) -> tuple[Any, Any, dict[str, int]]:
    """(train, eval, dropped) memory-mapped from a cache directory; raises if it is damaged."""
    import datasets

    meta = json.loads((path / "meta.json").read_text())
    splits = []
    for split in ("train", "eval"):
        parts = [datasets.Dataset.from_file(str(path / split / name)) for name in meta["files"][split]]
        dataset = _concatenate(parts, phase)
        if len(dataset) != meta["rows"][split]:
            raise ValueError(f"{split} holds {len(dataset)} rows, its meta.json says {meta['rows'][split]}")
        splits.append(dataset)
    return splits[0], splits[1], meta["dropped"]


def load_or_build(
    spec: DataSpec, tokenizer, output_path: str | None, num_proc: int | None = None
) -> tuple[TokenDataset, TokenDataset, dict[str, int]]:
    """(train, eval, rows dropped from each) of one step, cached under `output_path` by a hash of
    everything that changes them.

    Rank 0 builds the Arrow cache (atomically), or checks the one it finds and rebuilds it if it is
    damaged; then the first rank of every other node does the same, which reuses rank 0's cache on
    storage the nodes share and builds the node's own on a node-local disk (once per node, as
    upstream). The other ranks wait, then memory-map their node's files. Without `output_path`,
    builds in memory.
    """
    if not output_path:
        train, evaluation, dropped = build_datasets(spec, tokenizer, num_proc)
        return TokenDataset(train), TokenDataset(evaluation), dropped
    path = Path(output_path).expanduser() / f"step{spec.phase}_{cache_key(spec, tokenizer)}"
    rank, local_rank = _ranks()
    found = _reuse_or_build(spec, tokenizer, path, num_proc) if rank == 0 else None
    _barrier()
    if rank != 0 and local_rank == 0:
        if not path.exists():
            log.info(
                "rank %d: the data cache %s is not on this node's disk; building it here",
                rank,
                path,
                extra={"all_ranks": True},
            )
        found = _reuse_or_build(spec, tokenizer, path, num_proc)
    _barrier()
    if found is None and not (path / "meta.json").exists():
        raise UserError(
            f"rank {rank} cannot see the data cache {path} (its node's first rank did not build it: LOCAL_RANK "
            f"is {os.environ.get('LOCAL_RANK', 'unset')}); launch with torchrun or deepspeed, which set "
            "LOCAL_RANK per node, or put --data_output_path on storage all nodes share"
        )
    train, evaluation, dropped = found or _read_cache(path, spec.phase)
    return TokenDataset(train), TokenDataset(evaluation), dropped


def _reuse_or_build(spec: DataSpec, tokenizer, path: Path, num_proc: int | None) -> tuple | None:
    """Rank 0 (and each other node's first rank): the cache at `path` read back when it is readable (None after (re)building it)."""
    if path.exists():
        try:
            found = _read_cache(path, spec.phase)
            log.info("step %d data: reusing the cache %s", spec.phase, path)
            return found
        except Exception as err:  # a damaged cache directory: rebuild it before the others read it
            first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            log.warning("warning: data cache %s is unreadable (%s); rebuilding it", path, first)
            shutil.rmtree(path, ignore_errors=True)
            if path.is_file():
                path.unlink()
    log.info("step %d data: building the cache %s", spec.phase, path)
    _write_cache(spec, tokenizer, path, num_proc)
    return None


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
        # step-3 prompts feed generation: static there whenever the decode step is captured
        static = self.accel.static_generation_shapes if self.phase == 3 else None
        return self.accel.bucket_length(max(len(s) for s in seqs), maximum=self.max_len, static=static)

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
