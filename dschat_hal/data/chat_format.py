"""`--prompt_format chat_template`: prompts and answers rendered with the tokenizer's chat template.

The datasets hold DeepSpeed-Chat's text format (`Human: … Assistant: …`, possibly several turns);
`plain` (the default) trains on that text as is. `chat_template` turns it into messages (user,
assistant, ..., user) and renders them the way TRL does: the prompt with the template's generation
prompt, the answer as what the template adds after it for the assistant message, cut after the
template's end-of-turn token (`end_tokens.template_end_of_turn`), which then ends the training
sequence in place of EOS. Rendered text carries its own special tokens, so it is encoded without the
tokenizer's defaults.
"""

from __future__ import annotations

import re
from typing import Any

from dschat_hal.errors import UserError

_MARKER = re.compile(r"\s*\b(Human|Assistant):\s*")


def to_messages(text: str) -> list[dict[str, str]]:
    """`Human: a Assistant: b Human: c Assistant:` -> user a, assistant b, user c (a trailing empty
    assistant turn is the generation prompt); text before the first marker joins the first user turn."""
    parts = _MARKER.split(text)
    messages: list[dict[str, str]] = []
    lead = parts[0].strip()
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if role == "Human" else "assistant"
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n{content}".strip()
        else:
            messages.append({"role": role, "content": content})
    if lead:
        if messages and messages[0]["role"] == "user":
            messages[0]["content"] = f"{lead}\n{messages[0]['content']}".strip()
        else:
            messages.insert(0, {"role": "user", "content": lead})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages or [{"role": "user", "content": ""}]


def require_template(tokenizer: Any) -> None:
    """One line when `--prompt_format chat_template` meets a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"--prompt_format chat_template: the tokenizer of {tokenizer.name_or_path!r} has no chat template "
            "(no 'chat_template' in its tokenizer_config.json or chat_template.jinja); use --prompt_format plain "
            "(the 'Human: ... Assistant:' text) or a model whose tokenizer has a template"
        )


class ChatTemplate:
    """Renders prompts and prompt + answer pairs with a tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        from dschat_hal.models.end_tokens import template_end_of_turn

        require_template(tokenizer)
        self.tokenizer = tokenizer
        self.end_id = template_end_of_turn(tokenizer)
        self.end_text = None if self.end_id is None else tokenizer.convert_ids_to_tokens(self.end_id)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja2's TemplateError and the template's own raise_exception
            raise UserError(
                f"--prompt_format chat_template: the chat template of {self.tokenizer.name_or_path!r} cannot render "
                f"a conversation of {[m['role'] for m in messages]} ({str(err).splitlines()[0][:120]}); "
                "use --prompt_format plain"
            ) from None

    def messages_prompt(self, messages: list[dict[str, str]]) -> str:
        """The conversation so far, ending in the template's generation prompt for the assistant."""
        return self._render(messages, True)

    def prompt(self, text: str | list[dict[str, str]]) -> str:
        """A `Human: ... Assistant:` text, or a list of messages (TRL's conversational data), rendered."""
        return self.messages_prompt(text if isinstance(text, list) else to_messages(text))

    def dialogue(self, prompt_text: str | list[dict[str, str]], answer: str | list[dict[str, str]]) -> str:
        """The rendered prompt followed by the assistant's answer (a text, or the answer's messages),
        ending with the end-of-turn token."""
        messages = prompt_text if isinstance(prompt_text, list) else to_messages(prompt_text)
        prompt = self.messages_prompt(messages)
        turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer.strip()}]
        full = self._render([*messages, *turns], False)
        if not full.startswith(prompt):  # a template whose generation prompt is not a prefix (TRL warns alike)
            return full.rstrip()
        rest = full[len(prompt) :]
        if self.end_text and self.end_text in rest:
            rest = rest[: rest.rindex(self.end_text) + len(self.end_text)]
        return prompt + rest.rstrip()
