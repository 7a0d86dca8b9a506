"""The training loops' activation-lean Llama-family blocks (``train.lean_activations``).

Patches the *forward* of transformers' Llama-family MLPs (``gate_proj`` / ``up_proj`` /
``down_proj``, SiLU) and RMSNorms so that, with gradients on, they call
:func:`metareason.ops.swiglu_down` (saves ``gate`` and ``up``, not ``silu(gate)`` and the
product: 2 x intermediate per token instead of 4) and :func:`metareason.ops.rms_norm` (saves the
input and ``rstd``, not the normalised tensor). Values are the modules' own bit for bit; only
what autograd keeps changes. Under ``no_grad`` (generation, evaluation, old log-probs) the
original forward runs (and :mod:`metareason.generation.decode_step` still bypasses the modules:
:func:`own_forward_without_grad`); parameters and modules are untouched, so state dicts,
checkpoints and exports are the same; :func:`unpatch` restores the forwards. A module whose
forward is already replaced on the instance (accelerate's offload hooks) is left as it is.

Patched: modules of the classes in :data:`MLP_CLASSES` / :data:`NORM_CLASSES` whose
projections are plain ``nn.Linear`` (not PEFT LoRA layers, not bitsandbytes ``Linear4bit`` /
``Linear8bitLt``, which subclass it) and whose activation is SiLU; each class is first checked
on a probe input (the lean forward must give the module's own output exactly), so a
transformers version whose forward differs is left alone. An MLP whose ``down_proj`` carries a
forward hook (or a replaced forward) at call time runs its own forward, so the hook sees the call.
"""
from __future__ import annotations

import importlib
import types
from typing import Optional

import torch
from torch import nn

from metareason.config import ConfigError

# transformers.models.<name>.modeling_<name>: the families whose MLP and RMSNorm forwards are
# LlamaMLP's / LlamaRMSNorm's
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ORIGINAL = "_metareason_original_forward"


def _classes(suffix: str) -> tuple[type, ...]:
    found = []
    for module, prefix in FAMILIES.items():
        try:
            mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        except ImportError:  # pragma: no cover - an older transformers without the family
            continue
        cls = getattr(mod, prefix + suffix, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


MLP_CLASSES = _classes("MLP")
NORM_CLASSES = _classes("RMSNorm")


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _mlp_why_not(m) -> Optional[str]:
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(m, name, None)
        if type(layer) is not nn.Linear:
            kind = f"{type(layer).__module__.split('.')[0]} {type(layer).__name__}"
            return f"{name} is a {kind}, not a plain torch Linear"
    if not _is_silu(getattr(m, "act_fn", None)):
        return f"its activation is {type(getattr(m, 'act_fn', None)).__name__}, not SiLU"
    return None


def _hooked(module) -> bool:
    from torch.nn.modules import module as mod

    return bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)
                or mod._global_forward_hooks or mod._global_forward_pre_hooks)


def lean_mlp(m, x: torch.Tensor) -> torch.Tensor:
    from metareason.ops.swiglu_down import swiglu_down

    if _hooked(m.down_proj):  # the op bypasses down_proj's call: a hook on it must still see it
        return type(m).forward(m, x)
    return swiglu_down(m.gate_proj(x), m.up_proj(x), m.down_proj.weight, m.down_proj.bias)


def lean_norm(m, x: torch.Tensor) -> torch.Tensor:
    from metareason.ops.rms_norm import rms_norm

    return rms_norm(x, m.weight, m.variance_epsilon)


def _patched(lean):
    def forward(self, *args, **kwargs):
        if len(args) != 1 or kwargs or not torch.is_grad_enabled():
            return getattr(self, ORIGINAL)(*args, **kwargs)
        return lean(self, args[0])
    forward.lean_activations = True
    return forward


def own_forward_without_grad(module) -> bool:
    """Whether ``module``'s instance ``forward`` is this patch (so without gradients it runs the
    class's own forward: :mod:`metareason.generation.decode_step` may bypass it as unpatched)."""
    fn = module.__dict__.get("forward")
    return getattr(getattr(fn, "__func__", None), "lean_activations", False) is True


