"""A lean decode loop: the model's ``generate`` (greedy or multinomial sampling) without its
per-step machinery, equal to it token for token.

``generate`` spends, per new token, Python time on logits-processor and stopping-criteria
objects, ``prepare_inputs_for_generation`` and growing the KV cache by concatenation; for the
small models of this project that is about a fifth of the sampling time on a CPU (the rest is
the model's own forward). This loop does the same arithmetic directly, under
``torch.inference_mode``:

* the prompt is prefilled once (each distinct prompt once with ``share_prompts``, as
  :func:`metareason.generation.generate.shared_prefill`), then each step is a one-token forward over the
  cache the model returned, with ``logits_to_keep=1``; the layers of a ``DynamicCache`` write
  into buffers reserved for the whole decode instead of growing by ``torch.cat`` each step
  (the attention sees the same keys and values);
* the float32 logits are processed as ``generate``'s processors do, in their order: EOS blocked
  below ``min_new_tokens``/``min_length``, ``suppress_tokens``, then (sampling only) temperature,
  top-k, top-p, each with the same tensor operations so the result is bit-identical;
* the token is drawn with one ``torch.multinomial`` over the whole batch per step (finished rows
  included, exactly as ``generate`` does, so a fixed seed gives the same tokens), or argmax;
* a row finishes on EOS or when the tail of its new text contains a stop string (the check
  ``metareason.generation.generate.StopOnStrings`` makes, for the unfinished rows in one ``batch_decode``);
  finished rows get the pad token; the loop ends when every row has finished;
* the attention mask (preallocated, sliced), position ids and the output buffer are kept
  incrementally; the model gets exactly the inputs ``generate`` would give it (no mask at all
  when nothing is padded, as ``generate`` drops an all-ones mask).

:func:`resolve` reads the settings ``generate`` would use (the model's ``generation_config``
merged with the call's arguments, through ``generate``'s own merge) and returns ``None`` when
they ask for anything this loop does not implement (beams, repetition penalty, a static cache,
a logits processor, ...); :func:`decoder_model` returns ``None`` for a model whose generation
path differs from the plain one (an encoder-decoder, an override of the generation hooks, a
prompt-learning PEFT model). The caller then uses ``generate``.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch

from metareason.generation.decode_step import DecodeStep
from metareason.generation.prefill import shared_prefill
from metareason.models.compat import CACHE_KWARG

#: generation-config fields the loop implements
HANDLED = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
           "top_p", "suppress_tokens", "pad_token_id", "bos_token_id", "eos_token_id"}
#: fields that cannot change greedy/sampled tokens (beam-only, assisted-decoding-only, output format)
IGNORED = {"early_stopping", "length_penalty", "cache_config", "max_cache_len", "output_scores", "output_logits",
           "return_dict_in_generate", "decoder_start_token_id", "num_assistant_tokens",
           "num_assistant_tokens_schedule", "assistant_confidence_threshold", "max_matching_ngram_size",
           "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "compile_config",
           "disable_compile", "continuous_batching_config", "low_memory", "_from_model_config",
           "transformers_version"}
#: every other field must hold one of its neutral values (None alone when not listed)
NEUTRAL: dict[str, tuple] = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "num_beam_groups": (None, 1),
    "use_cache": (None, True), "use_mtp": (None, False), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "renormalize_logits": (None, False), "remove_invalid_values": (None, False),
    "token_healing": (None, False), "guidance_scale": (None, 1.0), "output_attentions": (None, False),
    "output_hidden_states": (None, False), "is_assistant": (None, False), "diversity_penalty": (None, 0.0),
}
#: generation hooks a model may override; the loop reproduces the GenerationMixin versions only
GENERATION_HOOKS = ("prepare_inputs_for_generation", "_update_model_kwargs_for_generation", "_sample", "_prefill",
                    "_prepare_cache_for_generation", "_get_logits_processor")


@dataclass(frozen=True)
class Sampling:
    """What one ``generate`` call would do, resolved (see :func:`resolve`)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: Optional[float] = None  # applied only when sampling and != 1
    top_k: Optional[int] = None  # applied only when sampling and > 0
    top_p: Optional[float] = None  # applied only when sampling and < 1
    min_new_tokens: int = 0  # EOS blocked while fewer tokens were generated
    min_length: int = 0  # EOS blocked while prompt width + generated < min_length
    suppress_tokens: tuple[int, ...] = ()
    eos: tuple[int, ...] = ()
    pad: Optional[int] = None


