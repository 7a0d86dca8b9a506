"""Controlled A/B training runs for the group-B investigation (issue #19).

Replicates the kernel SFT loop (same data stream, optimizer, schedule, loss) on a config from
configs/lru, and adds: teacher-forced eval loss + teacher-forced exact match per level (every
completion token the argmax under teacher forcing == greedy decoding reproduces the gold
completion exactly), and diagnostics (attention-block output RMS, attention entropy, grad norms of
the attention parameters).

    OMP_NUM_THREADS=1 python scripts/lru/b_diagnosis.py CONFIG --steps 300 --tag a_s0 [--lr 2e-3] [--seed 0] [--variant X]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from metareason.kernel import Kernel
from metareason.data.tokenize import IGNORE_INDEX, SFTStream, collate, encode_examples
from metareason.train.loop import load_train_examples, seed_everything
from metareason.train.optim import build_optimizer, build_scheduler
from metareason.train.sft import token_loss

p = argparse.ArgumentParser()
p.add_argument("config")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--lr", type=float, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--variant", default="base")
p.add_argument("--tag", required=True)
p.add_argument("--eval_every", type=int, default=100)
p.add_argument("--n_eval", type=int, default=200)
p.add_argument("--out", default="runs/lru-b-diagnosis/results")
p.add_argument("--set", nargs="*", default=[])
args = p.parse_args()

overrides = [f"train.max_steps={args.steps}", f"train.seed={args.seed}", "output_dir=runs/lru-b-diagnosis/runs",
             f"name={args.tag}"] + args.set
if args.lr:
    overrides.append(f"train.lr={args.lr}")
kernel = Kernel(args.config, overrides)
cfg, tc = kernel.config, kernel.config.train
seed_everything(tc.seed)


model, tok = kernel.load()


def apply_variant(model, variant):
    """Diagnostic B variants (monkeypatched; not proposals for the code)."""
    import types
    from metareason.plugins.lru.rope import apply_rope, rope_cos_sin
    from metareason.plugins.lru import mla_attention as ma
    if variant == "base":
        return
    for layer in model.model.layers:
        a = layer.self_attn
        if variant in ("nonorm", "fullrope+nonorm"):  # no RMSNorm on c_q / c_kv
            a.kv_norm = torch.nn.Identity()
            if hasattr(a, "q_norm"):
                a.q_norm = torch.nn.Identity()
        if variant in ("fullrope", "fullrope+nonorm"):  # RoPE also on the nope dims (training path only: positions 0..T-1)
            orig = ma.MLAAttention._expanded

            def _expanded(self, q_nope, q_rope, latent, k_rope, mask, output_attentions, dropout, _orig=orig):
                c = self.config
                B, T = latent.shape[:2]
                H = self.num_heads
                pos = torch.arange(T)[None]
                cos, sin = rope_cos_sin(pos, c.nope_head_dim, c.rope_theta, q_nope.dtype)
                kn = self.W_UK(latent).view(B, T, H, c.nope_head_dim).transpose(1, 2)
                kn = apply_rope(kn, cos, sin)
                qn = apply_rope(q_nope, cos, sin)
                v = self.W_UV(latent).view(B, T, H, c.v_head_dim).transpose(1, 2)
                k = torch.cat([kn, k_rope[:, None].expand(B, H, T, c.rope_head_dim)], dim=-1)
                q = torch.cat([qn, q_rope], dim=-1)
                if output_attentions:
                    w = self._softmax((q @ k.transpose(-1, -2)) * c.softmax_scale, mask, dropout)
                    return w @ v, w
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                      scale=c.softmax_scale), None
            a._expanded = types.MethodType(_expanded, a)
        if variant not in ("nonorm", "fullrope", "fullrope+nonorm"):
            raise SystemExit(f"unknown variant {variant}")


apply_variant(model, args.variant)
nparams = sum(p.numel() for p in model.parameters())
print(f"[{args.tag}] params {nparams} tied={model.lm_head.weight is model.get_input_embeddings().weight}",
      flush=True)

examples = load_train_examples(kernel)
enc = encode_examples(tok, [e["prompt"] for e in examples], [e["completion"] for e in examples], cfg.data.max_length)
stream = SFTStream(examples, enc, tc.batch_size, tc.seed, tok.pad_token_id, tc.group_by_length)

# held-out eval set (teacher-forced)
ev = []
for i, spec in enumerate(cfg.data.eval):
    task = kernel.build_task(spec, field=f"data.eval[{i}]")
    ev.extend(dict(task[j]) for j in range(len(task)))
ev = ev[: args.n_eval] if args.n_eval < len(ev) else ev
ev_enc = encode_examples(tok, [e["prompt"] for e in ev], [e["completion"] for e in ev], cfg.data.max_length)
ev_levels = [int(e.get("level", e.get("meta", {}).get("level", 0)) if isinstance(e.get("meta", {}), dict) else 0)
             for e in ev]


def level_of(e):
    for k in ("level",):
        if k in e:
            return int(e[k])
    for k in ("metadata", "meta", "info"):
        if isinstance(e.get(k), dict) and "level" in e[k]:
            return int(e[k]["level"])
    return 0


ev_levels = [level_of(e) for e in ev]


@torch.no_grad()
def evaluate():
    model.eval()
    tot, n, exact = 0.0, 0, {}
    for s in range(0, len(ev), 50):
        rows = ev_enc.input_ids[s:s + 50]
        b = collate(rows, ev_enc.prompt_lengths[s:s + 50], tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], use_cache=False).logits
        loss, k = token_loss(logits, b["labels"])
        tot += float(loss) * k
        n += k
        shifted = torch.full_like(b["labels"], IGNORE_INDEX)
        shifted[:, :-1] = b["labels"][:, 1:]
        ok = ((logits.argmax(-1) == shifted) | (shifted == IGNORE_INDEX)).all(-1)
        for j, o in enumerate(ok.tolist()):
            lv = ev_levels[s + j]
            exact.setdefault(lv, []).append(o)
    model.train()
    return tot / n, {f"L{k}": round(sum(v) / len(v), 3) for k, v in sorted(exact.items())}


def attn_modules():
    return [layer.self_attn for layer in model.model.layers]


@torch.no_grad()
def diagnostics():
    """Attention-block output RMS and residual-stream RMS per layer, attention entropy per layer."""
    model.eval()
    b = collate(ev_enc.input_ids[:32], ev_enc.prompt_lengths[:32], tok.pad_token_id)
    outs = []
    hooks = [(getattr(m, "W_O", None) or m.o_proj).register_forward_hook(
        lambda mod, i, o: outs.append(float(o.pow(2).mean().sqrt()))) for m in attn_modules()]
    try:
        if hasattr(model, "set_attn_implementation"):
            try:
                model.set_attn_implementation("eager")
            except Exception:
                pass
        r = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                  output_attentions=True, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
        if hasattr(model, "set_attn_implementation") and model.config.model_type == "llama":
            model.set_attn_implementation("sdpa")
    m = b["attention_mask"].bool()
    ent = []
    if r.attentions:
        for a in r.attentions:
            e = -(a.clamp_min(1e-12).log() * a).sum(-1)  # [B,H,S]
            ent.append(round(float(e.mean(1)[m].mean()), 3))
    hid = [round(float(h[m].pow(2).mean().sqrt()), 3) for h in r.hidden_states[:-1]]
    model.train()
    return {"attn_out_rms": [round(x, 4) for x in outs], "attn_entropy": ent, "resid_rms": hid}


def grad_groups():
    g = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if ".self_attn." in name:
            key = "attn"
        elif ".mlp." in name:
            key = "mlp"
        elif "embed" in name or "lm_head" in name:
            key = "embed"
        else:
            key = "norm"
        g[key] = g.get(key, 0.0) + float(p.grad.pow(2).sum())
    return {k: round(math.sqrt(v), 4) for k, v in g.items()}


def attn_param_grads():
    out = {}
    for name, p in model.model.layers[0].self_attn.named_parameters():
        if p.grad is not None:
            out[name] = (round(float(p.grad.norm()), 5), round(float(p.detach().norm()), 3))
    return out


optimizer = build_optimizer(model, tc)
scheduler = build_scheduler(optimizer, tc)
log = {"tag": args.tag, "config": args.config, "lr": tc.lr, "seed": tc.seed, "variant": args.variant,
       "steps": args.steps, "params": nparams, "train": [], "eval": [], "diag": {}, "grads": {}}
log["diag"][0] = diagnostics()
el, ex = evaluate()
log["eval"].append((0, round(el, 4), ex))
t0 = time.time()
window = []
model.train()
for step in range(1, tc.max_steps + 1):
    batch = stream.next_batch()
    out = model(input_ids=batch["input_ids"], use_cache=False)
    loss, _ = token_loss(out.logits, batch["labels"])
    loss.backward()
    if step in (1, 50, 200) or step == tc.max_steps:
        log["grads"][step] = {"groups": grad_groups(), "layer0_attn": attn_param_grads()}
    gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    window.append(float(loss))
    if step % 25 == 0:
        log["train"].append((step, round(sum(window) / len(window), 4), round(gn, 3)))
        window = []
    if step % args.eval_every == 0 or step == tc.max_steps:
        el, ex = evaluate()
        log["eval"].append((step, round(el, 4), ex))
        print(f"[{args.tag}] step {step} train {log['train'][-1][1]} eval {el:.4f} tf-exact {ex} "
              f"{time.time() - t0:.0f}s", flush=True)
    if step in (100,) or step == tc.max_steps:
        log["diag"][step] = diagnostics()
log["wall_s"] = round(time.time() - t0, 1)
torch.save(model.state_dict(), f"{args.out}/{args.tag}.pt")
with open(f"{args.out}/{args.tag}.json", "w") as f:
    json.dump(log, f, indent=1)
print(f"[{args.tag}] done {log['wall_s']}s diag0 {log['diag'][0]} diagEnd {log['diag'][tc.max_steps]}", flush=True)
