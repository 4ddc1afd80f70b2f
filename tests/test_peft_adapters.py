"""LoRA adapters saved in PEFT's format beside the merged model (`lora_adapter/`: adapter_config.json +
adapter_model.safetensors), when only the LoRA factors trained: base + B·A·(alpha/r) = our merged model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_step1_argv
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dschat_hal.models import create_lm, load_tokenizer
from dschat_hal.models.checkpoint import ADAPTER_DIR
from training.step1_supervised_finetuning.main import main as step1

SEED = "5"


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    """Step 1 on tiny-opt with LoRA rank 4 on the `layers.` linears and everything else frozen."""
    tmp = tmp_path_factory.mktemp("lora")
    out = tmp / "actor"
    step1(
        tiny_step1_argv(
            tmp, "--lora_dim", "4", "--only_optimize_lora", "--lora_learning_rate", "5e-2", "--max_steps", "2",
            "--seed", SEED, "--dtype", "fp32", "--output_dir", str(out),
        )
    )  # fmt: skip
    return out


def base_model():
    return create_lm("tiny-opt", load_tokenizer("tiny-opt"), seed=int(SEED)).eval()


def test_adapters_follow_pefts_layout_and_our_merged_weights_are_base_plus_b_a(lora_sft):
    config = json.loads((lora_sft / ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["base_model_name_or_path"] == "tiny-opt" and config["bias"] == "none"
    targets = config["target_modules"]
    assert targets and all(".layers." in t for t in targets)
    weights = load_file(str(lora_sft / ADAPTER_DIR / "adapter_model.safetensors"))
    assert set(weights) == {f"base_model.model.{t}.lora_{ab}.weight" for t in targets for ab in "AB"}
    base = base_model().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(lora_sft).state_dict()
    scale = config["lora_alpha"] / config["r"]
    for target in targets:
        a, b = weights[f"base_model.model.{target}.lora_A.weight"], weights[f"base_model.model.{target}.lora_B.weight"]
        weight = base[f"{target}.weight"]
        assert a.shape == (4, weight.shape[1]) and b.shape == (weight.shape[0], 4)
        assert b.abs().max() > 0  # trained (B starts at zero)
        assert torch.allclose(merged[f"{target}.weight"], weight + b @ a * scale, atol=1e-6), target
    untouched = [k for k in merged if k.removesuffix(".weight") not in targets]
    assert untouched and all(torch.equal(merged[k], base[k]) for k in untouched)


def test_peft_loads_the_adapters_on_the_base_model_with_the_merged_models_outputs(lora_sft):
    peft = pytest.importorskip("peft", reason="peft is not installed: the layout test above checks the files")
    adapted = peft.PeftModel.from_pretrained(base_model(), str(lora_sft / ADAPTER_DIR)).eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_sft).eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_no_adapters_when_the_base_weights_trained_too(tmp_path):
    out = tmp_path / "actor"
    step1(tiny_step1_argv(tmp_path, "--lora_dim", "4", "--max_steps", "1", "--output_dir", str(out)))
    assert (out / "model.safetensors").is_file() and not (out / ADAPTER_DIR).exists()
