"""Fused output projection + token cross-entropy / selective log-softmax, in chunks of tokens.

Neither function materialises the ``[tokens, vocab]`` logits: each chunk of ``chunk_tokens``
rows computes its logits (``F.linear`` in the inputs' dtype, then fp32, as the reference),
reduces them to one number per token and drops them. The largest temporary is one chunk's
``[chunk, V]`` (fp32, plus its gradient in backward).

* :func:`linear_cross_entropy` (the SFT loss): ignored targets are dropped before the
  projection (no logits for prompt or padding tokens), and because the loss is a scalar the
  gradients of the hidden states, the weight and the bias are computed in the forward, chunk
  by chunk (``softmax - onehot``), and only scaled by the incoming gradient in backward: the
  same three GEMMs per chunk as the unfused forward + backward, no recomputation.
* :func:`linear_token_logps` (GRPO's per-token log-probs of sampled tokens, with temperature
  and optionally the entropies): the incoming gradient is per token and unknown at forward
  time, so backward recomputes each chunk's logits from the saved hidden states and
  accumulates the weight's (and bias's) gradient over chunks in fp32.

Under autocast the inputs are cast to the autocast dtype first (what ``F.linear`` does under
autocast), and the op itself runs with autocast off. Backends: ``reference`` (the unfused
spec); ``cpu`` / ``cuda``: this chunked implementation on CPU / CUDA tensors (torch's GEMMs are
the kernel: measured in docs/ops.md, a compiled epilogue would not pay on the CPU); ``triton``:
the same chunks and GEMMs with each chunk's softmax / loss / gradient epilogue in Triton
(``triton_kernel.py``, in place on the chunk's logits). Triton runs on CUDA tensors (on the CPU
only forced under ``TRITON_INTERPRET=1``, for the tests), and only when forced
(``backend="triton"`` / ``METAREASON_OPS=triton``): dispatch takes ``cuda`` first, until
``scripts/gpu-check.sh`` has measured the kernel on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import metareason.ops._dispatch as _dispatch
from metareason.ops.linear_ce.reference import (IGNORE_INDEX, REDUCTIONS, linear_cross_entropy_reference,
                                                linear_token_logps_reference)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# one chunk's fp32 logits hold about this many elements (64 MiB), at least 128 rows: the weight
# gradient is a GEMM over the chunk's rows and each chunk reads and writes the whole [V, H]
# buffer, so short chunks are slower on the CPU (docs/ops.md)
CHUNK_ELEMENTS = 1 << 24


def default_chunk(vocab: int) -> int:
    return max(128, CHUNK_ELEMENTS // max(vocab, 1))


def _why_not(device: torch.device, explicit: Optional[str] = None) -> dict[str, Optional[str]]:
    return _dispatch.torch_code_why_not(device, _dispatch.triton_why_not(device, explicit))


def _check(hidden, weight, bias, targets, chunk_tokens) -> None:
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] do not match: {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    if hidden.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise ValueError(f"hidden / weight: expected floating tensors, got {hidden.dtype}, {weight.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match hidden's {tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets: expected an integer tensor, got {targets.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias: expected a [{weight.shape[0]}] tensor or None")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: on {t.device}, but hidden is on {hidden.device}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens: expected an int >= 1 or None, got {chunk_tokens!r}")


def _autocast_cast(hidden, weight, bias):
    """The inputs as ``F.linear`` would see them under the current autocast state."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} does not match hidden's {hidden.dtype} (outside autocast)")
    return hidden, weight, bias


def _chunk_logits(h, weight, bias, temperature):
    z = F.linear(h, weight, bias)  # a fresh tensor either way: in-place ops below are safe
    z = z if z.dtype == torch.float64 else z.float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _accumulate(gw, gb, gl, h, first: bool):
    """``gw += gl.T @ h`` and ``gb += gl.sum(0)`` into fp32 buffers (``first``: they hold garbage)."""
    if gw is not None:
        if gw.dtype == gl.dtype:
            torch.mm(gl.t(), h, out=gw) if first else gw.addmm_(gl.t(), h)
        else:
            gw.copy_(torch.mm(gl.t(), h)) if first else gw.add_(torch.mm(gl.t(), h))
    if gb is not None:
        torch.sum(gl, 0, dtype=gb.dtype, out=gb) if first else gb.add_(gl.sum(0, dtype=gb.dtype))


