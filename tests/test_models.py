"""Models: offline tokenizer, tiny families, local loading, reward loss, LoRA, atomic saving."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from dschat_hal.errors import UserError
from dschat_hal.models import atomic_directory, create_lm, create_reward_model, load_tokenizer, save_lm
from dschat_hal.models.lora import LoRALinear, convert_to_lora, fuse_lora, only_optimize_lora, unfuse_lora
from dschat_hal.models.reward_model import pairwise_loss
from dschat_hal.models.tiny import TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-opt")


def test_bundled_tokenizer_loads_offline_with_special_tokens():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    ids = tok("Human: How do I bake bread? Assistant:")["input_ids"]
    assert tok.decode(ids) == "Human: How do I bake bread? Assistant:"


def test_tokenizer_without_pad_gets_eos(tmp_path, tokenizer, caplog):
    tokenizer.save_pretrained(tmp_path)
    create_lm("tiny-opt", tokenizer).config.save_pretrained(tmp_path)
    cfg = tmp_path / "special_tokens_map.json"
    cfg.write_text('{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    (tmp_path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}'
    )
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "</s>"
    assert "no pad token" in caplog.text


@pytest.mark.parametrize("family", ["opt", "bloom", "llama"])
def test_tiny_models_are_seeded_and_small(family, tokenizer):
    a, b = create_lm(f"tiny-{family}", tokenizer, seed=1), create_lm(f"tiny-{family}", tokenizer, seed=1)
    assert a.config.model_type == family
    assert a.get_input_embeddings().num_embeddings % 8 == 0
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert sum(p.numel() for p in a.parameters()) < 1_000_000


def test_local_directory_round_trip_and_bad_paths(tmp_path, tokenizer):
    model = create_lm("tiny-llama", tokenizer).eval()
    save_lm(model, tokenizer, tmp_path / "m")
    loaded = create_lm(str(tmp_path / "m"), load_tokenizer(str(tmp_path / "m")))
    ids = torch.randint(3, 100, (1, 8))
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        create_lm(str(tmp_path / "empty"), tokenizer)
    with pytest.raises(UserError, match="is not a model directory"):
        load_tokenizer(str(tmp_path / "nowhere"))


def reference_pairwise_loss(cv, rv, cids, rids, clen, rlen):
    """DeepSpeed-Chat's loop over pairs, written plainly."""
    losses = []
    for i in range(cids.size(0)):
        end = max(clen[i], rlen[i])
        diff = [t for t in range(end) if cids[i, t] != rids[i, t]]
        start = diff[0] if diff else end - 1
        losses.append(-F.logsigmoid(cv[i, start:end] - rv[i, start:end]).mean())
    return torch.stack(losses).mean()


def test_pairwise_loss_matches_the_loop():
    torch.manual_seed(0)
    cids = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 5, 6, 0, 0, 0], [7, 7, 7, 0, 0, 0]])
    rids = torch.tensor([[1, 2, 9, 0, 0, 0], [1, 5, 6, 8, 8, 0], [7, 7, 7, 0, 0, 0]])
    clen, rlen = torch.tensor([4, 3, 3]), torch.tensor([3, 5, 3])
    cmask = (torch.arange(6) < clen[:, None]).long()
    rmask = (torch.arange(6) < rlen[:, None]).long()
    cv, rv = torch.randn(3, 6), torch.randn(3, 6)
    got = pairwise_loss(cv, rv, cmask, rmask, cids, rids)
    assert torch.allclose(got, reference_pairwise_loss(cv, rv, cids, rids, clen, rlen))


def test_lora_starts_equal_fuses_exactly_and_trains_only_factors(tokenizer):
    model = create_lm("tiny-opt", tokenizer).eval()  # no dropout: outputs must be comparable
    ids = torch.randint(3, 100, (2, 6))
    base = model(ids).logits.detach()
    count = convert_to_lora(model, "decoder.layers.", dim=4)
    assert count == 12  # 6 linears per OPT layer, 2 layers
    assert torch.allclose(model(ids).logits, base, atol=1e-6)
    layer = next(m for m in model.modules() if isinstance(m, LoRALinear))
    torch.nn.init.normal_(layer.lora_left_weight)
    adapted = model(ids).logits.detach()
    fuse_lora(model)
    assert torch.allclose(model(ids).logits, adapted, atol=1e-4)
    unfuse_lora(model)
    assert torch.allclose(model(ids).logits, adapted, atol=1e-4)
    only_optimize_lora(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(UserError, match="matches no linear layer"):
        convert_to_lora(create_lm("tiny-opt", tokenizer), "nothing.here", dim=4)


def test_reward_model_save_and_reload(tmp_path, tokenizer):
    model = create_reward_model("tiny-bloom", tokenizer).eval()
    torch.nn.init.normal_(model.v_head.weight)
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    expected = model.forward_value(ids, mask)["chosen_end_scores"]
    assert torch.allclose(expected[1], model.forward_value(ids, mask, return_value_only=True)[1, 4])
    model.save(tmp_path / "rm", tokenizer)
    reloaded = create_reward_model(str(tmp_path / "rm"), tokenizer)
    assert torch.allclose(reloaded.forward_value(ids, mask)["chosen_end_scores"], expected, atol=1e-5)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-save")
    assert (target / "a").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_saved_actor_loads_with_transformers(tmp_path, tokenizer):
    model = create_lm("tiny-opt", tokenizer).eval()
    convert_to_lora(model, "decoder.layers.", dim=4)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_left_weight, std=0.1)
    ids = torch.randint(3, 100, (1, 6))
    expected = model(ids).logits
    save_lm(model, tokenizer, tmp_path / "actor")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "actor")
    assert torch.allclose(plain(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize("family", ["opt", "bloom", "llama"])
def test_dropout_flag_reaches_the_modules(family, tokenizer):
    model = create_lm(f"tiny-{family}", tokenizer, dropout=0.0).train()
    ids = torch.randint(3, 100, (2, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)  # no dropout left in train mode
