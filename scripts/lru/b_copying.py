"""Per-category teacher-forced loss/accuracy of a saved run (what B has not learned yet).

Categories of completion characters: 'operand' (digits of an expression, copied from an
earlier value), 'result' (digits after the step's second '=', arithmetic), 'answer' (digits after
'answer:'), 'struct' (everything else: variable names, operators, ';', '|', EOS).
    python scripts/lru/b_copying.py TAG CONFIG [overrides]   (TAG: a run saved by b_diagnosis.py)
"""
import sys, json, torch
torch.set_num_threads(1)
import torch.nn.functional as F
from metareason.kernel import Kernel
from metareason.data.tokenize import IGNORE_INDEX, collate, encode_examples

tag, cfgp, *ov = sys.argv[1:]
k = Kernel(cfgp, ov)
model, tok = k.load()
model.load_state_dict(torch.load(f"runs/lru-b-diagnosis/results/{tag}.pt", weights_only=True))
model.eval()
ev = []
for i, spec in enumerate(k.config.data.eval):
    task = k.build_task(spec, field="x")
    ev.extend(dict(task[j]) for j in range(len(task)))
ev = ev[:200]


def cats(c):
    out, seg_eq, after_answer = [], 0, False
    for i, ch in enumerate(c):
        if ch in ";|":
            seg_eq, after_answer = 0, False
            out.append("struct")
            continue
        if c[:i].endswith("answer:"):
            after_answer = True
        if ch == "=":
            seg_eq += 1
            out.append("struct")
        elif ch.isdigit():
            out.append("answer" if after_answer else ("result" if seg_eq >= 2 else "operand"))
        else:
            out.append("struct")
    return out + ["struct"]  # EOS


stats = {}
with torch.no_grad():
    for s in range(0, len(ev), 50):
        part = ev[s:s + 50]
        enc = encode_examples(tok, [e["prompt"] for e in part], [e["completion"] for e in part], 256)
        b = collate(enc.input_ids, enc.prompt_lengths, tok.pad_token_id)
        logits = model(input_ids=b["input_ids"], use_cache=False).logits
        for j, e in enumerate(part):
            pl, n = enc.prompt_lengths[j], len(enc.input_ids[j])
            cs = cats(e["completion"])
            assert len(cs) == n - pl, (len(cs), n - pl)
            tgt = b["input_ids"][j, pl:n]
            lg = logits[j, pl - 1:n - 1]
            l = F.cross_entropy(lg, tgt, reduction="none")
            ok = lg.argmax(-1) == tgt
            for c, li, oi in zip(cs, l.tolist(), ok.tolist()):
                st = stats.setdefault(c, [0.0, 0, 0])
                st[0] += li; st[1] += oi; st[2] += 1
res = {c: {"loss": round(v[0] / v[2], 3), "acc": round(v[1] / v[2], 3), "n": v[2]} for c, v in sorted(stats.items())}
print(tag, json.dumps(res))
