"""training/chat.py: the prompt as the data writes it, greedy without sampling knobs, end ids from
the model, and one line (or a skip) for NaN weights, non-UTF-8 input, a reward model and empty lines."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_end_tokens import CHATML, model_dir

import accel
from dschat_hal.models import create_lm, create_reward_model, load_tokenizer, save_lm
from training.chat import Conversation, answer, main


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = load_tokenizer("tiny-opt")
    save_lm(create_lm("tiny-opt", tok), tok, root / "actor")
    create_reward_model("tiny-opt", tok).save(root / "reward", tok)
    broken = create_lm("tiny-opt", tok)
    with torch.no_grad():
        for param in broken.parameters():
            param.fill_(float("nan"))
    save_lm(broken, tok, root / "nan")
    templated = model_dir(root / "templated_src", extra=("<|im_start|>", "<|im_end|>"), template=CHATML)
    templated_tok = load_tokenizer(str(templated))
    save_lm(create_lm(str(templated), templated_tok), templated_tok, root / "templated")
    return root


class Recorder(torch.nn.Module):
    """Stands in for the model: records what chat passes to `generate`, answers with `reply` ids."""

    def __init__(self, reply: list[int] | None = None, error: Exception | None = None) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.reply, self.error = reply or [5], error

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append({"input_ids": input_ids[0].tolist(), **kwargs})
        if self.error is not None:
            raise self.error
        return torch.cat([input_ids, torch.tensor([self.reply])], dim=1)


def run_chat(argv: list[str], stdin, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", stdin)
    try:
        code = main(["--device", "cpu", "--max_new_tokens", "4", *argv])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "module",
    ["training.chat", "training.step1_supervised_finetuning.main", "training.step3_rlhf_finetuning.main"],
)
def test_entry_points_import_accel_before_torch(module):
    """The OpenMP wait policy `accel` sets must be in the environment before torch loads libgomp
    (chat, and the step mains run directly, not only through e2e)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    done = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert done.index("accel._openmp") < done.index("torch")


def test_greedy_passes_no_sampling_knobs_and_sampling_passes_top_p():
    tok = load_tokenizer("tiny-opt")
    model = Recorder()
    answer(model, tok, accel.get("cpu"), "Human: hi Assistant:", 4, greedy=True)
    answer(model, tok, accel.get("cpu"), "Human: hi Assistant:", 4, greedy=False)
    greedy, sampled = model.calls
    assert "top_p" not in greedy and greedy["do_sample"] is False
    assert sampled["top_p"] == 0.9 and sampled["do_sample"] is True


def test_the_prompt_is_written_as_the_training_data_writes_it():
    """No leading space: the bundled rows start with 'Human:'; turns join with one space."""
    conversation = Conversation(load_tokenizer("tiny-opt"))
    assert conversation.prompt("hi") == "Human: hi Assistant:"
    conversation.add("hi", "hello")
    assert conversation.prompt("and?") == "Human: hi Assistant: hello Human: and? Assistant:"


def test_answers_stop_at_the_chat_templates_end_of_turn_too(saved):
    tok = load_tokenizer(str(saved / "templated"))
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    conversation = Conversation(tok, "chat_template")
    ids = conversation.prompt_ids("hi")
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    model = Recorder(reply=[7, turn_end])
    assert answer(model, tok, accel.get("cpu"), ids, 4, greedy=True) == tok.decode([7]).strip()
    assert model.calls[0]["eos_token_id"] == [tok.eos_token_id, turn_end]


def test_chat_template_format_chats_and_a_tokenizer_without_one_is_refused(saved, monkeypatch, capsys):
    stdin = io.StringIO("hi\nquit\n")
    code, out, err = run_chat(
        ["--path", str(saved / "templated"), "--prompt_format", "chat_template"], stdin, monkeypatch, capsys
    )
    assert code == 0 and out.count("Assistant:") == 1, err
    code, out, err = run_chat(
        ["--path", str(saved / "actor"), "--prompt_format", "chat_template"], io.StringIO("hi\n"), monkeypatch, capsys
    )
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --prompt_format chat_template: the tokenizer")
    assert "has no chat template" in err and "Traceback" not in err


def test_nan_weights_end_in_one_line(saved, monkeypatch, capsys):
    code, out, err = run_chat(["--path", str(saved / "nan")], io.StringIO("hi\n"), monkeypatch, capsys)
    assert code == 2 and "non-finite (NaN/inf)" in err and "Traceback" not in err
    assert "Assistant:" not in out


def test_a_probability_error_while_sampling_is_one_line():
    from dschat_hal.errors import UserError

    error = RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
    with pytest.raises(UserError, match="non-finite"):
        answer(Recorder(error=error), load_tokenizer("tiny-opt"), accel.get("cpu"), "Human: hi Assistant:", 4, False)


def test_non_utf8_input_is_decoded_with_replacement(saved, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\nquit\n"), encoding="utf-8")
    code, out, err = run_chat(["--path", str(saved / "actor"), "--greedy"], stdin, monkeypatch, capsys)
    assert code == 0 and out.count("Assistant:") == 1
    assert "not valid UTF-8" in err and "Traceback" not in err


def test_a_reward_model_directory_is_refused(saved, monkeypatch, capsys):
    code, _, err = run_chat(["--path", str(saved / "reward")], io.StringIO("hi\n"), monkeypatch, capsys)
    assert code == 2 and "is a step-2 reward model" in err


def test_empty_lines_are_skipped(saved, monkeypatch, capsys):
    code, out, _ = run_chat(
        ["--path", str(saved / "actor"), "--greedy"], io.StringIO("\n  \nhi\n\nquit\n"), monkeypatch, capsys
    )
    assert code == 0 and out.count("Assistant:") == 1


def chat_command(saved) -> list[str]:
    path = str(saved / "actor")
    return [sys.executable, str(ROOT / "training/chat.py"), "--path", path, "--device", "cpu", "--max_new_tokens", "2"]


def test_a_closed_stdin_ends_chat_as_end_of_input(saved):
    """`chat.py <&-`: Python starts with no sys.stdin; that is the end of the input, exit 0."""
    result = subprocess.run(
        ["bash", "-c", 'exec "$@" <&-', "chat", *chat_command(saved)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Assistant:" not in result.stdout


def test_a_reader_that_left_ends_chat_quietly(saved):
    """`chat.py | head -1` once head has exited: no BrokenPipeError traceback, no "Exception ignored"
    at shutdown, exit 141 (128 + SIGPIPE, as a tool killed by SIGPIPE)."""
    chat = subprocess.Popen(
        chat_command(saved),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    chat.stdout.close()  # the reader is gone before chat writes its first answer
    _, err = chat.communicate("hi\nhello\n", timeout=300)
    assert chat.returncode == 141, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