def decoder_model(model) -> Optional[torch.nn.Module]:
    """The module the loop drives (a LoRA-type PEFT model's base model, whose layers carry the
    adapters), or ``None`` when ``generate`` on ``model`` does something the loop does not."""
    peft = sys.modules.get("peft")  # not imported: the model cannot be a PEFT model (importing it is slow)
    if peft is not None and isinstance(model, peft.PeftModel):
        config = model.active_peft_config
        if config.is_prompt_learning or getattr(config, "alora_invocation_tokens", None) or \
                str(getattr(config.peft_type, "value", config.peft_type)) == "POLY":
            return None
        model = model.get_base_model()
    from transformers import GenerationMixin

    if not isinstance(model, GenerationMixin) or getattr(model.config, "is_encoder_decoder", False):
        return None
    cls = type(model)
    if any(getattr(cls, name, None) is not getattr(GenerationMixin, name, None) for name in GENERATION_HOOKS):
        return None
    try:
        if not model._supports_default_dynamic_cache():
            return None
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if CACHE_KWARG not in params and not takes_kwargs:
        return None
    return model


def resolve(model, **kwargs: Any) -> Optional[Sampling]:
    """The settings ``model.generate(**kwargs)`` would use, through ``generate``'s own merge of
    the model's ``generation_config`` with ``kwargs``; ``None`` when they need ``generate``
    (an argument that is not a generation setting, or a setting the loop does not implement)."""
    try:
        gc, model_kwargs = model._prepare_generation_config(None, **kwargs)
    except Exception:  # noqa: BLE001 - whatever generate would say about it, generate should say
        return None
    if model_kwargs or gc.max_new_tokens is None:
        return None
    for key, value in gc.to_dict().items():
        if key in HANDLED or key in IGNORED:
            continue
        if not any(value == ok and type(value) is type(ok) or value is ok for ok in NEUTRAL.get(key, (None,))):
            return None
    eos = gc.eos_token_id
    eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
    sample = bool(gc.do_sample)
    if sample and gc.temperature is not None and not isinstance(gc.temperature, float):
        return None  # generate's TemperatureLogitsWarper refuses it; let it say so
    return Sampling(
        max_new_tokens=int(gc.max_new_tokens), do_sample=sample,
        temperature=gc.temperature if sample and gc.temperature is not None and gc.temperature != 1.0 else None,
        top_k=int(gc.top_k) if sample and gc.top_k is not None and gc.top_k != 0 else None,
        top_p=float(gc.top_p) if sample and gc.top_p is not None and gc.top_p < 1.0 else None,
        min_new_tokens=int(gc.min_new_tokens or 0), min_length=int(gc.min_length or 0),
        suppress_tokens=tuple(int(t) for t in (gc.suppress_tokens or ())), eos=eos,
        pad=None if pad is None else int(pad))


