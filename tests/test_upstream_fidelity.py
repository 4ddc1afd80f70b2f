"""Behaviour a DeepSpeed-Chat user expects: upstream's defaults (held to the table in docs/upstream.md), `--help`
with defaults, and the fixes of upstream-divergent bugs (value head under LoRA, ptx accumulation,
schedule length with gradient accumulation, EMA per micro-batch), plus the flags upstream has."""

from __future__ import annotations

import json
import math
import re
import types

import pytest
import torch
from conftest import ROOT, tiny_step3_argv

from dschat_hal.args import step1_parser, step2_parser, step3_parser
from dschat_hal.models import create_reward_model, load_tokenizer
from dschat_hal.models.reward_model import reset_final_norm, saved_value_head
from dschat_hal.rlhf import engine as rlhf_engine
from dschat_hal.rlhf.schedule import batch_sizes, planned_optimizer_steps, ppo_micro_batches

PARSERS = {1: step1_parser, 2: step2_parser, 3: step3_parser}


def readme_defaults_table() -> list[list[str]]:
    """Rows (flag, step 1, step 2, step 3) of the table of upstream defaults in docs/upstream.md."""
    lines = (ROOT / "docs" / "upstream.md").read_text().split("## Defaults", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| flag |"))
    table = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return table


def parse_cell(cell: str):
    value = cell.strip("`")
    if value == "None":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def test_defaults_are_upstreams_as_listed_in_the_docs():
    rows = readme_defaults_table()
    assert len(rows) >= 15, "docs/upstream.md lists the upstream defaults of steps 1-3"
    parsers = {step: make() for step, make in PARSERS.items()}
    checked = 0
    for flag, *cells in rows:
        for step, cell in zip((1, 2, 3), cells, strict=True):
            if cell == "—":
                continue
            dest = flag.strip("`").removeprefix("--")
            default = parsers[step].get_default(dest)
            assert default == parse_cell(cell), f"step {step} {flag}: ours {default!r}, upstream {cell}"
            checked += 1
    assert checked >= 40


def test_help_shows_every_default():
    for make in PARSERS.values():
        parser = make()
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.nargs == 0 or not action.help or not action.option_strings:
                continue
            help_line = " ".join(parser._get_formatter()._expand_help(action).split())
            assert "(default: " in help_line and help_line in text, action.dest
    assert "(default: 9.65e-06)" in " ".join(step3_parser().format_help().split())


def test_schedule_counts_micro_batches_and_divides_by_accumulation():
    assert batch_sizes(10, 4, drop_last=False) == [4, 4, 2]
    assert batch_sizes(10, 4, drop_last=True) == [4, 4]
    # 3 generation batches of 4 rows, training micro-batches of 2: 6 micro-batches an epoch
    micro = ppo_micro_batches([4, 4, 4], 2, epochs=2, generation_batches=1, ppo_epochs=1)
    assert micro == 12
    assert planned_optimizer_steps(micro, 1) == 12
    assert planned_optimizer_steps(micro, 2) == 6 and planned_optimizer_steps(micro, 4) == 3
    # groups of 2 generation batches across 2 epochs of 3: 6 batches, all trained; 2 PPO epochs
    assert ppo_micro_batches([4, 4, 4], 2, epochs=2, generation_batches=2, ppo_epochs=2) == 24
    # one epoch of 3 with groups of 2: the third batch never trains
    assert ppo_micro_batches([4, 4, 4], 2, epochs=1, generation_batches=2, ppo_epochs=1) == 4


def test_step3_ptx_accumulation_schedule_ema_and_eval(e2e_output, tmp_path, monkeypatch):
    """Two epochs of 5 generation batches (4 prompts, micro-batches of 2, accumulation 2) with ptx:
    20 micro-batches, so 10 optimizer steps planned and taken by actor (PPO + ptx backwards in one
    step) and critic alike; the EMA follows every micro-batch; evaluation every 2 PPO steps."""
    from training.step3_rlhf_finetuning.main import main as step3

    text = tmp_path / "unsup.json"
    text.write_text(json.dumps([{"text": "Keep a regular bedtime and a cool dark room. " * 4}] * 80))
    ema_updates = []
    original = rlhf_engine.RLHFEngine.update_ema

    def counting_update(self, *args, **kwargs):
        ema_updates.append(self.actor.global_steps)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(rlhf_engine.RLHFEngine, "update_ema", counting_update)
    result = step3(
        [
            *tiny_step3_argv(e2e_output, tmp_path, answer=8, batch=4),
            "--per_device_training_batch_size",
            "2",
            "--data_split",
            "18,1,1",
            "--num_train_epochs",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--unsupervised_dataset_name",
            str(text),
            "--unsup_coef",
            "0.5",
            "--enable_ema",
            "--align_overflow",
            "--eval_interval",
            "2",
            "--eval_iters",
            "1",
            "--offload_reward_model",
        ]
    )
    assert result["optimizer_steps"] == {"planned": 10, "actor": 10, "critic": 10}
    assert len(ema_updates) == 20  # once per PPO micro-batch
    assert all(math.isfinite(h["unsup_loss"]) for h in result["history"])
    assert [e["step"] for e in result["evaluations"]] == [0, 2, 4, 6, 8, 10]  # and once before training
    assert all(math.isfinite(e["reward"]) for e in result["evaluations"])


def test_step3_rejects_a_ptx_batch_smaller_than_its_micro_batches(e2e_output, tmp_path, capsys):
    from training.step3_rlhf_finetuning.main import main as step3

    text = tmp_path / "unsup.txt"
    text.write_text("Keep a regular bedtime.\n" * 200)
    with pytest.raises(SystemExit) as exit_info:
        step3(
            [
                *tiny_step3_argv(e2e_output, tmp_path, batch=4),
                "--per_device_training_batch_size",
                "1",
                "--unsupervised_dataset_name",
                str(text),
                "--per_device_unsup_batch_size",
                "2",
            ]
        )
    assert exit_info.value.code == 2
    assert "cannot give each of the 4 PPO micro-batches" in capsys.readouterr().err


def test_step2_lora_only_trains_the_value_head_with_eval_interval_and_eot_token(tmp_path, monkeypatch):
    import training.step2_reward_model_finetuning.main as step2_main
    from dschat_hal import loop

    seen = {}
    original = loop.engine_from_config

    def spy(backend, model, *args, **kwargs):
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        seen["head"] = model.v_head.weight.detach().clone()
        return original(backend, model, *args, **kwargs)

    monkeypatch.setattr(loop, "engine_from_config", spy)
    out = tmp_path / "reward"
    result = step2_main.main(
        [
            "--device",
            "cpu",
            "--data_output_path",
            str(tmp_path / "cache"),
            "--max_seq_len",
            "64",
            "--lora_dim",
            "4",
            "--only_optimize_lora",
            "--learning_rate",
            "1e-2",
            "--max_steps",
            "4",
            "--eval_interval",
            "2",
            "--eval_iters",
            "1",
            "--add_eot_token",
            "--eot_token",
            "<|eot|>",
            "--output_dir",
            str(out),
        ]
    )
    assert "v_head.weight" in seen["trainable"]
    assert all("lora_" in n or n == "v_head.weight" for n in seen["trainable"])
    assert not torch.equal(saved_value_head(out), seen["head"])  # the head trained
    assert [e["step"] for e in result["evaluations"]] == [2, 4]
    tokenizer = load_tokenizer(str(out))
    (eot_id,) = tokenizer("<|eot|>", add_special_tokens=False)["input_ids"]
    model = create_reward_model(str(out), tokenizer)
    assert eot_id < model.rwtransformer.get_input_embeddings().num_embeddings


def test_bloom_final_norm_is_reset_under_a_new_value_head():
    tokenizer = load_tokenizer("tiny-bloom")
    model = create_reward_model("tiny-bloom", tokenizer)
    with torch.no_grad():
        model.rwtransformer.ln_f.weight.mul_(3.0).add_(0.5)
        model.rwtransformer.ln_f.bias.add_(0.25)
    assert reset_final_norm(model) == ("rwtransformer.ln_f.",)
    assert torch.equal(model.rwtransformer.ln_f.weight, torch.ones_like(model.rwtransformer.ln_f.weight))
    assert torch.equal(model.rwtransformer.ln_f.bias, torch.zeros_like(model.rwtransformer.ln_f.bias))
    assert reset_final_norm(create_reward_model("tiny-opt", load_tokenizer("tiny-opt"))) == ()


def test_offload_reward_model_reaches_the_reward_engine(monkeypatch):
    from dschat_hal.configs import FrozenModelsConfig, OptimConfig, PPOConfig, RLHFModelConfig, Step3Config
    from dschat_hal.decisions import unplanned_decisions

    calls = []
    monkeypatch.setattr(rlhf_engine, "frozen_engine", lambda *a, **kw: calls.append(kw) or "engine")
    for flag in (False, True):
        config = Step3Config(
            models=RLHFModelConfig("tiny-opt", "tiny-opt"),
            critic=OptimConfig(zero_stage=3),
            frozen=FrozenModelsConfig(offload_reward_model=flag),
            ppo=PPOConfig(per_device_training_batch_size=2),
        )
        engine = object.__new__(rlhf_engine.RLHFEngine)
        engine.backend, engine.config, engine.dtype = None, config, torch.float32
        engine.decisions = unplanned_decisions(config)
        engine._critic_model = lambda fp32_loss, stage=None: torch.nn.Linear(1, 1)
        assert engine._init_reward() == "engine"
    assert [(c["stage"], c["offload"]) for c in calls] == [(3, False), (3, True)]


def test_mixed_precision_lora_config_and_its_refusals():
    from dschat_hal.configs import OptimConfig
    from dschat_hal.errors import UserError

    actor = OptimConfig(lora_dim=8, zero_stage=3)
    gpu = types.SimpleNamespace(name="cuda", supports_quantized_weights=True, device_count=lambda: 8)
    assert rlhf_engine.mixed_precision_lora_config(gpu, actor) == {"zero_quantized_nontrainable_weights": True}
    with pytest.raises(UserError, match="--actor_zero_stage 3"):
        rlhf_engine.mixed_precision_lora_config(gpu, OptimConfig(lora_dim=0, zero_stage=3))
    cpu = types.SimpleNamespace(name="cpu", supports_quantized_weights=False, device_count=lambda: 1)
    with pytest.raises(UserError, match="cpu does not support"):
        rlhf_engine.mixed_precision_lora_config(cpu, actor)


def test_hpz_partitions_within_a_node_only_for_multi_node_zero3():
    from dschat_hal.ds_config import hpz_entries

    node_of_8 = types.SimpleNamespace(device_count=lambda: 8)
    assert hpz_entries(node_of_8, 3, 16) == {"zero_hpz_partition_size": 8}
    assert hpz_entries(node_of_8, 3, 8) == {}  # one node: the primary partition is already node-local
    assert hpz_entries(node_of_8, 2, 16) == {}
    assert hpz_entries(types.SimpleNamespace(device_count=lambda: 1), 3, 4) == {}
    assert step1_parser().parse_args(["--zero_hpz_enabled"]).zero_hpz_enabled


def test_num_padding_at_beginning_says_it_has_no_effect():
    for make in (step2_parser, step3_parser):
        help_text = " ".join(make().format_help().split())
        assert re.search(
            r"--num_padding_at_beginning \S+ accepted for upstream compatibility, without effect", help_text
        )
