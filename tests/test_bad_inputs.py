"""Every bad input ends with one `error:` line naming the problem, the right exit code, and nothing
left behind. One row per case: (entry point, argv, setup, exit code, message fragment).

Arguments may use placeholders: {tmp} (the case's directory), {out} ({tmp}/out, the output that must
not appear), {data} ({tmp}/d, for setups that write data), {actor}/{reward} (tiny saved models),
{cache} (a data cache directory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script

from training.chat import main as chat
from training.e2e_rlhf import main as e2e
from training.plan import main as plan
from training.step1_supervised_finetuning.main import main as step1
from training.step2_dpo_finetuning.main import main as dpo
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3

S1 = [
    "--device",
    "cpu",
    "--data_output_path",
    "{cache}",
    "--max_seq_len",
    "64",
    "--per_device_train_batch_size",
    "8",
    "--output_dir",
    "{out}",
]
S3 = [
    "--device",
    "cpu",
    "--data_output_path",
    "{cache}",
    "--actor_model_name_or_path",
    "{actor}",
    "--critic_model_name_or_path",
    "{reward}",
    "--max_prompt_seq_len",
    "32",
    "--max_answer_seq_len",
    "8",
    "--output_dir",
    "{out}",
]
ROW = {"prompt": " Human: hi Assistant:", "chosen": " hello there", "rejected": " go away"}


# ---- setups: each writes what its cases need under the case directory --------------------------
def write_data(name: str, content: bytes | str):
    def setup(tmp: Path, models: dict) -> None:
        (tmp / "d").mkdir()
        path = tmp / "d" / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return setup


def rows(n: int, name: str = "train.json", **override) -> callable:
    return write_data(name, json.dumps([{**ROW, **override}] * n))


def jsonl_with_bad_line(line: int):
    good = json.dumps(ROW)
    lines = [good] * (line - 1) + ['{"prompt": "x",'] + [good] * 3
    return write_data("train.jsonl", "\n".join(lines) + "\n")


def copy_model(source: str, damage):
    def setup(tmp: Path, models: dict) -> None:
        shutil.copytree(models[source], tmp / "m")
        damage(tmp / "m")

    return setup


def only_config(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name != "config.json":
            entry.unlink()


def truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def invalid_config(path: Path) -> None:
    (path / "config.json").write_text("{not json")


def make_file(relative: str):
    def setup(tmp: Path, models: dict) -> None:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp / relative).write_text("I am a file")

    return setup


def card_naming(pattern: str):
    """A data directory whose README.md configs name `pattern` for train (beside a real train.json)."""

    def setup(tmp: Path, models: dict) -> None:
        rows(40)(tmp, models)
        card = f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {pattern}\n---\n"
        (tmp / "d" / "README.md").write_text(card)

    return setup


def empty_directory(tmp: Path, models: dict) -> None:
    (tmp / "d").mkdir()


def saved_without_train(tmp: Path, models: dict) -> None:
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list([ROW] * 5)}).save_to_disk(str(tmp / "d"))


def corrupt_parquet(tmp: Path, models: dict) -> None:
    write_data("train.parquet", b"PAR1 this is not parquet PAR1")(tmp, models)


def no_eos_tokenizer(tmp: Path, models: dict) -> None:
    copy_model("actor", lambda p: None)(tmp, models)
    config = json.loads((tmp / "m" / "tokenizer_config.json").read_text())
    config.update(eos_token=None, pad_token=None)
    (tmp / "m" / "tokenizer_config.json").write_text(json.dumps(config))
    special = tmp / "m" / "special_tokens_map.json"
    if special.exists():
        special.write_text("{}")
    for name in ("config.json", "generation_config.json"):  # nor does the model name one
        path = tmp / "m" / name
        if path.exists():
            path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": None}))


def checkpointed(damage=None):
    """A step-1 run of one step with a resumable checkpoint under {out}_checkpoints."""

    def setup(tmp: Path, models: dict) -> None:
        argv = [a.format(cache=tmp / "cache", out=tmp / "out") for a in S1]
        step1([*argv, "--max_steps", "1", "--save_interval", "1"])
        if damage:
            damage(tmp / "out_checkpoints")

    return setup


def drop_manifest(root: Path) -> None:
    (root / "global_step1" / "manifest.json").unlink()


def truncate_model_states(root: Path) -> None:
    states = root / "global_step1" / "step1" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])


def scramble_model_states(root: Path) -> None:
    """The same size, but the zip's central directory overwritten (what a bad disk block does)."""
    states = root / "global_step1" / "step1" / "mp_rank_00_model_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[:-2000] + b"\0" * 2000)


