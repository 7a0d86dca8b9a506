"""The kernel object: config + plugins + registries, and the entry to train / eval / generate.

    from metareason import Kernel
    kernel = Kernel("configs/quickstart.yaml", overrides=["train.max_steps=10"])
    kernel.register(my_plugin_object)     # any object with @hookimpl methods
    metrics = kernel.run()                # train, then evaluate
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional, Union

from metareason.config import ConfigError, KernelConfig, config_source, load_config, validate_config
from metareason.plugin_manager import PluginError
from metareason.registry import Registry


class Kernel:
    def __init__(self, config: Union[str, Path, dict, KernelConfig, None] = None,
                 overrides: Optional[list[str]] = None, source: Optional[str] = None):
        """``source``: what errors name for a dict config (default ``config``; a path names itself)."""
        from metareason.config import apply_overrides, read_yaml

        if isinstance(config, KernelConfig):
            raw, source = config.model_dump(mode="python"), config_source(config)
        elif isinstance(config, (str, Path)):
            raw, source = read_yaml(config), str(config)
        else:
            raw, source = copy.deepcopy(config or {}), source or "config"
        self._source = source
        self._raw = apply_overrides(raw, overrides or [], source)
        config, self.pm = load_config(data=self._raw, source=source)
        self.config = config
        self._registries: Optional[dict[str, Registry]] = None
        self._generators: dict[str, Any] = {}
        self.train_tasks: list[Any] = []  # the data.train tasks, once training examples are loaded

    @property
    def source(self) -> str:
        """What error messages name for this run's config: its file, or ``config`` for a dict."""
        return self._source

    @property
    def raw_config(self) -> dict:
        """A deep copy of the config as given (after overrides, before validation and defaults):
        the base of a derived run's config (edit it, then ``Kernel(derived)``)."""
        return copy.deepcopy(self._raw)

    # ------------------------------------------------------------------ plugins
    @property
    def hook(self):
        return self.pm.hook

    def register(self, plugin: Any, name: Optional[str] = None) -> str:
        """Register an object (or module) with hookimpls; returns the plugin name.

        Config sections it contributes are validated against this kernel's raw config.
        """
        registered = self.pm.register(plugin, name=name)
        if registered is None:
            raise PluginError(f"plugin {name or plugin!r} is blocked or already registered")
        self._registries = None
        self._revalidate()
        return registered

    def _revalidate(self) -> None:
        sections: dict[str, Any] = {}
        for contributed in self.pm.hook.metareason_config_sections():
            for sec, model in (contributed or {}).items():
                if sec in sections:
                    raise ConfigError(f"{self._source}: config section {sec!r} is contributed by two plugins")
                sections[sec] = model
        self.config = validate_config(self._raw, sections, self._source)

    def _fill(self, hook_name: str, registry: Registry) -> Registry:
        # registration order (the reverse of pluggy's call order): a duplicate names the later plugin
        for plugin_name, call in reversed(self._implementations(hook_name)):
            def register(name, *obj, _plugin=plugin_name):
                registry.register(name, obj[0] if len(obj) == 1 else obj, _plugin)

            call(register=register)
        return registry

    @property
    def registries(self) -> dict[str, Registry]:
        if self._registries is None:
            self._registries = {
                "task": self._fill("metareason_register_tasks", Registry("task")),
                "reward": self._fill("metareason_register_rewards", Registry("reward")),
                "model": self._fill("metareason_register_models", Registry("model architecture")),
                "generator": self._fill("metareason_register_generator_backends", Registry("generator backend")),
            }
            register_architectures(self._registries["model"])
        return self._registries

    @property
    def tasks(self) -> Registry:
        return self.registries["task"]

    @property
    def rewards(self) -> Registry:
        return self.registries["reward"]

    def generator(self, name: str):
        """The generator named ``name`` in the ``generators:`` section (built once, then reused)."""
        from metareason.generators.registry import build_generator

        if name not in self._generators:
            self._generators[name] = build_generator(self, name)
        return self._generators[name]

    def _implementations(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """``(plugin name, call)`` per implementation of ``hook_name`` in pluggy's call order (the
        last registered first); ``call(**kwargs)`` passes each implementation the arguments it names."""
        caller = getattr(self.pm.hook, hook_name, None)
        if caller is None:
            raise PluginError(f"no hook named {hook_name!r}")

        def bind(impl):
            return lambda **kwargs: impl.function(*[kwargs[a] for a in impl.argnames])

        return [(impl.plugin_name, bind(impl)) for impl in reversed(caller.get_hookimpls())]

    def call_each(self, hook_name: str, **kwargs) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook_name``; ``[(plugin name, result)]`` in pluggy's call
        order, ``None`` results included (``pm.hook.<name>(...)`` drops them and the names)."""
        return [(name, call(**kwargs)) for name, call in self._implementations(hook_name)]

    def chain(self, hook_name: str, value_name: str, value: Any, **kwargs) -> Any:
        """Run a chained hook: each plugin gets the previous plugin's value (``None`` keeps it)."""
        for _, call in self._implementations(hook_name):
            result = call(**{**kwargs, value_name: value})
            if result is not None:
                value = result
        return value

    # ------------------------------------------------------------------ data
    def build_task(self, spec, field: str = "data"):
        """Instantiate a task from a ``TaskSpec``; errors name ``field``."""
        from metareason.data.base import TaskError

        factory, extra = self.tasks.lookup(spec.task)
        params = dict(spec.params, **extra)
        try:
            return factory(params, spec.seed, spec.num_samples)
        except TaskError as exc:
            raise ConfigError(f"{self._source}: {field}: {exc}") from None

    def chat_format(self, tokenizer):
        """The run's :class:`~metareason.data.chat.ChatFormat` (``data.chat_template``, ``data.system_prompt``)."""
        from metareason.data.chat import ChatTemplateError, chat_format

        try:
            return chat_format(self.config.data, tokenizer)
        except ChatTemplateError as exc:
            raise ConfigError(f"{self._source}: {exc}") from None

    def _transformed_prompt(self, example: dict):
        from metareason.data.chat import conversation, map_user_text

        prompt, completion = conversation(example)
        prompt = map_user_text(prompt, lambda text: self.chain("metareason_transform_prompt", "prompt", text,
                                                               example=example, config=self.config))
        return prompt, completion

    def prompt_text(self, example: dict, tokenizer, fmt=None) -> str:
        """The text the model sees before its reply: prompt transforms (on the user's text), then
        the chat template (:mod:`metareason.data.chat`). Training, eval and RL all use this."""
        from metareason.data.chat import ChatTemplateError, render_prompt

        prompt, _ = self._transformed_prompt(example)
        try:
            return render_prompt(tokenizer, prompt, fmt or self.chat_format(tokenizer))
        except ChatTemplateError as exc:
            raise ConfigError(f"{self._source}: example {example.get('id', '?')}: {exc}") from None

    def sft_texts(self, example: dict, tokenizer, fmt=None) -> tuple[str, str, bool]:
        """``(prompt text, completion text, append_eos)`` of an SFT example (see ``prompt_text``)."""
        from metareason.data.chat import ChatTemplateError, render_example

        prompt, completion = self._transformed_prompt(example)
        if completion is None:
            raise ConfigError(f"{self._source}: example {example.get('id', '?')}: no completion to train on")
        try:
            return render_example(tokenizer, prompt, completion, fmt or self.chat_format(tokenizer))
        except ChatTemplateError as exc:
            raise ConfigError(f"{self._source}: example {example.get('id', '?')}: {exc}") from None

    def task_of(self, example: dict):
        """The ``data.train`` task a training example came from (``None`` if unknown)."""
        i = example.get("_task")
        return self.train_tasks[i] if isinstance(i, int) and 0 <= i < len(self.train_tasks) else None

    # ------------------------------------------------------------------ model
    def load(self):
        """``(model, tokenizer)`` with special tokens from plugins and plugin model changes."""
        from metareason.models.loader import load_model, load_tokenizer

        self.registries  # architectures must be registered before the Auto classes are used
        tokenizer = load_tokenizer(self.config.model)
        tokens: list[Any] = []
        for got in self.pm.hook.metareason_special_tokens(config=self.config):
            tokens.extend(got or [])
        model, new_ids = load_model(self.config.model, tokenizer, tokens)
        model = self.chain("metareason_prepare_model", "model", model, tokenizer=tokenizer,
                           config=self.config, new_token_ids=new_ids)
        return model, tokenizer

    # ------------------------------------------------------------------ work
    def run(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train with the configured algorithm, then evaluate; returns the final metrics.

        ``resume``: continue from the run directory's last checkpoint. Otherwise a run directory
        that holds checkpoints is refused unless ``overwrite`` (which deletes them)."""
        from metareason.train import run_training

        return run_training(self, resume=resume, overwrite=overwrite)

    def evaluate(self, model=None, tokenizer=None, step: int = 0) -> dict:
        from metareason.evaluate import evaluate

        if model is None:
            model, tokenizer = self.load()
        return evaluate(self, model, tokenizer, step=step)

    def generate(self, prompts: list[str], model=None, tokenizer=None, **overrides):
        from metareason.generation.generate import generate

        if model is None:
            model, tokenizer = self.load()
        return generate(self, model, tokenizer, prompts, **overrides)


def register_architectures(registry: Registry) -> None:
    """Make plugin architectures known to transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in registry.names():
        config_cls, model_cls = registry.get(name)
        try:
            AutoConfig.register(name, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        except ValueError as exc:
            raise PluginError(f"plugin '{registry.owner(name)}' model architecture {name!r}: {exc}") from None