def _grad_buffers(weight, bias, need_w, need_b):
    """Uninitialised fp32 (fp64) gradient buffers: the first chunk writes them, later ones add;
    zeros when there is no chunk at all."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    gw = torch.empty(weight.shape, dtype=acc, device=weight.device) if need_w else None
    gb = torch.empty(weight.shape[0], dtype=acc, device=weight.device) if need_b and bias is not None else None
    return gw, gb


def _zero_if_empty(n, *bufs):
    if n == 0:
        for b in bufs:
            if b is not None:
                b.zero_()


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of the token cross-entropies; gradients computed in forward, scaled in backward
    (in place: this graph can be backpropagated once; ``retain_graph`` does not change that)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, grad_mode, use_triton=False):
        # needs_input_grad says requires_grad even under no_grad: ``grad_mode`` is the caller's
        need_h, need_w, need_b = (grad_mode and need for need in ctx.needs_input_grad[:3])
        grads = need_h or need_w or need_b
        gh = torch.empty_like(hidden) if need_h else None
        gw, gb = _grad_buffers(weight, bias, need_w, need_b)
        total = torch.zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                            device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s: s + chunk], targets[s: s + chunk, None]
            z = _chunk_logits(h, weight, bias, 1.0)
            if use_triton:  # loss rows, and z becomes softmax - onehot in place
                from metareason.ops.linear_ce.triton_kernel import ce_rows_

                total += ce_rows_(z, targets[s: s + chunk], grads).sum()
                if grads:
                    gl = z.to(hidden.dtype)
                    if gh is not None:
                        torch.mm(gl, weight, out=gh[s: s + chunk])
                    _accumulate(gw, gb, gl, h, first=s == 0)
                    del gl
                del z
                continue
            picked = z.gather(1, t)
            m = z.amax(dim=-1, keepdim=True)
            e = z.sub_(m).exp_()  # in place of the logits: one exp per logit, one [chunk, V] buffer
            sum_e = e.sum(dim=-1, keepdim=True)
            total += (m + sum_e.log() - picked).sum()  # logsumexp - logit[target]
            if not grads:
                del z, e
                continue
            g = e.div_(sum_e)  # softmax
            g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))  # - onehot
            gl = g.to(hidden.dtype)
            if gh is not None:
                torch.mm(gl, weight, out=gh[s: s + chunk])
            _accumulate(gw, gb, gl, h, first=s == 0)
            del z, e, g, gl  # before the next chunk's logits exist: one [chunk, V] buffer at a time
        _zero_if_empty(hidden.shape[0], gw, gb)
        # kept on ctx, not saved for backward: backward scales them in place (no second weight-sized
        # buffer), so a second backward through this graph is refused below
        ctx.grads, ctx.dtypes = (gh, gw, gb), (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: this graph was already backpropagated (its gradients are "
                               "computed in forward and scaled in place by backward); compute the loss again")
        (gh, gw, gb), (wd, bd) = ctx.grads, ctx.dtypes
        ctx.grads = None
        return (None if gh is None else gh.mul_(g.to(gh.dtype)),
                None if gw is None else gw.mul_(g).to(wd),
                None if gb is None else gb.mul_(g).to(bd), None, None, None, None)


class _LinearTokenLogps(torch.autograd.Function):
    """Per-token ``log softmax(z)[target]`` (and entropies), ``z = logits / T``; backward
    recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, want_entropy, chunk, use_triton=False):
        N = hidden.shape[0]
        fdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logps = torch.empty(N, dtype=fdt, device=hidden.device)
        lse = torch.empty(N, dtype=fdt, device=hidden.device)
        ent = torch.empty(N if want_entropy else 0, dtype=fdt, device=hidden.device)
        for s in range(0, N, chunk):
            z = _chunk_logits(hidden[s: s + chunk], weight, bias, temperature)
            if use_triton:
                from metareason.ops.linear_ce.triton_kernel import logps_rows

                logps_rows(z, targets[s: s + chunk], logps[s: s + chunk], lse[s: s + chunk],
                           ent[s: s + chunk] if want_entropy else None)
                del z
                continue
            log_z = torch.logsumexp(z, dim=-1)
            logps[s: s + chunk] = z.gather(1, targets[s: s + chunk, None]).squeeze(1) - log_z
            lse[s: s + chunk] = log_z
            if want_entropy:
                ent[s: s + chunk] = log_z - (torch.softmax(z, dim=-1) * z).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.chunk, ctx.use_triton = temperature, chunk, use_triton
        ctx.set_materialize_grads(False)
        return logps, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, chunk = ctx.temperature, ctx.chunk
        if g_ent is not None and ent.numel() == 0:
            g_ent = None
        if g_logp is None and g_ent is None:
            return None, None, None, None, None, None, None, None
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        gh = torch.empty_like(hidden) if need_h else None
        gw, gb = _grad_buffers(weight, bias, need_w, need_b)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s: s + chunk], targets[s: s + chunk, None]
                g = g_logp[s: s + chunk, None].to(lse.dtype)
                z = _chunk_logits(h, weight, bias, T)
                lz = lse[s: s + chunk, None]
                if ctx.use_triton:  # z becomes the logits' gradient in place
                    from metareason.ops.linear_ce.triton_kernel import logps_grad_rows_

                    ge = None if g_ent is None else g_ent[s: s + chunk].to(lse.dtype).contiguous()
                    logps_grad_rows_(z, targets[s: s + chunk], lse[s: s + chunk], g[:, 0].contiguous(), ge,
                                     None if ge is None else ent[s: s + chunk], T)
                    grad = z
                elif g_ent is not None:
                    grad = (z - lz).exp_()  # p
                    # d logp / dz = onehot - p;  d H / dz = -p * (z - E_p[z]),  E_p[z] = lse - H
                    mean_z = lz - ent[s: s + chunk, None]
                    z.sub_(mean_z).mul_(g_ent[s: s + chunk, None].to(z.dtype)).add_(g)
                    grad.mul_(z).neg_()
                else:
                    grad = z.sub_(lz).exp_().mul_(-g)  # -g * softmax, in place of the logits
                if not ctx.use_triton:
                    grad.scatter_add_(1, t, g)
                    if T != 1.0:
                        grad.div_(T)
                gl = grad.to(hidden.dtype)
                if gh is not None:
                    torch.mm(gl, weight, out=gh[s: s + chunk])
                _accumulate(gw, gb, gl, h, first=s == 0)
                del z, grad, gl
            _zero_if_empty(hidden.shape[0], gw, gb)
        return (gh, None if gw is None else gw.to(weight.dtype), None if gb is None else gb.to(bias.dtype),
                None, None, None, None, None)


