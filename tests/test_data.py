"""Datasets: loading, disjoint splits, caching, collators and bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import accel
from dschat_hal.data import Collator, DataSpec, get_raw_dataset, load_or_build, pad_sequences, phase_indices
from dschat_hal.data.pipeline import cache_dir_for, cache_key
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


def test_malformed_json_and_missing_keys_name_the_file_and_column(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text('[{"prompt": "a", "chosen": "b"')
    with pytest.raises(UserError, match=r"train.json is not valid JSON \(line 1"):
        get_raw_dataset(str(bad))
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(UserError, match=r"rows.jsonl is not valid JSON \(line 2"):
        get_raw_dataset(str(tmp_path / "rows.jsonl"))
    write_rows(tmp_path / "missing", [{"prompt": "x", "chosen": "y", "answer": "z"}])
    assert not get_raw_dataset(str(tmp_path / "missing")).has_rejected  # step-1 data; step 2 refuses it (issue 30)
    write_rows(tmp_path / "unread", [{"question": "x", "answer": "z"}])
    with pytest.raises(UserError, match=r"has columns question, answer, none of which this project reads; map them"):
        get_raw_dataset(str(tmp_path / "unread"))
    write_rows(tmp_path / "nulls", [ROWS[0], {"prompt": "x", "chosen": "y", "rejected": None}])
    with pytest.raises(UserError, match=r"row 1 has no string 'rejected' \(1 such rows\)"):
        get_raw_dataset(str(tmp_path / "nulls"))
    with pytest.raises(UserError, match="neither a known dataset"):
        get_raw_dataset("no/such-dataset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is empty; put train/test files"):
        get_raw_dataset(str(tmp_path / "empty"))


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
    assert dropped == {"train": 0, "eval": 0}
    batch = Collator(3, tokenizer.pad_token_id, backend, 64)([prompts[0], prompts[1]])
    assert (batch["prompt_att_mask"][:, -1] == 1).all()  # left padded: every prompt ends at the right edge


def test_step2_pairs_end_with_the_registered_eot_token_as_upstream():
    from dschat_hal.models import load_tokenizer
    from dschat_hal.models.lm import add_eot_token

    tokenizer = add_eot_token(load_tokenizer("tiny-opt"), "<|eot|>")
    (eot,) = tokenizer("<|eot|>", add_special_tokens=False)["input_ids"]
    pairs, _, _ = load_or_build(
        DataSpec(["local/jsonfile"], phase=2, max_seq_len=16, end_token="<|eot|>"), tokenizer, None
    )
    assert all(pairs[i]["chosen"][-1] == eot == pairs[i]["rejected"][-1] for i in range(len(pairs)))
    assert all(len(pairs[i]["chosen"]) <= 16 for i in range(len(pairs)))  # kept when truncated
    sft, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1, max_seq_len=16), tokenizer, None)
    assert sft[0]["input_ids"][-1] == tokenizer.eos_token_id  # step 1 ends in EOS, as upstream's


def test_long_prompts_are_dropped_and_counted(tokenizer):
    _, _, dropped = load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=12), tokenizer, None)
    assert dropped["train"] > 0
    with pytest.raises(UserError, match="longer than --max_prompt_seq_len 2"):
        load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=2), tokenizer, None)


def test_empty_split_is_a_clear_error(tokenizer):
    with pytest.raises(UserError, match="step 2 gets no training rows from --data_split 10,0,0"):
        load_or_build(DataSpec(["local/jsonfile"], data_split="10,0,0", phase=2), tokenizer, None)
    with pytest.raises(UserError, match="must be three comma-separated shares"):
        phase_indices(10, "1,2", 1, 0)


def test_cache_is_reused_and_rebuilt_when_inputs_change(tmp_path, tokenizer):
    directory = write_rows(tmp_path / "d", ROWS)
    spec = DataSpec([str(directory)], phase=1, max_seq_len=32)
    cache = tmp_path / "cache"
    first, _, _ = load_or_build(spec, tokenizer, str(cache))
    entries = sorted(cache.glob("step1_*"))
    assert len(entries) == 1 and (entries[0] / "train").is_dir()
    again, _, _ = load_or_build(spec, tokenizer, str(cache))
    assert sorted(cache.glob("step1_*")) == entries  # reused
    assert [again[i] for i in range(len(again))] == [first[i] for i in range(len(first))]
    key = cache_key(spec, tokenizer)
    (directory / "notes.txt").write_text("a log or README beside the data")  # not read: same key
    (directory / "run.log").write_text("more")
    assert cache_key(spec, tokenizer) == key
    spec.max_seq_len = 16
    assert cache_key(spec, tokenizer) != key
    spec.max_seq_len = 32
    write_rows(directory, ROWS[:30])  # the data changed on disk
    assert cache_key(spec, tokenizer) != key
    train, _, _ = load_or_build(spec, tokenizer, str(cache))
    assert len(sorted(cache.glob("step1_*"))) == 2 and len(train) < 10


def test_cache_directory_default_sits_beside_the_output(tmp_path, monkeypatch):
    from dschat_hal.configs import DataConfig

    assert cache_dir_for(DataConfig(data_output_path=""), None) is None
    assert cache_dir_for(DataConfig(data_output_path="/x/c"), "/y") == "/x/c"
    out = tmp_path / "run" / "actor"
    assert cache_dir_for(DataConfig(data_output_path=None), str(out)) == str(tmp_path / "run" / "data_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_for(DataConfig(data_output_path=None), None) == str(tmp_path / "xdg/dschat_hal/data")


def test_pad_sequences_left_and_right():
    ids, mask = pad_sequences([[5, 6], [7]], pad_id=0, length=3)
    assert ids.tolist() == [[5, 6, 0], [7, 0, 0]] and mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    ids, mask = pad_sequences([[5, 6], [7]], pad_id=0, length=3, left=True)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7]] and mask.sum().item() == 3
    assert ids.dtype == torch.long


# ---- the layouts users have ---------------------------------------------------------------------
def bundled_rows() -> tuple[list[dict], list[dict]]:
    from dschat_hal.models.tiny import DATA_DIR

    return json.loads((DATA_DIR / "train.json").read_text()), json.loads((DATA_DIR / "eval.json").read_text())


def write_table(path, rows) -> None:
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, path)
    elif path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))


def test_local_layouts_load_train_and_the_test_split_for_eval(tmp_path):
    import datasets

    train, test = bundled_rows()
    half = len(train) // 2
    snapshot = tmp_path / "snapshot"  # what `huggingface-cli download --repo-type dataset` leaves
    write_table(snapshot / "data" / "train-00000-of-00001.parquet", train)
    write_table(snapshot / "data" / "test-00000-of-00001.parquet", test)
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    layouts = {
        "snapshot root": [snapshot],
        "snapshot data/": [snapshot / "data"],
        "files together": [
            snapshot / "data" / "train-00000-of-00001.parquet",
            snapshot / "data" / "test-00000-of-00001.parquet",
        ],
    }
    for suffix in (".jsonl", ".json", ".csv", ".arrow"):
        shards = tmp_path / f"shards{suffix}"
        write_table(shards / f"train-00000-of-00002{suffix}", train[:half])
        write_table(shards / f"train-00001-of-00002{suffix}", train[half:])
        write_table(shards / f"validation{suffix}", test)
        layouts[f"sharded {suffix}"] = [shards]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    layouts["save_to_disk DatasetDict"] = [tmp_path / "saved_dict"]
    legacy = write_rows(write_rows(tmp_path / "legacy", train), test, name="eval.json")
    layouts["train.json + eval.json"] = [legacy]
    for layout, paths in layouts.items():
        raw = get_raw_dataset([str(p) for p in paths], cache_dir=str(tmp_path / "hf"))
        assert (len(raw.train), len(raw.eval)) == (len(train), len(test)), layout
        assert sorted(raw.prompt(r) for r in raw.eval) == sorted(r["prompt"] for r in test), layout
        assert raw.files and all(Path(f).exists() for f in raw.files), layout
    datasets.Dataset.from_list(train).save_to_disk(str(tmp_path / "saved_one"))
    raw = get_raw_dataset(str(tmp_path / "saved_one"))  # no test split: a tenth of train, fixed
    assert len(raw.train) + len(raw.eval) == len(train) and len(raw.eval) == len(train) // 10


def test_a_dataset_card_configs_name_the_files_and_splits(tmp_path, caplog):
    """A snapshot whose README.md YAML says which files are which split (file names say nothing)."""
    train, test = bundled_rows()
    snapshot = tmp_path / "card"
    write_table(snapshot / "prefs" / "part-a.parquet", train)
    write_table(snapshot / "prefs" / "part-b.parquet", test)
    write_table(snapshot / "other" / "train.parquet", test[:3])  # a second config, not the default
    card = (
        "---\nconfigs:\n- config_name: small\n  data_files: other/*.parquet\n"
        "- config_name: default\n  data_files:\n  - split: train\n    path: prefs/part-a.parquet\n"
        "  - split: test\n    path: prefs/part-b.parquet\n---\n# card\n"
    )
    (snapshot / "README.md").write_text(card)
    raw = get_raw_dataset(str(snapshot), cache_dir=str(tmp_path / "hf"))
    assert (len(raw.train), len(raw.eval)) == (len(train), len(test))
    assert sorted(Path(f).name for f in raw.files) == ["part-a.parquet", "part-b.parquet"]
    (snapshot / "README.md").write_text("---\nconfigs: [unclosed\n---\n")  # a card that does not parse
    with caplog.at_level("WARNING"):
        raw = get_raw_dataset(str(snapshot), cache_dir=str(tmp_path / "hf"))
    assert "ignoring the dataset card" in caplog.text
    assert len(raw.train) + len(raw.eval) == 3  # as `datasets` resolves it without a card: other/train.parquet


def test_files_of_one_folder_form_one_dataset_in_a_step(tmp_path, tokenizer):
    train, test = bundled_rows()
    write_table(tmp_path / "d" / "train.parquet", train)
    write_table(tmp_path / "d" / "test.parquet", test)
    spec = DataSpec([str(tmp_path / "d" / "train.parquet"), str(tmp_path / "d" / "test.parquet")], phase=2)
    pairs, evaluation, _ = load_or_build(spec, tokenizer, str(tmp_path / "cache"))
    assert len(pairs) == len(phase_indices(len(train), "2,4,4", 2, spec.seed))
    assert len(evaluation) == len(phase_indices(len(test), "2,4,4", 2, spec.seed))


def test_other_registered_schemas_load_locally_and_hub_names_go_the_same_way(tmp_path, monkeypatch):
    import datasets

    rows = [
        {"question": {"full_text": f"q{i}"}, "answer_0": "good [1]", "answer_1": "bad", "score_0": 1.0, "score_1": -1.0}
        for i in range(20)
    ]
    write_table(tmp_path / "webgpt" / "train.jsonl", rows)
    raw = get_raw_dataset(str(tmp_path / "webgpt"))
    assert type(raw).__name__ == "WebGptComparisons"
    assert raw.prompt(raw.train[0]).startswith(" Human: q") and raw.chosen(raw.train[0]) == " good"
    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        shp = [{"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}] * 10
        return datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(shp), "validation": datasets.Dataset.from_list(shp[:3])}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = get_raw_dataset("stanfordnlp/SHP")
    assert calls == ["stanfordnlp/SHP"] and (len(raw.train), len(raw.eval)) == (10, 3)
    assert raw.chosen(raw.train[0]) == " a" and raw.files == ()
    with pytest.raises(UserError, match="needs history, human_ref_A, human_ref_B, labels"):
        monkeypatch.setattr(
            datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
        )
        get_raw_dataset("stanfordnlp/SHP")


# ---- the tokenizer's own special tokens (BOS) ---------------------------------------------------
def tokenizer_with(template: str):
    """The tiny tokenizer whose defaults add BOS (`<s> $A`, like Llama) or BOS and EOS (`<s> $A </s>`)."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer("tiny-opt")
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=template, special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    return tok