class StopStrings:
    """Which unfinished rows' new text ends a stop string: the last ``max(len) + 8`` generated
    tokens of each, decoded in one ``batch_decode`` (``StopOnStrings``' check, incrementally)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.tail = max(len(s) for s in self.stops) + 8

    def __call__(self, generated: torch.Tensor, rows: list[int], end: int) -> list[int]:
        """Rows (of ``rows``) whose ``generated[row, :end]`` tail contains a stop string."""
        window = generated[rows, max(0, end - self.tail): end].tolist()
        texts = self.tokenizer.batch_decode(window, skip_special_tokens=False)
        return [r for r, text in zip(rows, texts) if any(s in text for s in self.stops)]


def _forward_kwargs(model) -> tuple[bool, bool]:
    params = inspect.signature(model.forward).parameters
    return "position_ids" in params, "logits_to_keep" in params


def _cache_of(outputs):
    cache = getattr(outputs, CACHE_KWARG, None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def _empty_cache(model):
    from transformers import DynamicCache

    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return DynamicCache(config=config)


def _reserve(cache, capacity: int) -> None:
    """Let each plain ``DynamicLayer`` of ``cache`` grow in place into a buffer of ``capacity``
    positions instead of concatenating every step (the same values and shapes, no copy)."""
    if _GrowingLayer is None:  # pragma: no cover - a cache API without DynamicLayer: keep concatenating
        return
    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer and getattr(layer, "is_initialized", False) and layer.keys.dim() == 4 \
                and layer.keys.numel():
            layer.__class__ = _GrowingLayer
            layer.reserve(capacity)


try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover
    DynamicLayer = _GrowingLayer = None
else:
    class _GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views of preallocated buffers: ``update``
        writes the new positions in place and returns the same tensors ``torch.cat`` would."""

        def reserve(self, capacity: int) -> None:
            n = self.keys.shape[-2]
            capacity = max(capacity, n)
            self._k = self.keys.new_empty(*self.keys.shape[:-2], capacity, self.keys.shape[-1])
            self._v = self.values.new_empty(*self.values.shape[:-2], capacity, self.values.shape[-1])
            self._k[..., :n, :] = self.keys
            self._v[..., :n, :] = self.values
            self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]  # decode() reserves all it will write
            self._k[..., n: n + m, :] = key_states
            self._v[..., n: n + m, :] = value_states
            self.keys, self.values = self._k[..., : n + m, :], self._v[..., : n + m, :]
            return self.keys, self.values


