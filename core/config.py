"""Run configuration: YAML in, dotted CLI overrides, pydantic validation.

Kernel sections are defined here; each plugin adds its own section through the
``metareason_config_sections`` hook. Every error is a ``ConfigError`` whose message is one
line naming the file and the field path, e.g. ``configs/x.yaml: train.lrr: unknown field``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator


class ConfigError(ValueError):
    """Invalid configuration; the message is a single line naming file and field."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# Kernel sections
# ---------------------------------------------------------------------------------------------
class QuantizationConfig(Section):
    load_in_4bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(64, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Union[str, list[str]] = "all-linear"
    modules_to_save: Optional[list[str]] = None


class TokenizerConfig(Section):
    type: Literal["auto", "char"] = "auto"
    path: Optional[str] = None  # auto: defaults to model.path


class ModelConfig(Section):
    path: Optional[str] = None  # local Hugging Face directory (loaded offline)
    # a GGUF file inside model.path (dequantised on load; needs the gguf package); model.path may
    # also name a .gguf file directly
    gguf_file: Optional[str] = None
    arch: Optional[dict[str, Any]] = None  # architecture config for random init; needs model_type
    tokenizer: TokenizerConfig = TokenizerConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    quantization: QuantizationConfig = QuantizationConfig()
    lora: LoraConfig = LoraConfig()
    special_tokens: list[str] = []


class TaskSpec(Section):
    task: str
    num_samples: int = Field(1000, gt=0)
    seed: int = 0
    params: dict[str, Any] = {}


class DataConfig(Section):
    train: list[TaskSpec] = []
    eval: list[TaskSpec] = []
    max_length: int = Field(256, gt=0)
    # auto: prompts (and SFT conversations) go through the tokenizer's chat template when it has
    # one, as TRL does; none: raw text (metareason.data.chat)
    chat_template: Literal["auto", "none"] = "auto"
    system_prompt: Optional[str] = None  # a system message for every conversation that has none


class TrainConfig(Section):
    algorithm: Literal["sft", "grpo"] = "sft"
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    max_grad_norm: Optional[float] = 1.0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    autocast: Literal["auto", "none", "bf16"] = "auto"
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    save_every: int = Field(0, ge=0)  # 0: only at the end
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 0
    group_by_length: bool = True  # batches of similar length (less padding); order stays random
    # padding-free packing of SFT batches (core/data/packing.py); auto: on where the model's
    # attention keeps packed examples apart (transformers models, sdpa/eager/flash attention)
    packing: Union[bool, Literal["auto"]] = "auto"
    # output layer + token loss (SFT) / sampled tokens' log-probs (GRPO) fused in chunks of tokens,
    # no [tokens, vocab] logits (core/train/fused_ce.py); auto: on where the model's output layer
    # splits off exactly (transformers models); SFT turns it off once a hook reads outputs.logits
    fused_ce: Union[bool, Literal["auto"]] = "auto"
    # Llama-family MLPs and RMSNorms whose backward recomputes elementwise ops instead of saving
    # them (ops swiglu_down, rms_norm; core/train/lean_act.py): same values, less activation
    # memory; auto: on for every such module with plain Linear layers (LoRA / quantized left as is)
    lean_activations: Union[bool, Literal["auto"]] = "auto"

    @field_validator("packing", "fused_ce", "lean_activations", mode="before")
    @classmethod
    def _packing(cls, value):
        if value == "auto" or isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return value
        raise ValueError(f"expected auto, true or false, got {value!r}")


class RLConfig(Section):
    """Group-rollout RL (``train.algorithm: grpo``); names and defaults follow TRL's GRPOConfig.

    Per optimizer step ``train.batch_size`` prompts x ``num_generations`` completions; see
    docs/grpo.md for the semantics and the differences from TRL.
    """

    num_generations: int = Field(4, ge=2)
    rewards: dict[str, float] = {}  # registered reward name -> weight
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, ge=0)
    epsilon_high: Optional[float] = Field(None, ge=0)  # None: epsilon
    beta: float = Field(0.0, ge=0)  # KL weight; 0: no reference model is loaded
    kl_bias_correction: bool = True  # TRL's use_bias_correction_kl: KL term times the ratio
    # token objective + aggregation (docs/grpo.md); cispo caps the ratio at epsilon_high (ScaleRL: 5.0)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: one ratio per completion (GSPO)
    entropy_coef: float = 0.0  # loss - entropy_coef * mean token entropy of the sampling distribution
    sapo_temperature_pos: float = Field(1.0, gt=0)  # sapo's gate temperature where A > 0
    sapo_temperature_neg: float = Field(1.05, gt=0)  # and where A <= 0
    vespo_k_pos: float = 2.0  # vespo's gamma weight exp(lambda + k log w - lambda w), A >= 0
    vespo_lambda_pos: float = Field(3.0, ge=0)
    vespo_k_neg: float = 3.0  # and A < 0
    vespo_lambda_neg: float = Field(2.0, ge=0)
    num_iterations: int = Field(1, gt=0)
    mask_truncated_completions: bool = False
    max_completion_length: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    generation_kwargs: dict[str, Any] = {}  # extra model.generate arguments (e.g. min_new_tokens, top_k)
    share_prompt_forward: bool = True  # a group's prompt runs once (prefill, log-prob forwards); checked
    format_pattern: Optional[str] = None  # the `format` reward: 1 when the completion matches it in full

    @field_validator("format_pattern")
    @classmethod
    def _pattern(cls, value):
        if value is not None:
            import re

            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class GenerationConfig(Section):
    max_new_tokens: int = Field(128, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = []
    batch_size: int = Field(64, gt=0)
    # lean: metareason.generation.decode's loop (equal to generate token for token, falls back to it for
    # settings it does not implement), its one-token steps through metareason.generation.decode_step for
    # Llama/Qwen2/Qwen3/Mistral models; lean_model: that loop calling the model's forward every
    # step; hf: always the model's own generate
    decoder: Literal["lean", "lean_model", "hf"] = "lean"


class EvalConfig(Section):
    at_end: bool = True
    max_samples: Optional[int] = Field(None, gt=0)


class ScaleConfig(Section):
    """Scale-out on a Ray cluster (``metareason run CONFIG --ray [ADDRESS|local]``; docs/scale.md).

    SFT: ``num_workers`` data-parallel Ray Train workers. GRPO: ``num_workers`` rollout actors
    (the learner stays in the driver). Sweeps: ``resources_per_worker`` is each trial's share.
    """

    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False  # SFT workers and rollout actors get one GPU each (nccl instead of gloo)
    resources_per_worker: dict[str, float] = {}  # e.g. {CPU: 2}; default: 1 CPU (+1 GPU with use_gpu)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=0)  # SFT: worker-group restarts from the last checkpoint
    max_restarts: int = Field(1, ge=0)  # GRPO: restarts of a dead rollout actor (it re-fetches the weights)
    get_timeout_s: float = Field(600.0, gt=0)  # every ray.get of a rollout shard / weights
    storage_path: Optional[str] = None  # Ray Train storage; default: RUN_DIR/ray


class GeneratorSpec(BaseModel):
    """One entry of ``generators:``; the fields besides ``type`` are the backend's own (checked
    by its config model when the generator is built; see metareason.generators)."""

    model_config = ConfigDict(extra="allow")
    type: str


class KernelConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    plugins: Optional[list[str]] = None  # None: every installed plugin
    quiet: bool = False
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    generation: GenerationConfig = GenerationConfig()
    eval: EvalConfig = EvalConfig()
    rl: RLConfig = RLConfig()
    generators: dict[str, GeneratorSpec] = {}  # name -> {type: local|openai|python|<plugin type>, ...}
    scale: ScaleConfig = ScaleConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:  # one path component: output_dir/NAME never leaves output_dir
        if (v in ("", ".", "..") or "/" in v or "\\" in v or any(ord(c) < 32 or ord(c) == 127 for c in v)
                or v.startswith("-") or v != v.strip() or len(v.encode("utf-8", "surrogatepass")) > 255):
            raise ValueError("must be one path component: a directory name, not '.' or '..', without '/', "
                             "'\\' or control characters, no leading '-' or surrounding spaces, at most 255 bytes")
        return v

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


RunConfig = KernelConfig  # the resolved class is KernelConfig extended with plugin sections


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str], source: str = "override") -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: {item!r}: expected KEY=VALUE (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"{source}: {item!r}: empty field name")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """``source: field.path: message``; ``prefix`` is the path of the validated model in the config."""
    return f"{source}: {describe_validation_error(err, prefix)}"