def interrupt_training(monkeypatch):
    from dschat_hal import loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", interrupted)


def drop_backbone_tensor(path: Path) -> None:
    """A causal-LM save that lost one backbone tensor (task: real checkpoints)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    del weights["model.decoder.layers.1.fc1.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


CASES = [
    # flags
    ("train batch 0", step1, [*S1, "--per_device_train_batch_size", "0"], None, 2, "--per_device_train_batch_size must be at least 1"),
    ("eval batch 0", step2, [*S1, "--per_device_eval_batch_size", "0"], None, 2, "--per_device_eval_batch_size must be at least 1"),
    ("step-3 training batch 0", step3, [*S3, "--per_device_training_batch_size", "0"], None, 2, "--per_device_training_batch_size must be at least 1"),
    ("grad accum 0", step1, [*S1, "--gradient_accumulation_steps", "0"], None, 2, "--gradient_accumulation_steps must be at least 1"),
    ("max_seq_len 0", step1, [*S1, "--max_seq_len", "0"], None, 2, "--max_seq_len must be at least 1"),
    ("max_seq_len beyond positions", step1, [*S1, "--max_seq_len", "4096"], None, 2, "exceeds the model's 512 positions"),
    ("step-3 lengths beyond positions", step3, [*S3, "--max_prompt_seq_len", "500", "--max_answer_seq_len", "100"], None, 2, "prompt + answer length 600 exceeds"),
    ("dropout 1", step1, [*S1, "--dropout", "1.0"], None, 2, "--dropout must be in [0, 1)"),
    ("dropout negative", step3, [*S3, "--actor_dropout", "-0.1"], None, 2, "--actor_dropout must be in [0, 1)"),
    ("answer length 0", step3, [*S3, "--max_answer_seq_len", "0"], None, 2, "--max_answer_seq_len must be at least 1"),
    ("temperature 0", step3, [*S3, "--temperature", "0"], None, 2, "--temperature must be > 0"),
    ("negative lr", step1, [*S1, "--learning_rate=-1e-3"], None, 2, "--learning_rate must be a finite number >= 0"),
    ("huge lr", step3, [*S3, "--actor_learning_rate", "1e39"], None, 2, "--actor_learning_rate must be a finite number >= 0"),
    ("negative lora dim", step1, [*S1, "--lora_dim", "-4"], None, 2, "--lora_dim must be 0 or more"),
    ("negative tokenising workers", step1, [*S1, "--preprocessing_num_workers", "-3"], None, 2, "--preprocessing_num_workers must be at least 1"),
    ("max_steps -1", step1, [*S1, "--max_steps", "-1"], None, 2, "--max_steps must be 0 or more"),
    ("zero epochs", step1, [*S1, "--num_train_epochs", "0"], None, 2, "--num_train_epochs must be at least 1"),
    ("save_interval -1", step1, [*S1, "--save_interval", "-1"], None, 2, "--save_interval must be 0 or more"),
    ("offload with ZeRO 0", step1, [*S1, "--offload"], None, 2, "--offload needs ZeRO: set --zero_stage"),
    ("step-3 offload with ZeRO 0", step3, [*S3, "--offload", "--actor_zero_stage", "2"], None, 2, "set --critic_zero_stage"),
    ("bucket length 0", step1, [*S1, "--bucket_lengths", "0"], None, 2, "--bucket_lengths holds 0: every bucket must be a length of at least 1"),
    ("negative bucket length", step3, [*S3, "--bucket_lengths", "16", "-5"], None, 2, "--bucket_lengths holds -5"),
    ("bucket beyond positions", step1, [*S1, "--bucket_lengths", "32", "100000"], None, 2, "--bucket_lengths 100000 exceeds the model's 512 positions"),
    ("step-3 bucket beyond positions", step3, [*S3, "--bucket_lengths", "100000"], None, 2, "--bucket_lengths 100000 exceeds the model's 512 positions"),
    ("data_split all zero", step1, [*S1, "--data_split", "0,0,0"], None, 2, "--data_split '0,0,0' gives no step any data: the shares must not all be 0"),
    ("data_split of two", step2, [*S1, "--data_split", "2,4"], None, 2, "--data_split '2,4' must be three comma-separated shares"),
    ("data_split nan", step3, [*S3, "--data_split", "nan,1,1"], None, 2, "each share must be a finite number >= 0"),
    ("random tiny critic", step3, [*S3, "--critic_model_name_or_path", "tiny-opt"], None, 2, "add --allow_random_critic"),
    # paths
    ("output_dir is a file", step1, S1, make_file("out"), 2, "--output_dir {out} is a file"),
    ("read-only output_dir", step1, [*S1, "--output_dir", "/sys/kernel/dschat_out"], None, 2, "is not writable"),
    ("data cache path is a file", step1, S1, make_file("cache"), 2, "--data_output_path {cache} is a file"),
    ("checkpoint dir is a file", step1, [*S1, "--save_interval", "1", "--checkpoint_dir", "{tmp}/ck"], make_file("ck"), 2, "--checkpoint_dir {tmp}/ck is a file"),
    ("output_dir is the current directory", step1, [*S1, "--output_dir", "."], None, 2, "contains the current directory"),
    ("checkpoint_dir inside output_dir", step1, [*S1, "--save_interval", "1", "--checkpoint_dir", "{out}/ck"], None, 2, "is inside --output_dir"),
    # data
    ("non-UTF-8 data", step1, [*S1, "--data_path", "{data}"], write_data("train.json", b'[{"prompt": "\xff\xfe"}]'), 2, "is not UTF-8 text (byte 13, line 1)"),
    ("corrupt parquet", step1, [*S1, "--data_path", "{data}"], corrupt_parquet, 2, "train.parquet is not a readable parquet file (Parquet file size is 29 bytes"),
    ("data file is a directory", step1, [*S1, "--data_path", "{data}"], make_file("d/train.json/x"), 2, "data file {data}/train.json is a directory"),
    ("dataset card names missing files", step1, [*S1, "--data_path", "{data}"], card_naming("data/missing-*.parquet"), 2, "the dataset card of {data} (configs: in README.md) names data files that do not exist (nothing matches data/missing-*.parquet)"),
    ("data directory without data", step1, [*S1, "--data_path", "{data}"], make_file("d/notes.txt"), 2, "data directory {data} holds no .arrow, .csv, .json, .jsonl, .parquet files"),
    ("empty data directory", step1, [*S1, "--data_path", "{data}"], empty_directory, 2, "data directory {data} is empty; put train/test files"),
    ("saved DatasetDict without train", step1, [*S1, "--data_path", "{data}"], saved_without_train, 2, "has no train split (splits: test); save it with a 'train' key"),
    ("all strings empty, step 1", step1, [*S1, "--data_path", "{data}"], rows(40, prompt="", chosen="", rejected=""), 2, "every train row's prompt + chosen is empty text, so step 1 has nothing to train on"),
    ("all strings empty, step 2", step2, [*S1, "--data_path", "{data}"], rows(40, prompt="", chosen="", rejected=""), 2, "every train pair's chosen and rejected answers are empty"),
    ("all strings empty, step 3", step3, [*S3, "--data_path", "{data}"], rows(40, prompt="", chosen="", rejected=""), 2, "every train row's prompt is empty text, so step 3 has nothing to train on"),
    ("identical answers, step 2", step2, [*S1, "--data_path", "{data}"], rows(40, rejected=ROW["chosen"]), 2, "every train pair's chosen and rejected answers are the same text"),
    ("single-token sequences", step1, [*S1, "--max_seq_len", "1"], None, 2, "every step-1 sequence is a single token at --max_seq_len 1"),
    ("bad JSONL line 3", step1, [*S1, "--data_path", "{data}"], jsonl_with_bad_line(3), 2, "train.jsonl is not valid JSON (line 3"),
    ("empty dataset", step1, [*S1, "--data_path", "{data}"], rows(0), 2, "the dataset is too small: 0 training rows"),
    ("two-row dataset", step1, [*S1, "--data_path", "{data}"], rows(3), 2, "the dataset is too small: 2 training rows"),
    ("all pairs identical after truncation", step2, [*S1, "--max_seq_len", "4", "--data_path", "{data}"], rows(40), 2, "every train pair is identical after truncation"),
    ("bad ptx JSONL line 2", step3, [*S3, "--unsupervised_dataset_name", "{data}/u.jsonl"], write_data("u.jsonl", '{"text": "a"}\n{"text": \n'), 2, "u.jsonl is not valid JSONL (line 2"),
    # models
    ("model dir with only config.json", step1, [*S1, "--model_name_or_path", "{tmp}/m"], copy_model("actor", only_config), 2, "the save was incomplete"),
    ("truncated weights", step1, [*S1, "--model_name_or_path", "{tmp}/m"], copy_model("actor", truncate_weights), 2, "are damaged or incomplete"),
    ("invalid config.json", step1, [*S1, "--model_name_or_path", "{tmp}/m"], copy_model("actor", invalid_config), 2, "config.json is not a valid model config"),
    ("missing relative critic path", step3, [*S3, "--critic_model_name_or_path", "no_such_output/reward"], None, 2, "nor in the local cache, and the model hub is unreachable"),
    ("unreachable hub model", step1, [*S1, "--model_name_or_path", "nobody/no-model"], None, 2, "the model hub is unreachable"),
    ("tokenizer without pad or EOS", step1, [*S1, "--model_name_or_path", "{tmp}/m"], no_eos_tokenizer, 2, "has neither a pad nor an EOS token"),
    # chat and e2e
    ("chat max_new_tokens 0", chat, ["--path", "{actor}", "--max_new_tokens", "0"], None, 2, "--max_new_tokens must be at least 1"),
    ("chat on a damaged model", chat, ["--path", "{tmp}/m"], copy_model("actor", truncate_weights), 2, "damaged or incomplete"),
    ("e2e output-dir is a file", e2e, ["--output-dir", "{out}"], make_file("out"), 2, "--output-dir {out} is a file; pass a directory"),
    ("e2e unbalanced quote", e2e, ["--output-dir", "{out}", "--step1-args", "--seed '5"], None, 2, "--step1-args \"--seed '5\" cannot be split"),
    ("e2e unknown step-1 flag", e2e, ["--output-dir", "{out}", "--step1-args", "--no_such_flag 3"], None, 2, "step 1 does not know --no_such_flag 3 (from --step1-args); see python training/step1_supervised_finetuning/main.py --help"),
    ("e2e bad step-3 value", e2e, ["--output-dir", "{out}", "--step3-args", "--max_answer_seq_len x"], None, 2, "step 3 refuses its flags (argument --max_answer_seq_len: invalid int value: 'x'); check --step3-args"),
    ("e2e master port out of range", e2e, ["--output-dir", "{out}", "--deployment-type", "single_node", "--master-port", "70000"], None, 2, "--master-port 70000 is not a TCP port"),
    # resume
    ("resume, other batch size", step1, [*S1, "--resume", "--per_device_train_batch_size", "4"], checkpointed(), 2, "the run changed (per_device_train_batch_size 8 -> 4)"),
    ("resume, other ZeRO stage", step1, [*S1, "--resume", "--zero_stage", "1"], checkpointed(), 2, "the run changed (zero_stage 0 -> 1)"),
    ("resume, other model", step1, [*S1, "--resume", "--model_name_or_path", "tiny-llama"], checkpointed(), 2, "model_name_or_path 'tiny-opt' -> 'tiny-llama'"),
    ("resume, incomplete checkpoint", step1, [*S1, "--resume"], checkpointed(drop_manifest), 2, "no checkpoint unit under {out}_checkpoints can be resumed (global_step1: no readable manifest.json"),
    ("resume, truncated model states", step1, [*S1, "--resume"], checkpointed(truncate_model_states), 2, "no checkpoint unit under {out}_checkpoints can be resumed (global_step1: step1/mp_rank_00_model_states.pt is 1000 bytes"),
    ("resume, unreadable model states", step1, [*S1, "--resume"], checkpointed(scramble_model_states), 2, "checkpoint unit {out}_checkpoints/global_step1: its step1 part cannot be loaded ("),
    # --debug and Ctrl-C
    ("--debug keeps exit 2", step1, [*S1, "--lora_dim", "-4", "--debug"], None, 2, "--lora_dim must be 0 or more"),
    ("Ctrl-C", step1, S1, interrupt_training, 130, "interrupted (Ctrl-C)"),
    # memory plan sizes (issue #27: --device_memory needs a positive size with its unit)
    ("plan device_memory 1.2.3GiB", plan, ["1", "--model_name_or_path", "tiny-opt", "--device", "cpu", "--device_memory", "1.2.3GiB"], None, 2, "--device_memory '1.2.3GiB' is not a size; write a positive size with its unit, e.g. 24GiB, 80GB or 512MiB"),
    ("plan device_memory without unit", plan, ["3", "--actor_model_name_or_path", "{actor}", "--critic_model_name_or_path", "{reward}", "--device_memory", "40"], None, 2, "--device_memory '40' has no unit"),
    ("dry_run device_memory 0", step1, [*S1, "--dry_run", "--device_memory", "0"], None, 2, "--device_memory '0' must be more than 0"),
    ("step-3 dry_run negative device_memory", step3, [*S3, "--dry_run", "--device_memory=-8GiB"], None, 2, "--device_memory '-8GiB' must be more than 0"),
    ("step device_memory without unit", step2, [*S1, "--device_memory", "24"], None, 2, "--device_memory '24' has no unit"),
    ("e2e dry-run device-memory without unit", e2e, ["--output-dir", "{out}", "--dry-run", "--device-memory", "40"], None, 2, "--device-memory '40' has no unit; write a positive size with its unit"),
    ("e2e dry-run device-memory 1.2.3GiB", e2e, ["--output-dir", "{out}", "--dry-run", "--device-memory", "1.2.3GiB"], None, 2, "--device-memory '1.2.3GiB' is not a size"),
    # real checkpoints: a backbone tensor missing from a causal-LM directory would train from random values
    ("causal LM missing a backbone tensor", step2, [*S1, "--model_name_or_path", "{tmp}/m"], copy_model("actor", drop_backbone_tensor), 2, "1 backbone tensor(s) of '{tmp}/m' are not in its checkpoint"),
    ("attention kernels not available", step1, [*S1, "--attn_implementation", "flash_attention_2"], None, 2, "--attn_implementation flash_attention_2 cannot be used for 'tiny-opt' here"),
    # critic-free step 3 (issue #29): estimator flags
    ("grpo with one answer per prompt", step3, [*S3, "--advantage_estimator", "grpo"], None, 2, "--advantage_estimator grpo compares the answers to the same prompt: add --n_samples_per_prompt N with N >= 2 (got 1)"),
    ("rloo with one answer per prompt", step3, [*S3, "--advantage_estimator", "rloo", "--n_samples_per_prompt", "1"], None, 2, "--advantage_estimator rloo compares the answers"),
    ("zero answers per prompt", step3, [*S3, "--n_samples_per_prompt", "0"], None, 2, "--n_samples_per_prompt must be at least 1"),
    ("dr_grpo without grpo", step3, [*S3, "--dr_grpo"], None, 2, "--dr_grpo modifies grpo: add --advantage_estimator grpo (got gae)"),
    # DPO in place of steps 2 and 3 (issue #29)
    ("dpo beta 0", dpo, [*S1, "--beta", "0"], None, 2, "--beta must be a finite number > 0 (got 0.0)"),
    ("dpo label smoothing 0.5", dpo, [*S1, "--label_smoothing", "0.5"], None, 2, "--label_smoothing must be in [0, 0.5) (got 0.5)"),
    ("dpo reference ZeRO-0 with offload", dpo, [*S1, "--offload_reference_model", "--reference_zero_stage", "0"], None, 2, "--offload_reference_model offloads ZeRO-3 parameters but --reference_zero_stage 0"),
    ("e2e dpo with step 3", e2e, ["--output-dir", "{out}", "--dpo", "--step", "1", "2", "3"], None, 2, "--dpo replaces steps 2 and 3"),
    ("e2e dpo with step-3 flags", e2e, ["--output-dir", "{out}", "--dpo", "--advantage-estimator", "grpo"], None, 2, "--dpo runs no step 3"),
    ("e2e dpo unknown step-2 flag", e2e, ["--output-dir", "{out}", "--dpo", "--step2-args", "--center_reward --seed 3"], None, 2, "step 2 does not know --center_reward (from --step2-args); see python training/step2_dpo_finetuning/main.py --help"),
    ("e2e dpo without an actor", e2e, ["--output-dir", "{out}", "--dpo", "--step", "2"], None, 2, "DPO needs step 1's actor at {out}/actor (pass --step 1 2)"),
    # KL loss and rollout importance sampling (issue #29, kl29)
    ("kl_estimator without kl_loss", step3, [*S3, "--kl_estimator", "k1"], None, 2, "--kl_estimator sets the KL loss term: add --kl_loss"),
    ("kl_loss_coef without kl_loss", step3, [*S3, "--kl_loss_coef", "0.01"], None, 2, "--kl_loss_coef sets the KL loss term: add --kl_loss"),
    ("negative kl_loss_coef", step3, [*S3, "--kl_loss", "--kl_loss_coef=-1"], None, 2, "--kl_loss_coef must be a finite number >= 0 (got -1.0)"),
    ("kl_loss with target_kl", step3, [*S3, "--kl_loss", "--target_kl", "0.1"], None, 2, "--target_kl adapts the KL penalty in the reward, which --kl_loss removes"),
    ("rollout_is_cap below 1", step3, [*S3, "--rollout_is_cap", "0.5"], None, 2, "--rollout_is_cap must be a finite number >= 1 (got 0.5)"),
    # ---- issue 30, the data users have: columns nobody maps, a key naming no column, step-1 data in step 2, no template
    ("columns nobody maps", step1, [*S1, "--data_path", "{data}"], write_data("train.jsonl", '{"question": "q", "answer": "a"}\n' * 20), 2, "{data} has columns question, answer, none of which this project reads; map them with --prompt_key COLUMN --chosen_key COLUMN"),
    ("--prompt_key naming no column", step1, [*S1, "--data_path", "{data}", "--prompt_key", "question"], rows(20), 2, "{data}: --prompt_key 'question' names no column; its columns are prompt, chosen, rejected"),
    ("prompt/completion data in step 2", step2, [*S1, "--data_path", "{data}"], write_data("train.jsonl", '{"prompt": "q", "completion": "a"}\n' * 20), 2, "{data} has no rejected answers (columns prompt, completion), and step 2 trains on chosen/rejected pairs; map the rejected column with --rejected_key COLUMN"),
    ("messages without a chat template", step1, [*S1, "--data_path", "{data}"], write_data("train.jsonl", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' * 20), 2, "{data} holds conversations (lists of role/content messages), which are rendered with the tokenizer's chat template, and the tokenizer of "),
    # ---- issue 29, quality and cost: step 3's wall-time budget
    ("negative max_seconds", step3, [*S3, "--max_seconds=-5"], None, 2, "--max_seconds must be a finite number of seconds >= 0 (0: no limit; got -5.0)"),
    ("max_seconds nan", step3, [*S3, "--max_seconds", "nan"], None, 2, "--max_seconds must be a finite number of seconds >= 0"),
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny actor and reward model (random weights; nothing trains here)."""
    from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm

    root = tmp_path_factory.mktemp("models")
    tokenizer = load_tokenizer("tiny-opt")
    save_lm(create_lm("tiny-opt", tokenizer), tokenizer, root / "actor")
    create_reward_model("tiny-opt", tokenizer).save(root / "reward", tokenizer)
    return {"actor": root / "actor", "reward": root / "reward"}


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize(
    ("entry", "argv", "setup", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input(entry, argv, setup, code, fragment, models, tmp_path, capsys, monkeypatch):
    if setup is interrupt_training:
        interrupt_training(monkeypatch)
    elif setup is not None:
        setup(tmp_path, models)
    before = tree(tmp_path)
    values = {"tmp": tmp_path, "out": tmp_path / "out", "data": tmp_path / "d", "cache": tmp_path / "cache", **models}
    argv = [a.format(**values) for a in argv]
    fragment = fragment.format(**values)
    capsys.readouterr()
    try:
        result = entry(argv)
    except SystemExit as stop:
        result = stop.code
    assert result == code
    err = capsys.readouterr().err.strip().splitlines()
    print(err[-1])
    assert err and err[-1].startswith("error:") and fragment in err[-1], err[-5:]
    if "--debug" in argv:
        assert any("Traceback" in line for line in err)
    else:
        assert not any("Traceback" in line for line in err), err
    left = tree(tmp_path) - before
    assert not {p for p in left if not p.startswith("cache")}, left  # only the data cache may appear


def test_legitimate_but_suspicious_inputs_warn(models, tmp_path, capsys):
    """Learning rate 0 is allowed (e.g. to measure) with a warning; identical pairs are counted and dropped."""
    step1(
        [*[a.format(cache=tmp_path / "c", out=tmp_path / "o") for a in S1], "--learning_rate", "0", "--max_steps", "1"]
    )
    assert "--learning_rate is 0" in capsys.readouterr().err
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps([ROW] * 30 + [{**ROW, "rejected": ROW["chosen"]}] * 10))
    result = step2(
        ["--device", "cpu", "--data_output_path", str(tmp_path / "c"), "--data_path", str(data), "--max_steps", "1"]
    )
    assert "identical chosen and rejected tokens" in capsys.readouterr().out
    assert result["accuracy"] >= 0


def test_a_corrupted_data_cache_is_rebuilt(tmp_path, caplog):
    argv = ["--device", "cpu", "--data_output_path", str(tmp_path / "c"), "--max_seq_len", "64", "--max_steps", "1"]
    first = step1(argv)
    cached = sorted((tmp_path / "c").glob("step1_*/train/*.arrow"))
    assert cached, list((tmp_path / "c").rglob("*"))
    for arrow in cached:
        arrow.write_bytes(arrow.read_bytes()[:100])
    second = step1(argv)
    assert "is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert second["losses"] == pytest.approx(first["losses"])


def test_unreadable_data_file(tmp_path, capsys, monkeypatch):
    """Permission bits do not stop root, so opening the data file is made to fail as it would for a user."""
    rows(20)(tmp_path, {})
    data, real_open = tmp_path / "d" / "train.json", Path.open

    def denied(self, *args, **kwargs):
        if self == data:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(SystemExit) as stop:
        step1(["--device", "cpu", "--data_output_path", "", "--data_path", str(tmp_path / "d")])
    assert stop.value.code == 2 and "is not readable (permission denied)" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_refuses(tmp_path, capsys):
    from dschat_hal.errors import _run_cleanups
    from dschat_hal.faults import lock_output

    lock_output(tmp_path / "out")  # as a concurrent run would hold it
    try:
        with pytest.raises(SystemExit) as stop:
            step1(["--device", "cpu", "--output_dir", str(tmp_path / "out"), "--data_output_path", ""])
    finally:
        _run_cleanups()
    assert stop.value.code == 2 and "is in use by another run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_concurrent_process_is_refused(tmp_path):
    """Two processes: the second exits 2 with one line while the first holds the output directory."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dschat_hal.faults import lock_output; "
         "lock_output(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(tmp_path / "out")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = run_script(
            "training/step1_supervised_finetuning/main.py", "--device", "cpu", "--output_dir", str(tmp_path / "out")
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "in use by another run" in result.stderr


def test_a_diverging_actor_stops_before_generation(models, tmp_path, capsys):
    """An actor blown up by its first update stops the run with one line naming the step, instead of
    a RuntimeError from inside generate()."""
    argv = [a.format(cache=tmp_path / "c", out=tmp_path / "o", **models) for a in S3]
    with pytest.raises(SystemExit) as stop:
        step3([*argv, "--actor_learning_rate", "1e8", "--lr_scheduler_type", "constant", "--enable_test_mode",
               "--test_stop_step", "3"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "training stopped after step 1" in err[-1], err[-3:]
    assert not (tmp_path / "o").exists()


def test_non_finite_actor_weights_are_detected(models):
    from types import SimpleNamespace

    from dschat_hal.models import create_lm, load_tokenizer
    from training.step3_rlhf_finetuning.main import actor_is_finite

    model = create_lm("tiny-opt", load_tokenizer("tiny-opt"))
    engine = SimpleNamespace(actor=SimpleNamespace(module=model))
    assert actor_is_finite(engine)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    assert not actor_is_finite(engine)


def test_chat_keeps_the_newest_tokens_of_a_long_conversation(models, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("tell me " * 400 + "\nquit\n"))
    assert chat(["--path", str(models["actor"]), "--device", "cpu", "--max_new_tokens", "4", "--greedy"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("Assistant:") == 1
    assert "exceeds the model's 512 positions; keeping its last 508 tokens" in captured.err


def test_e2e_refuses_a_master_port_in_use_and_otherwise_picks_a_free_one(tmp_path, capsys):
    import socket

    from training.e2e_rlhf import launcher, parse_args

    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        port = held.getsockname()[1]
        code = e2e(
            ["--output-dir", str(tmp_path / "out"), "--deployment-type", "single_node", "--master-port", str(port)]
        )
        assert code == 2 and f"--master-port {port} is in use on this machine" in capsys.readouterr().err
        chosen = launcher(parse_args(["--deployment-type", "single_node"]))
    assert not (tmp_path / "out").exists()
    assert chosen[chosen.index("--master_port") + 1] != str(port) and "--master_port" in chosen
    given = launcher(parse_args(["--deployment-type", "multi_node", "--master-port", "29611"]))
    assert given[given.index("--master_port") + 1] == "29611"


def test_a_rendezvous_port_in_use_is_one_line(monkeypatch):
    """Under a launcher whose MASTER_PORT another run holds, torch's EADDRINUSE becomes one line."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    from dschat_hal.errors import UserError
    from dschat_hal.runtime import init_distributed

    class Backend:
        def init_distributed(self) -> None:
            dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        with pytest.raises(UserError, match=f"port {port} \\(MASTER_PORT\\) is already in use"):
            init_distributed(Backend())


def test_flags_that_would_do_nothing_say_so(models, tmp_path, capsys):
    """One `note:` line per flag without effect here; none for the same flags where they act."""
    from types import SimpleNamespace

    import accel
    from dschat_hal.args import step1_parser, step3_parser
    from dschat_hal.inert_flags import inert_flag_notes

    base = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c"]

    def notes(*flags: str, backend=None) -> str:
        return "\n".join(inert_flag_notes(step3_parser().parse_args([*base, *flags]), backend or accel.get("cpu"), 1))

    assert "--release_inference_cache frees the hybrid engine's KV cache; without --enable_hybrid_engine" in notes(
        "--release_inference_cache"
    )
    assert "without --enable_hybrid_engine it does nothing" in notes("--unpin_actor_parameters")
    assert "with --actor_zero_stage 2 there is none" in notes(
        "--unpin_actor_parameters", "--enable_hybrid_engine", "--actor_zero_stage", "2"
    )
    assert "--enable_hpu_graphs does nothing on cpu" in notes("--enable_hpu_graphs", "--enable_hybrid_engine")
    assert "--enable_device_graphs does nothing on cpu" in notes("--enable_device_graphs", "--enable_hybrid_engine")
    cuda_like = SimpleNamespace(name="gpu", graph_kind="CUDA graphs", device_count=lambda: 1)
    assert "captured in CUDA graphs instead" in notes(
        "--enable_hpu_graphs", "--enable_hybrid_engine", backend=cuda_like
    )
    assert notes("--offload_reward_model") == ""  # acts at any stage: the reward model alone is partitioned
    assert "--zero_hpz_enabled does nothing here" in notes("--zero_hpz_enabled")
    acting = ["--enable_hybrid_engine", "--actor_zero_stage", "3", "--critic_zero_stage", "3"]
    assert notes(*acting, "--release_inference_cache", "--unpin_actor_parameters", "--offload_reference_model",
                 "--offload_reward_model") == ""  # fmt: skip
    hpu_like = SimpleNamespace(name="hpu", graph_kind="HPU graphs", device_count=lambda: 1)
    assert notes("--enable_hpu_graphs", "--enable_hybrid_engine", backend=hpu_like) == ""
    step1_notes = inert_flag_notes(step1_parser().parse_args(["--enable_hpu_graphs"]), accel.get("cpu"), 1)
    assert step1_notes == [
        "--enable_hpu_graphs does nothing in this step: only step 3's generation runs in HPU graphs (by default in "
        "HPU lazy mode)"
    ]
    argv = [a.format(cache=tmp_path / "c", out=tmp_path / "o") for a in S1]
    step1([*argv, "--enable_hpu_graphs", "--max_steps", "1"])
    assert "note: --enable_hpu_graphs does nothing in this step" in capsys.readouterr().out
