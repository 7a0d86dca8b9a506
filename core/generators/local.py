"""``type: local``: the kernel's own batched generation on a model in this process.

The model is a run directory (its latest or a given checkpoint; LoRA adapters applied) or a
Hugging Face model directory. Chat messages are rendered by :func:`metareason.data.chat.render_prompt`
with the run's chat format (``data.chat_template``, ``data.system_prompt``; a model directory:
its tokenizer's template when it has one); without a template they are ``role: content`` lines
followed by ``assistant:`` (a plain single user message is its content alone). Text prompts are
used as they are (completions semantics). Prompts are tokenised as in training, so greedy output
equals ``metareason eval``'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import Field

from metareason.config import Section
from metareason.data import chat
from metareason.data.chat import ChatFormat
from metareason.errors import UserError
from metareason.generators.base import Completion, Generator, GeneratorError, Prompt, check_params


class LocalGeneratorConfig(Section):
    type: str = "local"
    path: str  # a run directory (config.yaml + checkpoints/) or a Hugging Face model directory
    checkpoint: Optional[str] = None  # run directories: default the latest
    device: str = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(32, gt=0)


def load_local_model(path: str, checkpoint: Optional[str] = None, device: str = "auto",
                     dtype: str = "float32") -> tuple[Any, Any, str, ChatFormat]:
    """``(model, tokenizer, kind, chat format)`` from a run directory or a model directory;
    ``kind`` says which."""
    from metareason.kernel import Kernel
    from metareason.trained import load_trained

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such run or model directory")
    if (p / "config.yaml").exists():
        trained = load_trained(p, checkpoint, ["quiet=true", f"model.device={device}",
                                               "model.gradient_checkpointing=false"])
        return trained.model, trained.tokenizer, "run", trained.kernel.chat_format(trained.tokenizer)
    if not (p / "config.json").exists():
        raise UserError(f"{path}: neither a run directory (config.yaml) nor a model directory (config.json)")
    kernel = Kernel({"quiet": True, "model": {"path": str(p), "device": device, "dtype": dtype}})
    model, tokenizer = kernel.load()
    return model, tokenizer, "model", kernel.chat_format(tokenizer)


def render_prompt(tokenizer: Any, prompt: Prompt, fmt: Optional[ChatFormat] = None) -> str:
    """Text of a prompt: strings as they are; messages in ``fmt`` (default: the tokenizer's
    template when it has one)."""
    if isinstance(prompt, str):
        return prompt
    if fmt is None:
        fmt = ChatFormat(enabled=bool(getattr(tokenizer, "chat_template", None)))
    return chat.render_prompt(tokenizer, prompt, fmt)


class LocalGenerator(Generator):
    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 32, name: str = "local",
                 fmt: Optional[ChatFormat] = None):
        self.model, self.tokenizer, self.batch_size, self.name = model, tokenizer, batch_size, name
        self.fmt = fmt
        self.model.eval()

    @classmethod
    def from_config(cls, cfg: LocalGeneratorConfig, name: str) -> "LocalGenerator":
        try:
            model, tokenizer, _, fmt = load_local_model(cfg.path, cfg.checkpoint, cfg.device, cfg.dtype)
        except UserError as exc:
            raise GeneratorError(f"generators.{name}.path: {exc}") from None
        return cls(model, tokenizer, cfg.batch_size, name, fmt)

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt, self.fmt)

    def prompt_tokens(self, text: str) -> int:
        from metareason.data.tokenize import prompt_ids

        return len(prompt_ids(self.tokenizer, text))

    def generate(self, prompts: Sequence[Prompt], *, n: int = 1, max_new_tokens: int = 128,
                 temperature: float = 0.0, top_p: float = 1.0, stop: Optional[Sequence[str]] = None,
                 seed: Optional[int] = None) -> list[Completion]:
        import torch

        from metareason.generation.generate import generate_batch

        stops = check_params(n, max_new_tokens, temperature, top_p, stop)
        texts = [self.render(p) for p in prompts]
        rows = [(i, j, t) for i, t in enumerate(texts) for j in range(n)]
        if seed is not None:
            torch.manual_seed(seed)
        out: list[Completion] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start: start + self.batch_size]
            gens = generate_batch(self.model, self.tokenizer, [t for _, _, t in chunk],
                                  max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  temperature=temperature if temperature > 0 else 1.0, top_p=top_p, stop=stops)
            for (i, j, text), g in zip(chunk, gens):
                # "length" only when the budget ran out (a model may also end by writing padding)
                ran_out = g.stop_reason == "length" and g.num_tokens >= max_new_tokens
                out.append(Completion(g.text, self.prompt_tokens(text), g.num_tokens,
                                      "length" if ran_out else "stop", i, j))
        return out