def _flat(hidden, targets):
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = IGNORE_INDEX,
                         reduction: str = "mean", chunk_tokens: Optional[int] = None,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Token cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets``, never
    materialising the logits.

    ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]`` or None, ``targets [...]`` (int;
    ``ignore_index`` rows are left out). ``reduction``: ``sum``, or ``mean`` = sum / max(n, 1)
    over the ``n`` non-ignored targets (0 when there are none). fp32 scalar (fp64 for fp64
    inputs). ``chunk_tokens``: rows per chunk (default ``2**21 // V``, at least 64).
    """
    _check(hidden, weight, bias, targets, chunk_tokens)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    name = _dispatch.select("linear_ce", _why_not(hidden.device, backend), backend)
    if name == "reference":
        return linear_cross_entropy_reference(hidden, weight, targets, bias, ignore_index, reduction)
    h, t = _flat(hidden, targets)
    keep = t != ignore_index
    n = int(keep.sum())
    if n < t.numel():  # drop ignored rows before the projection: no logits for them at all
        idx = keep.nonzero().squeeze(1)
        h, t = h.index_select(0, idx), t.index_select(0, idx)
    h, w, b = _autocast_cast(h, weight, bias)
    chunk = chunk_tokens or default_chunk(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        total = _LinearCrossEntropy.apply(h, w, b, t, chunk, torch.is_grad_enabled(), name == "triton")
    return total if reduction == "sum" else total / max(n, 1)


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                       return_entropy: bool = False, chunk_tokens: Optional[int] = None,
                       backend: Optional[str] = None):
    """``log softmax(F.linear(hidden, weight, bias) / temperature)[targets]`` per token, never
    materialising the logits; fp32, shaped like ``targets``. With ``return_entropy``:
    ``(logps, entropies)`` (entropy of ``softmax(logits / T)``), both differentiable.
    """
    _check(hidden, weight, bias, targets, chunk_tokens)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    name = _dispatch.select("linear_ce", _why_not(hidden.device, backend), backend)
    if name == "reference":
        return linear_token_logps_reference(hidden, weight, targets, bias, temperature, return_entropy)
    h, t = _flat(hidden, targets)
    h, w, b = _autocast_cast(h, weight, bias)
    chunk = chunk_tokens or default_chunk(weight.shape[0])
    with torch.autocast(h.device.type, enabled=False):
        logps, ent = _LinearTokenLogps.apply(h, w, b, t, float(temperature), bool(return_entropy), chunk,
                                             name == "triton")
    logps = logps.view(targets.shape)
    return (logps, ent.view(targets.shape)) if return_entropy else logps