def describe_validation_error(err: ValidationError, prefix: str = "") -> str:
    """``field.path: message`` of the first error (``(and N more)`` when there are others)."""
    errors = err.errors()
    first = errors[0]
    loc = _format_loc(tuple(first.get("loc", ())))
    if prefix:
        loc = prefix if loc == "<root>" else f"{prefix}.{loc}"
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "field required"
    else:
        msg = first.get("msg", "invalid value")
        if "input" in first and first.get("type") not in ("model_type", "dict_type"):
            msg += f" (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}"


def build_config_class(sections: dict[str, type[BaseModel]]) -> type[KernelConfig]:
    """KernelConfig extended with plugin sections (each defaulted)."""
    if not sections:
        return KernelConfig
    clash = set(sections) & set(KernelConfig.model_fields)
    if clash:
        raise ConfigError(f"plugin config section {sorted(clash)[0]!r} clashes with a kernel section")
    fields = {name: (model, model()) for name, model in sections.items()}
    return create_model("RunConfig", __base__=KernelConfig, **fields)  # type: ignore[call-overload]


def validate_config(data: dict, sections: dict[str, type[BaseModel]], source: str) -> KernelConfig:
    cls = build_config_class(sections)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def resolve_plugins(data: dict) -> Optional[list[str]]:
    from metareason.plugin_manager import enabled_from_env

    env = enabled_from_env()
    if env is not None:
        return env
    value = data.get("plugins")
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigError("plugins: must be a list of plugin names")
    return value


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None,
                data: Optional[dict] = None, source: Optional[str] = None):
    """Read, override and validate a run config; returns ``(config, plugin_manager)``.

    The plugin manager is built from the config's ``plugins`` list (or ``METAREASON_PLUGINS``)
    because plugin sections are part of validation.
    """
    from metareason.plugin_manager import PluginError, build_plugin_manager

    source = source or (str(path) if path is not None else "config")
    raw = read_yaml(path) if path is not None else copy.deepcopy(data or {})
    raw = apply_overrides(raw, overrides or [], source)
    try:
        pm = build_plugin_manager(resolve_plugins(raw))
    except PluginError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    sections: dict[str, type[BaseModel]] = {}
    for contributed in pm.hook.metareason_config_sections():
        for name, model in (contributed or {}).items():
            if name in sections:
                raise ConfigError(f"{source}: config section {name!r} is contributed by two plugins")
            sections[name] = model
    config = validate_config(raw, sections, source)
    config._source = source  # type: ignore[attr-defined]  # read through config_source()
    return config, pm


def config_source(config: Any) -> str:
    """What error messages name for a loaded config: its file, or ``config`` (a dict's default)."""
    return getattr(config, "_source", "config")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