def test_sequences_start_with_the_tokenizers_bos_everywhere(tmp_path):
    from dschat_hal.data.tokens import Encoder
    from dschat_hal.data.unsupervised import block_dataset
    from training.chat import answer

    for template in ("<s> $A", "<s> $A </s>"):
        tok = tokenizer_with(template)
        bos, eos = tok.bos_token_id, tok.eos_token_id
        assert tok("Human: hi")["input_ids"][0] == bos
        sft, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1, max_seq_len=512), tok, None)
        short, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1, max_seq_len=8), tok, None)
        pairs, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=2, max_seq_len=512), tok, None)
        prompts, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=512), tok, None)
        for ids in (sft[0]["input_ids"], pairs[0]["chosen"], pairs[0]["rejected"]):
            assert ids[0] == bos and ids[-1] == eos and eos not in ids[1:-1]
        assert len(short[0]["input_ids"]) == 8 and short[0]["input_ids"][0] == bos and short[0]["input_ids"][-1] == eos
        prompt = prompts[0]["prompt"]
        assert prompt[0] == bos and prompt[-1] != eos  # a prompt ends where its text ends
        assert Encoder(tok).prompts(["Human: hi Assistant:"])[0] == [
            bos,
            *tok("Human: hi Assistant:", add_special_tokens=False)["input_ids"],
        ]
        texts = ["one two three four five six", "seven eight nine ten"]
        blocks = block_dataset(texts, tok, 4)
        flat = [i for b in blocks for i in b["input_ids"]]
        bare = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        assert flat == ([bos, *bare[0], eos, bos, *bare[1], eos])[: len(flat)]
        seen = []

        class Recorder(torch.nn.Module):  # stands in for the model: records what chat feeds generate
            def generate(self, input_ids, attention_mask, seen=seen, end=eos, **kwargs):
                seen.append(input_ids[0].tolist())
                return torch.cat([input_ids, torch.tensor([[end]])], dim=1)

        answer(Recorder(), tok, accel.get("cpu"), " Human: hi Assistant:", 4, True)
        assert seen == [[bos, *tok(" Human: hi Assistant:", add_special_tokens=False)["input_ids"]]]
    plain = load_tokenizer("tiny-opt")  # the bundled tokenizer adds nothing: unchanged encoding
    sft, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1, max_seq_len=512), plain, None)
    assert sft[0]["input_ids"][0] != plain.bos_token_id


