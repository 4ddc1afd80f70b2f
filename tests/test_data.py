"""Datasets: loading, disjoint splits, caching, collators and bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

import accel
from dschat_hal.data import Collator, DataSpec, get_raw_dataset, load_or_build, pad_sequences, phase_indices
from dschat_hal.data.pipeline import cache_key
from dschat_hal.errors import UserError
from dschat_hal.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-opt")


def write_rows(directory, rows, name="train.json"):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(json.dumps(rows))
    return directory


ROWS = [{"prompt": f"Human: q{i} Assistant:", "chosen": f" yes {i}", "rejected": " no"} for i in range(40)]


def test_bundled_dataset_is_in_human_assistant_form():
    raw = get_raw_dataset("local/jsonfile")
    assert len(raw.train) + len(raw.eval) >= 300
    row = raw.train[0]
    assert raw.prompt(row).startswith("Human: ") and raw.prompt(row).endswith("Assistant:")
    assert raw.prompt_and_chosen(row) == raw.prompt(row) + raw.chosen(row)


def test_phase_slices_are_disjoint_and_cover_everything():
    slices = [set(phase_indices(100, "2,4,4", phase, seed=7)) for phase in (1, 2, 3)]
    assert [len(s) for s in slices] == [20, 40, 40]
    assert not (slices[0] & slices[1] or slices[1] & slices[2] or slices[0] & slices[2])
    assert set().union(*slices) == set(range(100))
    assert phase_indices(100, "2,4,4", 1, seed=7) == phase_indices(100, "2,4,4", 1, seed=7)


def test_local_directory_and_jsonl_file(tmp_path, tokenizer):
    directory = write_rows(tmp_path / "d", ROWS)
    raw = get_raw_dataset(str(directory))
    assert len(raw.train) + len(raw.eval) == 40
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert len(get_raw_dataset(str(jsonl)).train) == 36


def test_malformed_json_and_missing_keys_name_the_file_and_row(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text('[{"prompt": "a", "chosen": "b"')
    with pytest.raises(UserError, match=r"train.json is not valid JSON \(line 1"):
        get_raw_dataset(str(bad))
    write_rows(tmp_path / "missing", [ROWS[0], {"prompt": "x", "chosen": "y"}])
    with pytest.raises(UserError, match=r"row 1 has no string 'rejected'"):
        get_raw_dataset(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="neither a known dataset"):
        get_raw_dataset("no/such-dataset")


def test_step_datasets_and_collators(tokenizer):
    backend = accel.get("cpu")
    sft, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1, max_seq_len=32), tokenizer, None)
    batch = Collator(1, tokenizer.pad_token_id, backend, 32)([sft[0], sft[1]])
    assert batch["input_ids"].shape[1] <= 32
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    pairs, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=2, max_seq_len=64), tokenizer, None)
    batch = Collator(2, tokenizer.pad_token_id, backend, 64)([pairs[0], pairs[1]])
    assert batch["input_ids"].shape[0] == 4  # chosen then rejected
    prompts, _, dropped = load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=64), tokenizer, None)
    assert dropped == 0
    batch = Collator(3, tokenizer.pad_token_id, backend, 64)([prompts[0], prompts[1]])
    assert (batch["prompt_att_mask"][:, -1] == 1).all()  # left padded: every prompt ends at the right edge


def test_long_prompts_are_dropped_and_counted(tokenizer):
    _, _, dropped = load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=12), tokenizer, None)
    assert dropped > 0
    with pytest.raises(UserError, match="longer than --max_prompt_seq_len 2"):
        load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=2), tokenizer, None)


def test_empty_split_is_a_clear_error(tokenizer):
    with pytest.raises(UserError, match="step 2 gets no training rows from --data_split 10,0,0"):
        load_or_build(DataSpec(["local/jsonfile"], data_split="10,0,0", phase=2), tokenizer, None)
    with pytest.raises(UserError, match="three non-negative numbers"):
        phase_indices(10, "1,2", 1, 0)


def test_cache_is_reused_and_rebuilt_when_inputs_change(tmp_path, tokenizer):
    directory = write_rows(tmp_path / "d", ROWS)
    spec = DataSpec([str(directory)], phase=1, max_seq_len=32)
    cache = tmp_path / "cache"
    load_or_build(spec, tokenizer, str(cache))
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1
    load_or_build(spec, tokenizer, str(cache))
    assert sorted(cache.glob("*.pt")) == files  # reused
    key = cache_key(spec, tokenizer)
    spec.max_seq_len = 16
    assert cache_key(spec, tokenizer) != key
    spec.max_seq_len = 32
    write_rows(directory, ROWS[:30])  # the data changed on disk
    assert cache_key(spec, tokenizer) != key
    train, _, _ = load_or_build(spec, tokenizer, str(cache))
    assert len(sorted(cache.glob("*.pt"))) == 2 and len(train) < 10


def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[5, 6], [7]], pad_id=0, length=3)
    assert ids.tolist() == [[5, 6, 0], [7, 0, 0]] and mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6], [7]], pad_id=0, length=3, left=True)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7]] and mask.sum().item() == 3
    assert ids.dtype == torch.long
