"""Which ids end an answer, for the tokenizer shapes real checkpoints have: bos = eos with no pad and a
config that names another eos (SmolLM2's GGUF conversion), pad = bos = eos, an eos list in the
generation config, and a chat template whose end of turn is not the eos."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer
from transformers import GenerationConfig as HFGenerationConfig

import accel
from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm
from dschat_hal.models.end_tokens import answer_end_ids
from dschat_hal.models.lm import padded_vocab_size
from dschat_hal.models.tiny import TOKENIZER_DIR, tiny_model

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def model_dir(
    path,
    *,
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    extra=(),
    template=None,
    config_eos=2,
    generation_eos=None,
    post_processor=None,
):
    """A tiny llama saved with a tokenizer (the bundled one, edited) and the given config eos ids."""
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    tok.bos_token, tok.eos_token, tok.pad_token = bos, eos, pad
    if template:
        tok.chat_template = template
    if post_processor:
        from tokenizers.processors import TemplateProcessing

        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=post_processor, special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
        )
    tok.save_pretrained(path)
    model = tiny_model("tiny-llama", padded_vocab_size(tok))
    model.config.eos_token_id = config_eos
    model.generation_config.eos_token_id = generation_eos if generation_eos is not None else config_eos
    model.save_pretrained(path)
    return path


def test_bos_equal_to_eos_without_pad_takes_the_configs_eos_and_saves_it_consistently(tmp_path, caplog):
    """SmolLM2's conversion: bos = eos = id 1, no pad, config eos 2. Sequences must end in 2, pad
    falls back to 2, and the saved model's tokenizer, config and generation config all say 2."""
    source = model_dir(tmp_path / "src", bos="<s>", eos="<s>", pad=None, config_eos=2)
    with caplog.at_level(logging.INFO):
        tok = load_tokenizer(str(source))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert answer_end_ids(tok) == [2]
    assert "is also its bos" in caplog.text and "answers end at '</s>' (2)" in caplog.text
    model = create_lm(str(source), tok)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == 2
    save_lm(model, tok, tmp_path / "out")
    saved = tmp_path / "out"
    assert json.loads((saved / "config.json").read_text())["eos_token_id"] == 2
    assert HFGenerationConfig.from_pretrained(saved).eos_token_id == 2
    assert json.loads((saved / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = load_tokenizer(str(saved))
    assert "is also its bos" not in caplog.text and "no pad token" not in caplog.text
    assert (again.eos_token_id, again.pad_token_id, answer_end_ids(again)) == (2, 2, [2])

    from dschat_hal.data.tokens import Encoder

    assert Encoder(tok).sequences(["Human: hi Assistant: hello"], 64)[0][-1] == 2


def test_pad_equal_to_bos_and_eos_keeps_masks_and_end_positions_right(tmp_path):
    """pad = bos = eos (id 2, GPT-2 style) with every sequence starting in it: collators, the answer
    mask and the reward model's end score come from lengths and the first end, not from pad ids."""
    from dschat_hal.data import Collator, DataSpec, load_or_build
    from dschat_hal.rlhf import ppo_math

    source = model_dir(tmp_path / "m", bos="</s>", eos="</s>", pad="</s>", config_eos=2, post_processor="</s> $A")
    tok = load_tokenizer(str(source))
    end = tok.eos_token_id
    assert tok.bos_token_id == tok.pad_token_id == end == 2 and answer_end_ids(tok) == [2]
    backend = accel.get("cpu")
    sft, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=1, max_seq_len=64), tok, None)
    rows = [sft[i] for i in range(3)]
    batch = Collator(1, tok.pad_token_id, backend, 64)(rows)
    for row, sample in enumerate(rows):
        ids = sample["input_ids"]
        assert ids[0] == end and ids[-1] == end
        assert batch["attention_mask"][row].sum() == len(ids)  # bos and eos counted, padding not
        assert batch["labels"][row, len(ids) - 1] == end and batch["labels"][row, 0] == end
    prompts, _, _ = load_or_build(DataSpec(["local/jsonfile"], phase=3, max_prompt_seq_len=64), tok, None)
    prompt_rows = [prompts[i] for i in range(3)]
    left = Collator(3, tok.pad_token_id, backend, 64)(prompt_rows)
    assert left["prompt_att_mask"].sum(-1).tolist() == [len(r["prompt"]) for r in prompt_rows]

    answers = torch.tensor([[5, 6, end, end, end], [7, 8, 9, 10, 11], [end, end, end, end, end]])
    assert ppo_math.answer_mask(answers, answer_end_ids(tok), tok.pad_token_id).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    reward = create_reward_model(str(source), tok).eval()
    seq = torch.cat([left["prompt"], answers], dim=1)
    mask = torch.cat([left["prompt_att_mask"], ppo_math.answer_mask(answers, [end], end)], dim=1)
    with torch.no_grad():
        values = reward.forward_value(seq, mask, return_value_only=True)
        scores = reward.forward_value(seq, mask)["chosen_end_scores"]
    width = left["prompt"].size(1)
    assert torch.allclose(scores, torch.stack([values[0, width + 2], values[1, width + 4], values[2, width]]))