def test_json_arrays_stream_to_json_lines_with_the_same_rows(tmp_path, monkeypatch):
    from dschat_hal.data import json_array

    monkeypatch.setattr(json_array, "CHUNK", 7)  # objects straddle every read
    rows = [
        {"prompt": 'a ]}{ [\n\t"' + str(i) + '" \u00e9', "chosen": "x,\r\ny", "rejected": "", "n": i} for i in range(25)
    ]
    source = tmp_path / "rows.json"
    source.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    assert json_array.is_json_array(source)
    assert json_array.array_to_lines(source, tmp_path / "rows.jsonl")
    lines = (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    (tmp_path / "numbers.json").write_text("[1, 2]")
    assert not json_array.array_to_lines(tmp_path / "numbers.json", tmp_path / "numbers.jsonl")
    assert not (tmp_path / "numbers.jsonl").exists()


def test_two_ranks_share_one_cache_and_wait_while_rank0_rebuilds_a_damaged_one(tmp_path):
    from conftest import run_script

    script = "tests/workers/data_cache_ranks.py"
    result = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", script, str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0[0] == rank0[1] and rank0[0][0] > 0
    assert (result.stdout + result.stderr).count("is unreadable") == 1  # rank 0 found it, rebuilt it


def two_node_ranks(script: str, out: Path, timeout: int = 300) -> list[str]:
    """Run `script OUT NODE` as ranks 0 and 1 of a world of 2, each the first (LOCAL_RANK 0) of its own
    simulated node; their combined output, after both exited 0."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    ranks = [
        subprocess.Popen(
            [sys.executable, script, str(out), str(rank)],
            cwd=ROOT,
            env=base
            | {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    failed = [f"rank {r}: {output[-2500:]}" for r, output in enumerate(outputs) if ranks[r].returncode]
    assert not failed, "\n".join(failed)
    return outputs


def test_two_nodes_build_a_node_local_cache_each_share_a_shared_one_and_say_when_they_cannot(tmp_path):
    two_node_ranks("tests/workers/data_cache_nodes.py", tmp_path)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for load in ("node_local", "shared"):
        assert rank0[load]["sizes"] == rank1[load]["sizes"] and rank0[load]["sizes"][0] > 0
        assert rank0[load]["first"] == rank1[load]["first"]
    # node-local disks: each node's first rank built its own (rank 1 cannot see rank 0's)
    assert [len(list((tmp_path / f"node{n}" / "cache").glob("step2_*/meta.json"))) for n in (0, 1)] == [1, 1]
    assert any("building the cache" in line for line in rank0["node_local"]["log"])
    assert any("not on this node's disk; building it here" in line for line in rank1["node_local"]["log"])
    # shared storage: built once by rank 0, reused by the other node
    assert any("building the cache" in line for line in rank0["shared"]["log"])
    assert [line for line in rank1["shared"]["log"] if "cache" in line][0].startswith("step 2 data: reusing the cache")
    assert not any("building" in line for line in rank1["shared"]["log"])
    # without LOCAL_RANK the other node's rank does not build: one line says why it has no cache
    assert rank0["unlabelled"] == "loaded"
    assert (
        rank1["unlabelled"].startswith("rank 1 cannot see the data cache ")
        and "LOCAL_RANK is unset" in rank1["unlabelled"]
    )


# ---- the data users have: column flags, TRL's formats, step-1 data, any load_dataset name (issue 30) ----
def chatml_tokenizer():
    """The tiny tokenizer with a ChatML template whose turns end in the special <|im_end|>."""
    from test_end_tokens import CHATML

    tok = load_tokenizer("tiny-opt")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_column_flags_map_other_column_names(tmp_path, tokenizer):
    from dschat_hal.args import step1_parser
    from dschat_hal.configs import Step1Config, to_config

    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "id": 1} for r in ROWS]
    write_table(tmp_path / "d" / "train.parquet", rows)
    args = step1_parser().parse_args(["--prompt_key", "question", "--chosen_key", "good", "--rejected_key", "bad"])
    keys = to_config(args, Step1Config).data.column_keys()
    assert keys == {"prompt": "question", "chosen": "good", "rejected": "bad"}
    raw = get_raw_dataset(str(tmp_path / "d"), keys=keys)
    row = raw.train[0]
    assert (raw.prompt(row), raw.chosen(row), raw.rejected(row)) == (row["question"], row["good"], row["bad"])
    pairs, _, _ = load_or_build(DataSpec([str(tmp_path / "d")], phase=2, column_keys=keys), tokenizer, None)
    assert len(pairs) and pairs[0]["chosen"] != pairs[0]["rejected"]
    spec = DataSpec([str(tmp_path / "d")], phase=2)
    assert cache_key(DataSpec(**{**spec.__dict__, "column_keys": keys}), tokenizer) != cache_key(spec, tokenizer)
    with pytest.raises(UserError, match=r"--prompt_key 'q' names no column; its columns are question, good, bad, id"):
        get_raw_dataset(str(tmp_path / "d"), keys={"prompt": "q"})
    with pytest.raises(UserError, match=r"has columns question, good, bad, id, none of which .* --prompt_key COLUMN"):
        get_raw_dataset(str(tmp_path / "d"))


def test_trl_conversational_preferences_render_with_the_chat_template(tmp_path):
    tok = chatml_tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    user = [{"role": "user", "content": "Please help me."}]
    explicit = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": f"Sure {i}."}],
         "rejected": [{"role": "assistant", "content": "No."}]}
        for i in range(20)
    ]  # fmt: skip
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    rendered = "<|im_start|>user\nPlease help me.<|im_end|>\n<|im_start|>assistant\nSure {}.<|im_end|>"
    for name, rows in (("explicit", explicit), ("implicit", implicit)):
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        raw = get_raw_dataset(str(tmp_path / name))
        assert raw.conversational and raw.prompt(raw.train[0]) == user, name
        spec = DataSpec([str(tmp_path / name)], data_split="0,1,0", phase=2, max_seq_len=128)  # plain format
        pairs, _, _ = load_or_build(spec, tok, None)
        decoded = {tok.decode(p["chosen"]) for p in pairs}
        assert decoded <= {rendered.format(i) for i in range(20)} and len(decoded) == len(pairs), name
        assert all(p["chosen"][-1] == p["rejected"][-1] == end for p in pairs), name
        prompts, _, _ = load_or_build(DataSpec([str(tmp_path / name)], "0,0,1", 3), tok, None)
        assert (
            tok.decode(prompts[0]["prompt"]) == "<|im_start|>user\nPlease help me.<|im_end|>\n<|im_start|>assistant\n"
        )


def test_trl_implicit_prompt_preferences_give_steps_2_and_3_their_prompt(tmp_path, tokenizer):
    """TRL's preference data with an implicit prompt (chosen/rejected full texts or conversations, no
    prompt column): the prompt is the start both share (TRL's `extract_prompt`), cut at the answer's
    turn or, in plain text, at a word, not inside one; step 3 trains on those prompts (it found none:
    every prompt was empty), step 2 / DPO on the whole texts."""
    rows = [
        {"chosen": f"Human: q{i}? Assistant: Sure, yes {i}.", "rejected": f"Human: q{i}? Assistant: Sure, no."}
        for i in range(40)
    ]
    write_jsonl(tmp_path / "text" / "train.jsonl", rows)
    raw = get_raw_dataset(str(tmp_path / "text"))
    row = raw.train[0]
    number = row["chosen"].split("q")[1].split("?")[0]
    assert (raw.prompt(row), raw.chosen(row), raw.rejected(row)) == (
        f"Human: q{number}? Assistant:",
        f" Sure, yes {number}.",
        " Sure, no.",
    )
    prompts, _, _ = load_or_build(DataSpec([str(tmp_path / "text")], "0,0,1", 3), tokenizer, None)
    decoded = tokenizer.decode(prompts[0]["prompt"], skip_special_tokens=True)
    assert decoded.startswith("Human: q") and decoded.endswith("? Assistant:"), decoded
    pairs, _, _ = load_or_build(DataSpec([str(tmp_path / "text")], "0,1,0", 2), tokenizer, None)
    texts = {tokenizer.decode(p["chosen"], skip_special_tokens=True) for p in pairs}
    assert texts <= {r["chosen"] for r in rows} and len(texts) == len(pairs)
    from dschat_hal.data.raw_datasets import split_implicit_prompt

    # plain text: at the word where they part (TRL: "The sky is bl" / "ue." / "ack.")
    assert split_implicit_prompt("The sky is blue.", "The sky is black.") == ("The sky is", " blue.", " black.")
    # conversations parting at the first answer: the prompt is the first question, not all turns but the last
    chosen = [
        {"role": role, "content": text}
        for role, text in zip(["user", "assistant"] * 2, "q1 a1 q2 a2".split(), strict=True)
    ]
    rejected = [
        *chosen[:1],
        {"role": "assistant", "content": "b1"},
        *chosen[2:3],
        {"role": "assistant", "content": "b2"},
    ]
    assert split_implicit_prompt(chosen, rejected) == (chosen[:1], chosen[1:], rejected[1:])
    write_jsonl(tmp_path / "conv" / "train.jsonl", [{"chosen": chosen, "rejected": rejected}] * 4)
    conv = get_raw_dataset(str(tmp_path / "conv"))
    assert conv.conversational and (conv.prompt(conv.train[0]), conv.rejected(conv.train[0])) == (
        chosen[:1],
        rejected[1:],
    )
    # a format that cannot be read: one line naming the columns found and the flags that map them
    write_jsonl(tmp_path / "odd" / "train.jsonl", [{"question": "q", "answer_a": "a", "answer_b": "b"}])
    with pytest.raises(
        UserError, match=r"has columns question, answer_a, answer_b, .*--prompt_key COLUMN --chosen_key"
    ):
        get_raw_dataset(str(tmp_path / "odd"))


def test_step1_data_without_rejected_answers(tmp_path, tokenizer):
    """TRL's prompt/completion, messages and text rows train step 1 (as --data_path and
    --sft_only_data_path), give step 3 prompts, and step 2 says what is missing in one line."""
    tok = chatml_tokenizer()
    completion = write_jsonl(
        tmp_path / "pc" / "train.jsonl", [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(20)]
    )
    messages = write_jsonl(
        tmp_path / "msg" / "train.jsonl",
        [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]} for i in range(20)],
    )  # fmt: skip
    text = write_jsonl(tmp_path / "text" / "train.jsonl", [{"text": f"Just text {i}."} for i in range(20)])
    sft, _, _ = load_or_build(DataSpec([str(completion)], "1,0,0", 1), tok, None)
    assert {tok.decode(s["input_ids"]) for s in sft} <= {f"Q{i}? A{i}.</s>" for i in range(20)}
    sft, _, _ = load_or_build(DataSpec([str(messages)], "1,0,0", 1), tok, None)
    chat = "<|im_start|>user\nQ{0}?<|im_end|>\n<|im_start|>assistant\nA{0}.<|im_end|>"
    assert {tok.decode(s["input_ids"]) for s in sft} <= {chat.format(i) for i in range(20)}
    sft, _, _ = load_or_build(DataSpec([str(text)], "1,0,0", 1), tok, None)
    assert {tok.decode(s["input_ids"]) for s in sft} <= {f"Just text {i}.</s>" for i in range(20)}
    with_extra, _, _ = load_or_build(
        DataSpec(["local/jsonfile"], phase=1, sft_only_data_path=[str(completion)]), tok, None
    )
    alone, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1), tok, None)
    assert len(with_extra) == len(alone) + len(get_raw_dataset(str(completion)).train)
    prompts, _, _ = load_or_build(DataSpec([str(completion)], "0,0,1", 3), tok, None)
    assert tok.decode(prompts[0]["prompt"]).startswith("Q")
    for data in (completion, messages):
        with pytest.raises(UserError, match=r"has no rejected answers \(columns .*\).*--rejected_key COLUMN"):
            load_or_build(DataSpec([str(data)], phase=2), tok, None)


def test_conversations_need_a_chat_template(tmp_path, tokenizer):
    data = write_jsonl(
        tmp_path / "msg" / "train.jsonl",
        [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}] * 20,
    )
    with pytest.raises(UserError, match=r"holds conversations .* has none; use a model whose tokenizer has one"):
        load_or_build(DataSpec([str(data)], "1,0,0", 1), tokenizer, None)


def test_any_name_load_dataset_resolves_is_read_by_its_columns(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, *args, **kwargs):
        calls.append(name)
        rows = [{"prompt": "p", "completion": " c"}] * 10
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})

    with pytest.raises(UserError, match=r"'someone/new-prefs' is neither a known dataset nor an existing path, and "):
        get_raw_dataset("someone/new-prefs")  # offline in tests: datasets says it cannot reach the hub
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = get_raw_dataset("someone/new-prefs")
    assert calls == ["someone/new-prefs"] and not raw.has_rejected and raw.chosen(raw.train[0]) == " c"
    with pytest.raises(UserError, match="neither a known dataset nor an existing path; check the path"):
        get_raw_dataset(str(tmp_path / "missing" / "train.json"))
    assert calls == ["someone/new-prefs"]


def test_ptx_text_from_prompt_completion_rows(tmp_path):
    from dschat_hal.data.unsupervised import read_texts

    data = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "Q?", "completion": " A."}])
    assert read_texts(str(data)) == ["Q? A."]