def _all_growing(cache, model) -> bool:
    """Every layer of ``cache`` writes into reserved buffers (what :class:`DecodeStep` updates)."""
    layers = getattr(cache, "layers", None)
    n = getattr(model.config, "num_hidden_layers", None)
    return bool(layers) and _GrowingLayer is not None and len(layers) == n and \
        all(type(layer) is _GrowingLayer for layer in layers)


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling, *,
           share_prompts: bool = False, stop: Optional[StopStrings] = None,
           return_logprobs: bool = False, step_forward: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """New tokens ``[B, T]`` (``T <= max_new_tokens``: the loop stops when every row finished; a
    finished row holds the pad token) and, with ``return_logprobs``, their log-probabilities
    under the processed distribution ``[B, T]`` (``compute_transition_scores(...,
    normalize_logits=True)``). ``input_ids``/``attention_mask``: a left-padded prompt batch.
    ``model`` must be a :func:`decoder_model`; it is not put in eval mode here. With
    ``step_forward`` the one-token steps of a Llama-family model run through
    :class:`metareason.generation.decode_step.DecodeStep` (the same arithmetic, bit-identical logits)
    instead of ``model(...)``."""
    s = sampling
    B, P = input_ids.shape
    device = input_ids.device
    takes_positions, takes_keep = _forward_kwargs(model)
    extra = {"use_cache": True}
    if takes_keep:
        extra["logits_to_keep"] = 1
    padded = not bool(attention_mask.all())
    mask = None
    if padded:  # generate drops an all-ones mask and never grows it
        mask = torch.ones((B, P + s.max_new_tokens), dtype=attention_mask.dtype, device=device)
        mask[:, :P] = attention_mask
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)

    def forward(ids: torch.Tensor, cache, pos: torch.Tensor, width: int):
        kwargs = dict(extra, **{CACHE_KWARG: cache})
        if takes_positions:
            kwargs["position_ids"] = pos
        if mask is not None:
            kwargs["attention_mask"] = mask[:, :width]
        return model(input_ids=ids, return_dict=True, **kwargs)

    cache = shared_prefill(model, input_ids, attention_mask) if share_prompts else None
    if cache is not None and cache.get_seq_length() == 0:
        cache = None  # the model kept its own cache type (e.g. a paged one): generate then prefills all
    if cache is not None:
        outputs = forward(input_ids[:, -1:], cache, positions[:, -1:], P)
    else:
        outputs = forward(input_ids, _empty_cache(model), positions, P)
    pos = positions[:, -1:]

    # processing masks, built once (generate's processors rebuild them every step)
    vocab = outputs.logits.shape[-1]
    eos = torch.tensor(s.eos, dtype=torch.long, device=device)
    suppress = torch.zeros(vocab, dtype=torch.bool, device=device)
    if s.suppress_tokens:
        suppress[torch.tensor(s.suppress_tokens, dtype=torch.long, device=device)] = True
    early = suppress.clone()
    if s.eos:
        early[eos] = True
    block_eos_steps = 0
    if s.eos:
        if s.min_new_tokens > 0:
            block_eos_steps = s.min_new_tokens
        if s.min_length > 0:
            block_eos_steps = max(block_eos_steps, s.min_length - P)
    any_suppress = bool(s.suppress_tokens)
    top_k = min(s.top_k, vocab) if s.top_k else None

    out = torch.full((B, s.max_new_tokens), s.pad if s.pad is not None else 0, dtype=torch.long, device=device)
    logps = torch.zeros((B, s.max_new_tokens), dtype=torch.float32, device=device) if return_logprobs else None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    pad = torch.tensor(s.pad if s.pad is not None else 0, dtype=torch.long, device=device)
    single_eos = int(s.eos[0]) if len(s.eos) == 1 else None
    steps = 0
    fast = None  # decode_step.DecodeStep when the model and its cache allow it
    for t in range(s.max_new_tokens):
        if t:
            pos = pos + 1
            if fast is not None:
                logits = fast(out[:, t - 1: t], cache, pos, mask[:, :P + t] if mask is not None else None)
            else:
                outputs = forward(out[:, t - 1: t], cache, pos, P + t)
                cache, logits = _cache_of(outputs), outputs.logits
                del outputs
        else:
            cache, logits = _cache_of(outputs), outputs.logits
            del outputs
            if cache is None:
                raise ValueError(f"{type(model).__name__} returned no KV cache from its forward; the lean decoder "
                                 f"needs one (set generation.decoder: hf)")
            _reserve(cache, P + s.max_new_tokens)
            if step_forward and takes_positions and _all_growing(cache, model):
                fast = DecodeStep.build(model)
        scores = logits[:, -1].to(copy=True, dtype=torch.float32)
        del logits
        if t < block_eos_steps:
            scores.masked_fill_(early, -float("inf"))
        elif any_suppress:
            scores.masked_fill_(suppress, -float("inf"))
        if s.do_sample:
            if s.temperature is not None:
                scores = scores / s.temperature
            if top_k is not None:
                scores = scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], -float("inf"))
            if s.top_p is not None:
                sorted_logits, sorted_indices = torch.sort(scores, descending=False)
                cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
                remove = cumulative <= (1 - s.top_p)
                remove[..., -1:] = 0
                scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), -float("inf"))
            tokens = torch.multinomial(torch.nn.functional.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if s.eos:  # generate pads finished rows only when it has an EOS criterion
            tokens = torch.where(unfinished, tokens, pad)
        out[:, t] = tokens
        if logps is not None:
            logps[:, t] = torch.log_softmax(scores, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        steps = t + 1
        if s.eos:
            unfinished &= (tokens != single_eos) if single_eos is not None else ~torch.isin(tokens, eos)
        if stop is not None:
            rows = unfinished.nonzero().squeeze(1).tolist()
            if rows:
                hit = stop(out, rows, t + 1)
                if hit:
                    unfinished[hit] = False
        if not bool(unfinished.any()):
            break
    return out[:, :steps], (logps[:, :steps] if logps is not None else None)
