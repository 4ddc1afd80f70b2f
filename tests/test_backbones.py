"""Real checkpoints: a reward model's backbone loads from a causal-LM directory of any family,
whatever its `base_model_prefix` (Gemma-3 text has none); a missing backbone tensor is one error
line; saved tokenizers write only what transformers reads; `--attn_implementation` reaches every model."""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
)

import accel
from dschat_hal.errors import UserError
from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm
from dschat_hal.models import reward_model as reward_module
from dschat_hal.models.lm import padded_vocab_size

IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# family: (config of a tiny causal LM, the prefix of its backbone's keys in the causal-LM checkpoint)
FAMILIES = {
    "gemma3_text": (
        lambda v: Gemma3TextConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=16, **IDS,
        ),
        "model.",
    ),
    "llama": (
        lambda v: LlamaConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=128, tie_word_embeddings=False, **IDS,
        ),
        "model.",
    ),
    "opt": (
        lambda v: OPTConfig(
            vocab_size=v, hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=128, **IDS,
        ),
        "model.",
    ),
    "bloom": (lambda v: BloomConfig(vocab_size=v, hidden_size=32, n_layer=2, n_head=2, **IDS), "transformer."),
    "gpt_neox": (
        lambda v: GPTNeoXConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=128, **IDS,
        ),
        "gpt_neox.",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-opt")


