"""Chat templates in TRL's conventions: the one place a prompt becomes the text a model sees.

An example is either *standard* (``prompt``: text, ``completion``: text) or *conversational*
(``messages``: ``[{role, content}, ...]`` ending with the assistant's reply, or ``prompt``: a
list of messages with ``completion``: text). With ``data.chat_template: auto`` and a tokenizer
that has a chat template, both are rendered through ``tokenizer.apply_chat_template``: the
prompt as the conversation up to the assistant's turn (``add_generation_prompt=True``), the
completion as the rest of the whole conversation's rendering (the reply and the template's
end-of-turn), so ``prompt + completion`` is exactly ``apply_chat_template`` of the conversation
and the SFT loss covers exactly the assistant reply. ``data.system_prompt`` is prepended as a
system message when the conversation has none. Without a template (``none``, or a tokenizer
that has none, e.g. the character tokenizer) standard prompts are used as they are.

Training (SFT, GRPO), evaluation, the ``local`` generator and ``serve`` all call
:func:`render_prompt`, so the model sees identical token sequences in each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

Messages = list[dict]
Prompt = Union[str, Messages]


class ChatTemplateError(ValueError):
    """A conversation the template cannot render; the message says which part is wrong."""


@dataclass(frozen=True)
class ChatFormat:
    enabled: bool = False  # render through the tokenizer's chat template
    system_prompt: Optional[str] = None


PLAIN = ChatFormat()


def chat_format(data_cfg: Any, tokenizer: Any) -> ChatFormat:
    """The format of a run: ``data.chat_template`` (auto | none) and ``data.system_prompt``."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    enabled = data_cfg.chat_template == "auto" and has_template
    if data_cfg.system_prompt is not None and not enabled:
        why = "data.chat_template is none" if has_template else "the tokenizer has no chat template"
        raise ChatTemplateError(f"data.system_prompt: needs a chat template ({why})")
    return ChatFormat(enabled, data_cfg.system_prompt)


def check_messages(messages: Any, field: str = "messages") -> Messages:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError(f"{field}: expected a non-empty list of {{role, content}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"{field}[{i}]: expected {{role: str, content: str}}")
    return messages


def conversation(example: dict) -> tuple[Prompt, Optional[str]]:
    """``(prompt, completion)`` of an example in either convention (completion may be ``None``)."""
    if "messages" in example and "prompt" not in example:
        msgs = check_messages(example["messages"])
        if msgs[-1]["role"] == "assistant":
            return msgs[:-1], msgs[-1]["content"]
        return msgs, example.get("completion")
    prompt = example["prompt"]
    if not isinstance(prompt, str):
        prompt = check_messages(prompt, "prompt")
    return prompt, example.get("completion")


def map_user_text(prompt: Prompt, fn: Callable[[str], str]) -> Prompt:
    """Apply a text transform to a prompt: the text itself, or the last user message's content."""
    if isinstance(prompt, str):
        return fn(prompt)
    out = [dict(m) for m in prompt]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = fn(m["content"])
            break
    return out


def _with_system(messages: Messages, fmt: ChatFormat) -> Messages:
    if fmt.system_prompt is not None and messages[0]["role"] != "system":
        return [{"role": "system", "content": fmt.system_prompt}] + list(messages)
    return list(messages)


def _as_messages(prompt: Prompt, fmt: ChatFormat) -> Messages:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else check_messages(prompt, "prompt")
    return _with_system(msgs, fmt)


def _apply(tokenizer: Any, messages: Messages, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:  # jinja errors: raise_exception() in the template, bad roles ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ChatTemplateError(f"chat template: cannot render the conversation: {first}") from None


def plain_text(prompt: Prompt) -> str:
    """Messages without a template: a lone user message is its content, else ``role: content``
    lines followed by ``assistant:``."""
    if isinstance(prompt, str):
        return prompt
    msgs = check_messages(prompt, "prompt")
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def render_prompt(tokenizer: Any, prompt: Prompt, fmt: ChatFormat = PLAIN) -> str:
    """The text before the model's reply."""
    if not fmt.enabled:
        return plain_text(prompt)
    return _apply(tokenizer, _as_messages(prompt, fmt), add_generation_prompt=True)


def render_example(tokenizer: Any, prompt: Prompt, completion: str, fmt: ChatFormat = PLAIN) -> tuple[str, str, bool]:
    """``(prompt text, completion text, append_eos)`` of an SFT example.

    With a template the completion is the whole conversation's rendering after the prompt's, so
    it ends with the template's own end-of-turn (no EOS is appended); without one the EOS is.
    """
    if not fmt.enabled:
        return plain_text(prompt), completion, True
    msgs = _as_messages(prompt, fmt)
    head = _apply(tokenizer, msgs, add_generation_prompt=True)
    full = _apply(tokenizer, msgs + [{"role": "assistant", "content": completion}])
    if not full.startswith(head):
        raise ChatTemplateError("chat template: the conversation's rendering does not begin with its prompt's "
                                "(a template that rewrites earlier turns cannot be trained on as prompt + completion)")
    return head, full[len(head):], False


def needs_bos(tokenizer: Any, text: str) -> bool:
    """BOS goes before a text unless the tokenizer has none or the text already starts with it
    (chat templates that write it themselves: Llama 3, Gemma; ChatML where BOS is ``<|im_start|>``)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer.bos_token_id is not None and not (bos and text.startswith(bos))