def test_an_eos_list_in_the_generation_config_ends_answers_at_any_of_its_ids(tmp_path):
    eot = len(AutoTokenizer.from_pretrained(TOKENIZER_DIR))  # the id the added token gets
    source = model_dir(tmp_path / "m", extra=("<|eot|>",), generation_eos=[2, eot], config_eos=2)
    tok = load_tokenizer(str(source))
    assert tok.convert_ids_to_tokens(eot) == "<|eot|>"
    assert answer_end_ids(tok) == [2, eot]
    from dschat_hal.rlhf.trainer import PPOSettings, generation_config

    assert generation_config(PPOSettings(), tok).eos_token_id == [2, eot]
    model = create_lm(str(source), tok)
    assert model.generation_config.eos_token_id == [2, eot]
    save_lm(model, tok, tmp_path / "out")
    assert HFGenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == [2, eot]
    assert answer_end_ids(load_tokenizer(str(tmp_path / "out"))) == [2, eot]
    from dschat_hal.rlhf import ppo_math

    pad = tok.pad_token_id
    answers = torch.tensor([[5, eot, pad, pad], [5, 6, 2, pad], [5, 6, 7, 8]])
    assert ppo_math.answer_mask(answers, answer_end_ids(tok), pad).tolist() == [
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]


def test_the_decode_loop_and_hf_generate_stop_on_any_end_id():
    """The hybrid engine's loop stops a row at the first id of an end list, as HF `generate` does."""
    from test_hybrid_engine import EOS, PAD, engine_for, peaked_model, prompt_batch, reference_tokens

    from dschat_hal.rlhf.generation.engine import HybridEngine
    from dschat_hal.rlhf.generation.sampling import GenerationConfig

    model = peaked_model("llama", lora=False)
    prompts, mask = prompt_batch()
    width = prompts.size(1)
    free = reference_tokens(model, prompts, mask, GenerationConfig(12, PAD, EOS, do_sample=False))
    stop = int(free[0, width + 2])  # the third token row 0 says unhindered: make it an end id
    config = GenerationConfig(12, PAD, [EOS, stop], do_sample=False)
    reference = reference_tokens(model, prompts, mask, config)
    assert stop in reference[0, width : width + 3].tolist() and (reference[0, width + 3 :] == PAD).all()
    backend, engine = engine_for(model, 0)
    seq = HybridEngine(engine, backend, config, dtype=torch.float32).generate(prompts, mask)
    assert torch.equal(seq[:, : reference.size(1)], reference) and (seq[:, reference.size(1) :] == PAD).all()


def test_a_chat_templates_end_of_turn_ends_answers_beside_eos(tmp_path, caplog):
    source = model_dir(tmp_path / "m", extra=("<|im_start|>", "<|im_end|>"), template=CHATML, config_eos=2)
    with caplog.at_level(logging.INFO):
        tok = load_tokenizer(str(source))
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert answer_end_ids(tok) == [2, turn_end]
    assert "the chat template's end of turn" in caplog.text


@pytest.mark.parametrize("bad", [None, "{{ raise_exception('no') }}"])
def test_no_or_a_failing_template_adds_no_end(tmp_path, bad):
    source = model_dir(tmp_path / "m", template=bad)
    assert answer_end_ids(load_tokenizer(str(source))) == [2]


def test_a_tokenizer_without_eos_takes_the_models(tmp_path):
    source = model_dir(tmp_path / "m", eos=None, pad=None, config_eos=2)
    tok = load_tokenizer(str(source))
    assert (tok.eos_token_id, tok.pad_token_id, answer_end_ids(tok)) == (2, 2, [2])