@pytest.fixture(scope="module")
def causal_lms(tmp_path_factory, tokenizer) -> dict:
    """Each family as a random tiny causal LM saved with save_pretrained (and the bundled tokenizer)."""
    root = tmp_path_factory.mktemp("causal_lms")
    for family, (config, _) in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config(padded_vocab_size(tokenizer)))
        model.save_pretrained(root / family, safe_serialization=True)
        tokenizer.save_pretrained(root / family)
    return {family: root / family for family in FAMILIES}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict (ZeRO-3 parameters gathered)."""
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            out[name] = param.detach().clone()
    return out


def assert_backbone_is_the_checkpoint(model, directory, prefix: str) -> None:
    saved = load_file(str(directory / "model.safetensors"))
    expected = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    loaded = state(model.rwtransformer)
    assert loaded.keys() == expected.keys()
    different = [k for k in loaded if not torch.equal(loaded[k], expected[k])]
    assert not different, different


@pytest.mark.parametrize("family", FAMILIES)
def test_the_backbone_of_any_causal_lm_loads_and_our_reward_save_reloads(family, causal_lms, tokenizer, tmp_path):
    directory = causal_lms[family]
    model = create_reward_model(str(directory), tokenizer).eval()
    assert_backbone_is_the_checkpoint(model, directory, FAMILIES[family][1])
    # a step-2 checkpoint (backbone saved from the base model, value_head.safetensors) loads as itself
    torch.nn.init.normal_(model.v_head.weight)
    model.save(tmp_path / "reward", tokenizer)
    again = create_reward_model(str(tmp_path / "reward"), tokenizer)
    before, after = state(model), state(again)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_lm_head_is_not_kept(causal_lms, tokenizer, monkeypatch):
    """The causal LM whose backbone the reward model takes (its untied head a vocabulary-sized
    matrix) is freed as soon as the backbone is out."""
    loaded = []
    load = reward_module.from_pretrained_checked

    def spy(*args, **kwargs):
        model, missing = load(*args, **kwargs)
        loaded.append(weakref.ref(model))
        return model, missing

    monkeypatch.setattr(reward_module, "from_pretrained_checked", spy)
    model = create_reward_model(str(causal_lms["llama"]), tokenizer)
    assert len(loaded) == 1 and loaded[0]() is None
    assert model.rwtransformer.get_input_embeddings().weight.shape[0] == padded_vocab_size(tokenizer)


def test_zero3_partitions_the_backbone_at_load_time(causal_lms, tokenizer):
    from dschat_hal.ds_config import eval_ds_config

    backend = accel.get("cpu")
    backend.init_distributed()
    config = eval_ds_config(backend, torch.float32, 3, False, 1, 1)
    model = create_reward_model(str(causal_lms["gemma3_text"]), tokenizer, config)
    assert all(hasattr(p, "ds_id") for p in model.rwtransformer.parameters())
    assert_backbone_is_the_checkpoint(model, causal_lms["gemma3_text"], "model.")


# family: backbone tensors taken out of its causal-LM checkpoint
DROPPED = {
    "gemma3_text": ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"),
    "llama": ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"),
    "opt": ("model.decoder.layers.1.fc1.weight",),
    "bloom": ("transformer.h.1.mlp.dense_h_to_4h.weight",),
    "gpt_neox": ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight",),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_causal_lm_missing_backbone_tensors_is_one_error_line(family, causal_lms, tokenizer, tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(causal_lms[family], directory)
    weights = load_file(str(directory / "model.safetensors"))
    for key in DROPPED[family]:
        del weights[key]
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as error:
        create_reward_model(str(directory), tokenizer)
    message = str(error.value)
    assert "\n" not in message
    count = len(DROPPED[family])
    assert f"{count} backbone tensor(s) of {str(directory)!r} are not in its checkpoint" in message
    assert "pass a complete model directory" in message


def test_saved_tokenizer_config_has_only_what_transformers_reads(tmp_path, tokenizer):
    save_lm(create_lm("tiny-opt", tokenizer), tokenizer, tmp_path / "actor")
    written = json.loads((tmp_path / "actor" / "tokenizer_config.json").read_text())
    assert "fast_tokenizer" not in written
    assert AutoTokenizer.from_pretrained(tmp_path / "actor").is_fast
    assert load_tokenizer(str(tmp_path / "actor")).is_fast
    # a directory an earlier version saved (with the key): loads fast, and saving it again drops the key
    written["fast_tokenizer"] = True
    (tmp_path / "actor" / "tokenizer_config.json").write_text(json.dumps(written))
    old = load_tokenizer(str(tmp_path / "actor"))
    assert old.is_fast
    save_lm(create_lm("tiny-opt", old), old, tmp_path / "again")
    assert "fast_tokenizer" not in json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())


def test_attn_implementation_reaches_models_of_every_kind(causal_lms, tokenizer):
    assert create_lm("tiny-opt", tokenizer).config._attn_implementation != "eager"  # the flag has work to do
    models = [
        create_lm("tiny-opt", tokenizer, attn_implementation="eager"),
        create_reward_model("tiny-llama", tokenizer, attn_implementation="eager"),
        create_lm(str(causal_lms["gemma3_text"]), tokenizer, attn_implementation="eager"),
        create_reward_model(str(causal_lms["gemma3_text"]), tokenizer, attn_implementation="eager").rwtransformer,
    ]
    assert [m.config._attn_implementation for m in models] == ["eager"] * 4


def test_the_attn_implementation_flag_reaches_the_four_step3_models(tmp_path, monkeypatch):
    from test_step3_dropout import record_first_epoch, tiny_step3

    from training.step3_rlhf_finetuning.main import main as step3

    seen = record_first_epoch(monkeypatch)
    step3(tiny_step3(tmp_path, "--attn_implementation", "eager"))
    assert {name: m.config._attn_implementation for name, m in seen["models"].items()} == dict.fromkeys(
        ("actor", "ref", "critic", "reward"), "eager"
    )


def test_the_attn_implementation_flag_reaches_the_chat_model(causal_lms, monkeypatch, capsys):
    import io

    import training.chat as chat

    models = []
    monkeypatch.setattr(chat, "check_finite", lambda model, *args: models.append(model))
    monkeypatch.setattr("sys.stdin", io.StringIO("quit\n"))
    argv = ["--path", str(causal_lms["gemma3_text"]), "--device", "cpu", "--max_new_tokens", "4"]
    argv += ["--attn_implementation", "eager"]
    assert chat.main(argv) == 0
    assert [m.config._attn_implementation for m in models] == ["eager"]