@torch.no_grad()
def _probe(m, lean, width: int) -> bool:
    """Whether ``lean`` gives the module's own forward on a small random input, exactly."""
    p = next(m.parameters())
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 3, width, generator=g).to(device=p.device, dtype=p.dtype)
    try:
        return bool(torch.equal(type(m).forward(m, x), lean(m, x)))
    except Exception:  # noqa: BLE001 - a module the lean forward cannot call is one it does not patch
        return False


def patch(model) -> dict:
    """Patch the model's patchable MLPs and norms in place; returns counts and the reasons
    others were left (``mlps``, ``norms``, ``left``: {reason: count})."""
    done = {"mlps": 0, "norms": 0, "left": {}}
    checked: dict[type, bool] = {}
    for m in model.modules():
        if hasattr(m, ORIGINAL):
            continue
        if isinstance(m, MLP_CLASSES):
            why, lean, key = _mlp_why_not(m), lean_mlp, "mlps"
        elif isinstance(m, NORM_CLASSES):
            why, lean, key = None, lean_norm, "norms"
        else:
            continue
        if why is None and "forward" in vars(m):  # e.g. accelerate's offload: its forward must run
            why = "its forward is already replaced on the instance"
        if why is None:
            if type(m) not in checked:
                width = m.gate_proj.in_features if key == "mlps" else m.weight.shape[-1]
                checked[type(m)] = _probe(m, lean, width)
            if not checked[type(m)]:
                why = f"{type(m).__name__}'s forward is not the one the lean forward reproduces"
        if why is not None:
            done["left"][f"{key[:-1]}: {why}"] = done["left"].get(f"{key[:-1]}: {why}", 0) + 1
            continue
        setattr(m, ORIGINAL, m.forward)
        m.forward = types.MethodType(_patched(lean), m)
        done[key] += 1
    return done


def unpatch(model) -> None:
    """Restore the original forwards."""
    for m in model.modules():
        if hasattr(m, ORIGINAL):
            del m.forward
            delattr(m, ORIGINAL)


def lean_activations_mode(setting, model) -> tuple[bool, str]:
    """Apply ``train.lean_activations`` to the model: (on, a line saying what was patched)."""
    label = f"train.lean_activations={str(setting).lower()}"
    if setting is False:
        return False, f"{label}: off"
    why_not_device = _backend_why_not(model)
    done = {"mlps": 0, "norms": 0, "left": {}} if why_not_device else patch(model)
    on = bool(done["mlps"] or done["norms"])
    if not on:
        why = why_not_device or "; ".join(f"{k} ({n})" for k, n in done["left"].items()) or \
            "no Llama-family MLP or RMSNorm modules"
        if setting is True:
            raise ConfigError(f"train.lean_activations: true, but nothing in this model can be patched ({why}); "
                              "set train.lean_activations: auto or false")
        return False, f"{label}: off ({why})"
    left = sum(done["left"].values())
    line = (f"{label}: on ({done['mlps']} MLPs through swiglu_down, {done['norms']} RMSNorms through rms_norm; "
            f"saved for backward: gate and up, input and rstd")
    if left:
        line += "; left as they are: " + "; ".join(f"{n} {k}" for k, n in done["left"].items())
    return True, line + ")"


def _backend_why_not(model) -> Optional[str]:
    """Why a forced ops backend (``METAREASON_OPS``) cannot run the lean ops here (None: it can)."""
    from metareason.ops import _dispatch
    from metareason.ops.swiglu_down.fused import _why_not

    forced = _dispatch.forced_backend()
    if forced is None:
        return None
    if forced == "reference":
        return f"{_dispatch.ENV}=reference: the ops would run their eager reference, which saves what the modules do"
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return None
    return _why_not(device).get(forced)


__all__ = ["MLP_CLASSES", "NORM_CLASSES", "lean_activations_mode", "lean_mlp", "lean_norm", "own_forward_without_grad",
           "patch", "unpatch"]
