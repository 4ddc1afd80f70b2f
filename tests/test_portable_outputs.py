"""Outputs other tools can load: reward models and critics as one-label `*ForSequenceClassification`
(transformers loads the trained head and gives our end scores), older outputs still load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, OPTConfig

from dschat_hal.errors import UserError
from dschat_hal.models import create_reward_model, is_reward_checkpoint, load_tokenizer, require_reward_checkpoint
from dschat_hal.models.lm import padded_vocab_size
from dschat_hal.models.reward_model import HEAD_FILE, MARKER_FILE, saved_value_head


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-opt")


def padded_batch(tokenizer, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Three training-like sequences (BOS + text + EOS) of different lengths, padded on `side`."""
    rows = [[tokenizer.bos_token_id, *range(5, 5 + n), tokenizer.eos_token_id] for n in (7, 3, 1)]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def trained_like(name: str, tokenizer):
    model = create_reward_model(name, tokenizer).eval()
    torch.manual_seed(3)
    torch.nn.init.normal_(model.v_head.weight)
    return model


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("inv_freq")}


def opt_with_projection(tmp_path, tokenizer):
    """An OPT causal LM whose hidden size (64) differs from its word_embed_proj_dim (32), as OPT-350m."""
    config = OPTConfig(
        vocab_size=padded_vocab_size(tokenizer), hidden_size=64, word_embed_proj_dim=32, ffn_dim=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "opt350", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "opt350")
    return str(tmp_path / "opt350")


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "opt-projected"])
def test_transformers_loads_our_reward_model_with_its_trained_head_and_same_end_scores(name, tokenizer, tmp_path):
    source = opt_with_projection(tmp_path, tokenizer) if name == "opt-projected" else name
    model = trained_like(source, tokenizer)
    model.save(tmp_path / "reward", tokenizer)
    assert is_reward_checkpoint(tmp_path / "reward")
    theirs, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info  # nothing newly initialised
    assert theirs.config.num_labels == 1 and theirs.config.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(theirs.score.weight, model.v_head.weight)
    theirs.eval()
    with torch.no_grad():
        for side in ("right", "left"):
            ids, mask = padded_batch(tokenizer, side)
            ours = model.forward_value(ids, mask)["chosen_end_scores"]
            assert torch.allclose(theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1), ours, atol=1e-5), side
    again = create_reward_model(str(tmp_path / "reward"), tokenizer)
    before, after = full_state(model), full_state(again)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def write_first_format(model, tokenizer, directory) -> None:
    """A reward model as earlier versions saved it: the backbone as `AutoModel`, `value_head.safetensors`."""
    model.rwtransformer.save_pretrained(directory, safe_serialization=True)
    save_file({"weight": model.v_head.weight.detach().contiguous()}, str(directory / HEAD_FILE))
    (directory / MARKER_FILE).write_text(
        json.dumps({"format": "dschat_hal.RewardModel", "version": 1, "score_mean": 0.5})
    )
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_both_formats_reload_identically(name, tokenizer, tmp_path):
    model = trained_like(name, tokenizer)
    write_first_format(model, tokenizer, tmp_path / "old")
    model.save(tmp_path / "new", tokenizer)
    assert not (tmp_path / "new" / HEAD_FILE).exists()
    expected = full_state(model)
    for form in ("old", "new"):
        directory = tmp_path / form
        assert is_reward_checkpoint(directory)
        require_reward_checkpoint(str(directory))
        assert torch.equal(saved_value_head(directory), model.v_head.weight)
        loaded = full_state(create_reward_model(str(directory), tokenizer))
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected), form
    assert create_reward_model(str(tmp_path / "old"), tokenizer).score_mean == 0.5


def test_a_causal_lm_or_a_many_label_classifier_is_not_a_reward_model(tokenizer, tmp_path):
    model = trained_like("tiny-opt", tokenizer)
    model.save(tmp_path / "reward", tokenizer)
    config = json.loads((tmp_path / "reward" / "config.json").read_text())
    config |= {"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}}
    config.pop("num_labels", None)
    (tmp_path / "reward" / "config.json").write_text(json.dumps(config))
    assert not is_reward_checkpoint(tmp_path / "reward")
    with pytest.raises(UserError, match="is not a step-2 reward model"):
        require_reward_checkpoint(str(tmp_path / "reward"))


def test_zero3_partitions_a_sequence_classifier_at_load_time(tokenizer, tmp_path):
    import accel
    from dschat_hal.ds_config import eval_ds_config

    model = trained_like("tiny-llama", tokenizer)
    model.save(tmp_path / "reward", tokenizer)
    backend = accel.get("cpu")
    backend.init_distributed()
    config = eval_ds_config(backend, torch.float32, 3, False, 1, 1)
    loaded = create_reward_model(str(tmp_path / "reward"), tokenizer, config)
    assert all(hasattr(p, "ds_id") for p in loaded.rwtransformer.parameters())
    assert torch.equal(loaded.v_head.weight, model.v_head.weight)
