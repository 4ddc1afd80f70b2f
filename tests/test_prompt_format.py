"""`--prompt_format chat_template` in steps 1-3 (the tokenizer's template, as TRL renders it), one line
without a template, and step 1's perplexity as a mean over tokens (independent of the eval batch size)."""

from __future__ import annotations

import pytest
from conftest import tiny_step1_argv
from test_end_tokens import CHATML, model_dir

from dschat_hal.data import DataSpec, load_or_build
from dschat_hal.data.chat_format import to_messages
from dschat_hal.data.tokens import Encoder
from dschat_hal.models import load_tokenizer
from training.step1_supervised_finetuning.main import main as step1
from training.step2_reward_model_finetuning.main import main as step2
from training.step3_rlhf_finetuning.main import main as step3


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A tiny llama whose tokenizer has a ChatML template ending turns in <|im_end|> (eos stays </s>)."""
    return model_dir(tmp_path_factory.mktemp("tpl") / "m", extra=("<|im_start|>", "<|im_end|>"), template=CHATML)


def test_human_assistant_text_becomes_alternating_messages():
    assert to_messages("Human: hi Assistant:") == [{"role": "user", "content": "hi"}]
    assert to_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert to_messages("just a question") == [{"role": "user", "content": "just a question"}]


def test_sequences_and_prompts_are_the_rendered_template(templated):
    tok = load_tokenizer(str(templated))
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    encoder = Encoder(tok, prompt_format="chat_template")
    prompt, answer = "Human: Please help me. Assistant:", " Sure."
    full = encoder.sequences([encoder.join(prompt, answer)], 512)[0]
    rendered = "<|im_start|>user\nPlease help me.<|im_end|>\n<|im_start|>assistant\nSure.<|im_end|>"
    assert full == tok(rendered, add_special_tokens=False)["input_ids"]
    assert full[-1] == turn_end and tok.eos_token_id not in full
    assert encoder.sequences([encoder.join(prompt, answer)], 6)[0][-1] == turn_end  # kept when cut
    assert (
        tok.decode(encoder.prompts([prompt])[0])
        == "<|im_start|>user\nPlease help me.<|im_end|>\n<|im_start|>assistant\n"
    )

    spec = dict(data_path=["local/jsonfile"], prompt_format="chat_template")
    pairs, _, _ = load_or_build(DataSpec(**spec, phase=2, max_seq_len=128), tok, None)
    prompts, _, _ = load_or_build(DataSpec(**spec, phase=3, max_prompt_seq_len=128), tok, None)
    assert pairs[0]["chosen"][-1] == pairs[0]["rejected"][-1] == turn_end
    assert tok.decode(prompts[0]["prompt"]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_three_steps_train_with_the_chat_template(templated, tmp_path):
    tiny = ["--dtype", "fp32", "--max_steps", "2", "--model_name_or_path", str(templated)]
    sft = step1(
        tiny_step1_argv(tmp_path, *tiny, "--prompt_format", "chat_template", "--output_dir", str(tmp_path / "a"))
    )
    rm = step2(
        tiny_step1_argv(tmp_path, *tiny, "--prompt_format", "chat_template", "--output_dir", str(tmp_path / "r"))
    )
    assert sft["output_dir"] and rm
    ppo = step3(
        [
            *("--device", "cpu", "--dtype", "fp32", "--data_output_path", str(tmp_path / "cache")),
            *("--actor_model_name_or_path", str(tmp_path / "a"), "--critic_model_name_or_path", str(tmp_path / "r")),
            *("--max_prompt_seq_len", "64", "--max_answer_seq_len", "8", "--prompt_format", "chat_template"),
            *("--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2"),
            *("--max_steps", "1", "--num_warmup_steps", "0", "--output_dir", str(tmp_path / "p")),
        ]
    )
    assert ppo


def test_chat_template_without_a_template_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        step1(tiny_step1_argv(tmp_path, "--prompt_format", "chat_template", "--output_dir", str(tmp_path / "o")))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: --prompt_format chat_template: the tokenizer of")
    assert not (tmp_path / "o").exists()


def test_step1_perplexity_does_not_depend_on_the_eval_batch_size(tmp_path):
    before = []
    for batch in ("8", "3"):
        argv = tiny_step1_argv(tmp_path, "--dtype", "fp32", "--max_steps", "1")
        argv[argv.index("--per_device_eval_batch_size") + 1] = batch
        before.append(step1(argv)["perplexity_before"])
    assert before[0] == pytest.approx(before[1], rel=1e-5)


# Upstream's single-node OPT scripts (microsoft/DeepSpeedExamples, applications/DeepSpeed-Chat/training/
# step1_.../opt/single_node/run_1.3b.sh, step2_.../run_350m.sh, step3_.../run_1.3b.sh): what the README passes.
UPSTREAM_SCRIPT_VALUES = {
    1: {"learning_rate": 9.65e-6, "weight_decay": 0.0, "num_train_epochs": 16, "per_device_train_batch_size": 8},
    2: {"learning_rate": 5e-5, "weight_decay": 0.1, "dropout": 0.0, "per_device_train_batch_size": 4},
    3: {
        "actor_learning_rate": 9.65e-6,
        "critic_learning_rate": 5e-6,
        "num_warmup_steps": 100,
        "per_device_generation_batch_size": 4,
        "actor_dropout": 0.0,
        "enable_ema": True,
    },
}


def test_the_readmes_commands_parse_and_carry_upstreams_script_values():
    import re
    import shlex

    from conftest import ROOT

    from dschat_hal.args import step1_parser, step2_parser, step3_parser

    section = (ROOT / "README.md").read_text().split("## Running the steps yourself", 1)[1]
    block = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line) for line in block.splitlines()]
    parsers = {1: step1_parser, 2: step2_parser, 3: step3_parser}
    assert len(commands) == 3
    for step, command in enumerate(commands, start=1):
        assert f"step{step}_" in command[1]
        args = parsers[step]().parse_args(command[2:])
        for key, value in UPSTREAM_SCRIPT_VALUES[step].items():
            assert getattr(args, key) == value, (step, key)
