"""The sweep report: ``<prefix>.json`` (every trial and the per-group aggregates), ``<prefix>.md``
(tables, hypothesis checks, plots) and ``<prefix>-*.png``, all written atomically into the out dir.

Per trial it reads the run directory: ``metrics.jsonl`` (training rows: loss curve, tokens/s, the
logged loss terms), ``config.yaml``, and ``sweep-validation.json`` / ``sweep-test.json``
(:mod:`.sweep_eval`). Per group it aggregates the test results of the runs at the chosen
learning rate over seeds: mean, min and max (the spread), and the standard deviation.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

from metareason.api import __version__, atomic_file, read_metrics, write_json_atomic, write_text_atomic

LOSS_TERMS = ("L_pred", "L_stability", "L_sparsity", "L_ponder")
LRU_QUANTITIES = (("iterations", "mean iterations", ".3f"), ("ponder", "ponder cost n+R", ".3f"),
                  ("convergence_ratio", "convergence ratio", ".3g"))
FLAT_WINDOW = 0.2  # the last 20% of logged steps against the 20% before them


def _levels(keys) -> list[str]:
    def order(g: str):
        tail = g.rsplit("_", 1)[-1]
        return (0, int(tail), g) if tail.isdigit() else (1, 0, g)

    return sorted({k for k in keys if k != "all"}, key=order)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


# ------------------------------------------------------------------------------ statistics
def spread(values: list[float]) -> dict[str, Any]:
    """``{mean, min, max, std, n}`` of the finite values (``std`` 0 for one value); ``{}`` if none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {}
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties get their average rank
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> Optional[float]:
    """Spearman's rank correlation with average ranks for ties; ``None`` when either is constant."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def flatness(curve: list[list[float]], absolute: bool = False) -> Optional[float]:
    """Relative drop of the mean train loss from the second-to-last to the last 20% of the logged
    steps: ~0 when the loss has flattened, 0.3 when it still fell 30% over the last fifth
    (``absolute``: the drop in loss units, which tells a loss near zero that still halves from
    one that still matters)."""
    n = len(curve)
    w = max(1, int(n * FLAT_WINDOW))
    if n < 2 * w or n < 4:
        return None
    before = statistics.fmean(p[1] for p in curve[-2 * w:-w])
    last = statistics.fmean(p[1] for p in curve[-w:])
    if absolute:
        return before - last
    return (before - last) / before if before else None


# ------------------------------------------------------------------------------ collection
def collect_trial(result) -> dict[str, Any]:
    """Everything the report needs about one trial, from its run directory."""
    t = result.trial
    run_dir = Path(t.run_dir)
    row: dict[str, Any] = {"group": t.group, "lr": t.lr, "seed": t.seed, "name": t.name, "run_dir": t.run_dir,
                           "config": t.config, "ok": result.ok, "resumed": result.resumed, "error": result.error,
                           "train_wall_s": round(result.train_wall_s, 1), "eval_wall_s": round(result.eval_wall_s, 1)}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) if (run_dir / "config.yaml").exists() else {}
    arch = (cfg.get("model") or {}).get("arch") or {}
    train = cfg.get("train") or {}
    row.update(arch=arch, max_steps=train.get("max_steps"), batch_size=train.get("batch_size"))
    rows = read_metrics(run_dir) if run_dir.exists() else []
    train_rows = [r for r in rows if "train/loss" in r]
    tps = [r["train/tokens_per_s"] for r in train_rows if isinstance(r.get("train/tokens_per_s"), (int, float))]
    row["tokens_per_s"] = round(statistics.fmean(tps), 1) if tps else None
    row["final_train_loss"] = train_rows[-1]["train/loss"] if train_rows else None
    row["loss_curve"] = [[r["step"], r["train/loss"]] for r in train_rows]
    row["flatness"] = flatness(row["loss_curve"])
    row["flatness_abs"] = flatness(row["loss_curve"], absolute=True)
    row["final_loss_terms"] = {x: train_rows[-1][f"train/{x}"] for x in LOSS_TERMS
                               if train_rows and f"train/{x}" in train_rows[-1]}
    row["validation"] = _read_json(run_dir / "sweep-validation.json")
    test = _read_json(run_dir / "sweep-test.json")
    if test:
        pairs = test.pop("iterations_by_example", [])
        test["spearman_iterations_level"] = spearman([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None
        test["majority_baseline"] = majority_baseline(run_dir / "eval_samples-test.jsonl")
    row["validation"].pop("iterations_by_example", None)
    row["test"] = test
    row["num_parameters"] = (test or row["validation"]).get("num_parameters")
    return row


def majority_baseline(samples: Path) -> dict[str, float]:
    """Per level, the accuracy of always giving that level's most frequent gold answer (loop
    levels have small answers, so guessing scores well above zero)."""
    if not samples.exists():
        return {}
    answers: dict[str, list] = {}
    for line in samples.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            answers.setdefault(r["group"], []).append(r.get("answer"))
    out = {g: max(a.count(x) for x in set(a)) / len(a) for g, a in answers.items()}
    everything = [x for a in answers.values() for x in a]
    if everything:
        out["all"] = sum(max(a.count(x) for x in set(a)) for a in answers.values()) / len(everything)
    return out


def _flops(arch: dict, seq_len: float, iterations: Optional[float], vocab_size: Optional[int]) -> Optional[float]:
    """Forward FLOPs per token (:mod:`.flops`), at the measured mean iterations of the LRU."""
    from metareason.plugins.lru.flops import flops_per_token

    if not vocab_size:
        return None
    return float(flops_per_token(arch, max(1, round(seq_len)), iterations, vocab_size=vocab_size)["total"])


def aggregate(spec, trials: list[dict], chosen_lr: Optional[float], seq_len: float) -> dict[str, Any]:
    """One group: the grid on validation, and mean/spread over seeds of the chosen rate on test."""
    grid = sorted(({"lr": t["lr"], "seed": t["seed"], "ok": t["ok"],
                    "val_accuracy": (t["validation"].get("accuracy") or {}).get("all"),
                    "val_loss": (t["validation"].get("loss") or {}).get("all"),
                    "final_train_loss": t["final_train_loss"]}
                   for t in trials if t["seed"] == min(x["seed"] for x in trials)), key=lambda g: g["lr"])
    final = [t for t in trials if t["ok"] and t["lr"] == chosen_lr and t["test"]]
    levels = _levels({k for t in final for k in t["test"].get("accuracy", {})})
    acc = {lv: spread([t["test"]["accuracy"].get(lv) for t in final]) for lv in levels + ["all"]}
    lru_levels = _levels({k for t in final for k in t["test"].get("lru", {})})
    lru = {}
    if lru_levels:
        for key, _, _ in LRU_QUANTITIES:
            lru[key] = {lv: spread([t["test"]["lru"].get(lv, {}).get(key) for t in final]) for lv in lru_levels + ["all"]}
    rho = [t["test"].get("spearman_iterations_level") for t in final] if lru else []
    first = final[0] if final else (trials[0] if trials else {})
    arch = first.get("arch") or {}
    mean_iters = (lru.get("iterations", {}).get("all") or {}).get("mean")
    fwd = _flops(arch, seq_len, mean_iters, (first.get("test") or {}).get("vocab_size")) if arch else None
    return {"group": spec.group, "description": spec.description, "config": spec.config, "chosen_lr": chosen_lr,
            "model": describe_model(arch), "num_parameters": first.get("num_parameters"), "grid": grid,
            "seeds": [t["seed"] for t in final], "accuracy": acc, "lru": lru, "spearman_iterations_level": spread(rho),
            "spearman_per_seed": rho, "final_train_loss": spread([t["final_train_loss"] for t in final]),
            "flatness": spread([t["flatness"] for t in final]),
            "flatness_abs": spread([t.get("flatness_abs") for t in final]),
            "tokens_per_s": spread([t["tokens_per_s"] for t in final]),
            "hosts": sorted({(t["validation"].get("host") or {}).get("cpu") or "not recorded" for t in final}),
            "forward_flops_per_token": fwd,
            "majority_baseline": next((t["test"].get("majority_baseline") for t in final if t["test"].get("majority_baseline")), {}),
            "loss_curve": first.get("loss_curve", []) if final else [],
            "final_loss_terms": first.get("final_loss_terms", {}) if final else {}}


def describe_model(arch: dict) -> str:
    kind = arch.get("model_type") or "?"
    if kind != "deepseek_mla":
        return kind
    if not arch.get("use_lru", True):
        return "MLA (no LRU)"
    mode = "fixed" if arch.get("lru_fixed_iterations") else "ACT"
    read = " + causal latent read (E)" if arch.get("lru_cross_read") else ""
    return f"MLA + LRU {mode} (N={arch.get('lru_max_iterations', 8)}){read}"


def hypotheses(groups: list[dict]) -> list[dict]:
    """The seed's checks on what was measured: iterations rise with level (for every seed), and the
    LRU groups (C, D, E) beat the same-size Llama (A) and plain MLA (B) on the loop levels (means,
    and whether the seed ranges are apart, in which direction)."""
    by = {g["group"]: g for g in groups}
    checks = []
    for name in ("D", "E"):
        g = by.get(name)
        rho = [r for r in (g or {}).get("spearman_per_seed", []) if r is not None]
        if rho:
            checks.append({"claim": f"{name}'s iterations rise with level (Spearman > 0 on every seed)",
                           "holds": all(r > 0 for r in rho),
                           "evidence": "rho per seed " + ", ".join(f"{r:+.3f}" for r in rho)})
    for base in ("A", "B"):  # the same-size Llama, and the same attention without the LRU
        b = by.get(base)
        for name in ("C", "D", "E"):
            g = by.get(name)
            if not (b and g):
                continue
            for level in ("level_2", "level_4", "all"):
                x, y = g["accuracy"].get(level) or {}, b["accuracy"].get(level) or {}
                if x and y:
                    side = "above" if x["min"] > y["max"] else "below" if x["max"] < y["min"] else None
                    checks.append({"claim": f"{name} beats {base} on {level}", "holds": x["mean"] > y["mean"],
                                   "evidence": f"{name} {x['mean']:.3f} [{x['min']:.3f}, {x['max']:.3f}] vs {base} "
                                               f"{y['mean']:.3f} [{y['min']:.3f}, {y['max']:.3f}]"
                                               + (f"; seed ranges do not overlap ({name} {side})" if side
                                                  else "; seed ranges overlap")})
    return checks


# ------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)


def plot_accuracy(groups: list[dict], path: Path) -> bool:
    levels = _levels({k for g in groups for k in g["accuracy"]})
    if not levels:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / max(len(groups), 1)
    for i, g in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(levels))]
        st = [g["accuracy"].get(lv) or {} for lv in levels]
        means = [s.get("mean", 0.0) for s in st]
        err = [[m - s.get("min", m) for m, s in zip(means, st)], [s.get("max", m) - m for m, s in zip(means, st)]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=g["group"])
    ax.set_xticks(range(len(levels)), levels)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy (mean, seed range)")
    ax.legend(ncol=len(groups), fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_lru(groups: list[dict], key: str, ylabel: str, path: Path) -> bool:
    with_lru = [g for g in groups if g["lru"].get(key)]
    if not with_lru:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for g in with_lru:
        per = g["lru"][key]
        levels = _levels(per)
        means = [per[lv].get("mean", math.nan) for lv in levels]
        err = [[m - per[lv].get("min", m) for m, lv in zip(means, levels)],
               [per[lv].get("max", m) - m for m, lv in zip(means, levels)]]
        ax.errorbar(levels, means, yerr=err, marker="o", capsize=3, label=g["group"])
    if key == "convergence_ratio":
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def plot_loss(groups: list[dict], path: Path) -> bool:
    curves = [g for g in groups if g["loss_curve"]]
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for g in curves:
        ax.plot([p[0] for p in g["loss_curve"]], [p[1] for p in g["loss_curve"]], lw=1.0, label=g["group"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (first seed, chosen lr)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


# --------------------------------------------------------------------------------- markdown
def _fmt(v, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def _ms(st: dict, spec: str = ".3f") -> str:
    """``mean [min, max]`` (the seed range); one seed: just the value."""
    if not st:
        return "–"
    if st["n"] == 1:
        return _fmt(st["mean"], spec)
    return f"{_fmt(st['mean'], spec)} [{_fmt(st['min'], spec)}, {_fmt(st['max'], spec)}]"


def equal_compute(g: dict, groups: list[dict], margin: float = 1.01) -> str:
    """What the compute difference means for ``g`` against the groups that spent less per token
    (by more than ``margin``): behind them on more compute settles it; ahead of them does not."""
    cheaper = [c for c in groups if c["forward_flops_per_token"] * margin < g["forward_flops_per_token"]]
    if not cheaper:
        return "–"
    mine = g["accuracy"]["all"]["mean"]
    behind = [c["group"] for c in cheaper if c["accuracy"]["all"]["mean"] >= mine]
    ahead = [c for c in cheaper if c["accuracy"]["all"]["mean"] < mine]
    parts = []
    if behind:
        parts.append(f"not ahead of {', '.join(behind)} on more compute: unchanged at equal compute")
    if ahead:
        parts.append("ahead of " + ", ".join(
            f"{c['group']} on {g['forward_flops_per_token'] / c['forward_flops_per_token']:.2f}× its compute"
            for c in ahead) + ": open until those train as long")
    return "; ".join(parts)


def _hosts_line(groups: list[dict]) -> list[str]:
    """Where the reported trials ran (the CPU their evaluation recorded), when that is not one
    machine: training tokens/s then compare only between groups that ran on the same CPU."""
    by: dict[str, list[str]] = {}
    for g in groups:
        for host in g.get("hosts") or []:
            by.setdefault(host, []).append(g["group"])
    if len(by) < 2:
        return []
    return ["Trials ran on more than one machine (train tokens/s compare only within one): "
            + "; ".join(f"{', '.join(names)}: {host}" for host, names in by.items()) + ".", ""]


def render_markdown(data: dict, plots: dict[str, str]) -> str:
    groups, p = data["groups"], data["protocol"]
    lines = [f"# {data['title']}", ""]
    if data.get("quick"):
        lines += ["**Quick mode**: a check of the sweep's machinery (a few steps, a handful of problems). "
                  "Nothing below measures the methods.", ""]
    lines += [f"Command: `{data['command']}`", "",
              f"Report written {data['created']} on {data['device']} ({data['cpus']} CPUs), torch {data['torch']}, "
              f"metareason {data['metareason']}; trials launched as {data['launcher']}, {p['jobs']} at a time with "
              f"{p['threads']} torch thread(s) each.", "",
              *_hosts_line(groups),
              "## Protocol", "",
              f"- Token budget, the same for every group: {p['budget']}.",
              f"- Learning rate per group chosen on the validation split (seed {p['seeds'][0]}, {p['val_samples']} "
              f"problems, disjoint from train and test) from the grid {', '.join(f'{x:g}' for x in p['lrs'])} (grown one step past an "
              f"edge the best rate sits on, up to {p.get('extend', 0)} times): highest "
              f"validation accuracy, ties broken by the lower validation loss.",
              f"- Seeds {', '.join(map(str, p['seeds']))} at the chosen rate; test split, {p['test_samples']} problems, "
              f"greedy decoding, exact match of the final answer. Cells: mean [min, max] over seeds.",
              f"- Loss flattening: relative drop of the mean train loss from the second-to-last to the last "
              f"{int(FLAT_WINDOW * 100)}% of logged steps (0 = flat).", ""]
    lines += ["## Groups", "",
              "| group | model | parameters | chosen lr | fwd FLOPs/token | train tokens/s | final train loss | loss drop over last 20%: relative (absolute) |",
              "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        params = f"{g['num_parameters']:,}" if g["num_parameters"] else "–"
        fl = f"{g['forward_flops_per_token'] / 1e6:.2f} M" if g["forward_flops_per_token"] else "–"
        lines.append(f"| {g['group']} | {g['model']} | {params} | {_fmt(g['chosen_lr'], 'g')} | {fl} | "
                     f"{_ms(g['tokens_per_s'], '.0f')} | {_ms(g['final_train_loss'], '.4f')} | {_ms(g['flatness'], '.2f')} "
                     f"({_ms(g['flatness_abs'], '.4f')}) |")
    rates = sorted({x["lr"] for g in groups for x in g["grid"]} | set(p["lrs"]))
    lines += ["", "## Learning-rate grid (validation, first seed)", "",
              f"Rates beyond the grid {', '.join(f'{x:g}' for x in p['lrs'])} were tried for a group whose best rate "
              f"was at an edge (up to {p.get('extend', 0)} steps); – : not tried.", "",
              "| group | " + " | ".join(f"lr {x:g}" for x in rates) + " | chosen rate bracketed |",
              "|---" * (len(rates) + 2) + "|"]
    for g in groups:
        cells = []
        tried = sorted(x["lr"] for x in g["grid"] if x["ok"])
        bracketed = "–" if g["chosen_lr"] is None else \
            ("yes" if tried and tried[0] < g["chosen_lr"] < tried[-1] else "**no: at an edge of the rates tried**")
        for lr in rates:
            r = next((x for x in g["grid"] if x["lr"] == lr), None)
            if r is None or not r["ok"]:
                cells.append("failed" if r else "–")
                continue
            mark = "**" if lr == g["chosen_lr"] else ""
            cells.append(f"{mark}{_fmt(r['val_accuracy'])}{mark} (loss {_fmt(r['val_loss'], '.3f')})")
        lines.append(f"| {g['group']} | " + " | ".join(cells) + f" | {bracketed} |")
    lines.append("")
    levels = _levels({k for g in groups for k in g["accuracy"]})
    if levels:
        lines += ["## Test accuracy per level", "", "| group | " + " | ".join(levels) + " | all |",
                  "|---" * (len(levels) + 2) + "|"]
        for g in groups:
            lines.append(f"| {g['group']} | " + " | ".join(_ms(g["accuracy"].get(lv)) for lv in levels)
                         + f" | {_ms(g['accuracy'].get('all'))} |")
        base = next((g["majority_baseline"] for g in groups if g.get("majority_baseline")), None)
        if base:
            lines.append("| *majority answer* | " + " | ".join(_fmt(base.get(lv)) for lv in levels)
                         + f" | {_fmt(base.get('all'))} |")
            lines += ["", "*majority answer*: always answering the level's most frequent gold answer (a guessing "
                      "baseline: loop levels end in a modulus, so their answers are small numbers)."]
        lines.append("")
        if "accuracy" in plots:
            lines += [f"![accuracy per level]({plots['accuracy']})", ""]
    with_lru = [g for g in groups if g["lru"]]
    if with_lru:
        lv = _levels({k for g in with_lru for k in g["lru"]["iterations"]})
        lines += ["## LRU statistics per level (test)", "",
                  "Teacher-forced pass over the test problems (prompt + reference solution), all real tokens, "
                  "averaged over LRU layers. Iterations = steps the LRU ran per token (fixed mode: always N); "
                  "ponder cost = n + R (ACT); convergence ratio = mean residual ||h_n − h_{n−1}|| of each token's last "
                  "step / mean of its first.", "",
                  "| group | quantity | " + " | ".join(lv) + " | all |", "|---" * (len(lv) + 3) + "|"]
        for g in with_lru:
            for key, label, spec in LRU_QUANTITIES:
                per = g["lru"].get(key, {})
                lines.append(f"| {g['group']} | {label} | " + " | ".join(_ms(per.get(x), spec) for x in lv)
                             + f" | {_ms(per.get('all'), spec)} |")
        lines += ["", "Do iterations rise with difficulty? Spearman rank correlation of each test problem's mean "
                  "iterations with its level, per seed:", "",
                  "| group | rho per seed | mean [min, max] |", "|---|---|---|"]
        for g in with_lru:
            rho = g["spearman_per_seed"]
            lines.append(f"| {g['group']} | " + ", ".join(_fmt(r, "+.3f") for r in rho) + f" | "
                         f"{_ms(g['spearman_iterations_level'], '+.3f')} |")
        lines.append("")
        for name, alt in (("iterations", "mean iterations per level"), ("convergence", "convergence ratio per level")):
            if name in plots:
                lines += [f"![{alt}]({plots[name]})", ""]
    costed = [g for g in groups if g["forward_flops_per_token"] and g["accuracy"].get("all")]
    if costed:
        base = min(g["forward_flops_per_token"] for g in costed)
        lines += ["## Accuracy and compute", "",
                  "Forward FLOPs per token (`plugins/lru/flops.py`, matmuls, at the measured mean iterations and the "
                  "mean test sequence length); training compute ≈ 3 × forward × tokens, and every group trains on the "
                  "same tokens, so the groups' training compute differs by the ratio in the third column. At equal "
                  "compute: a group that spent more and does not beat a cheaper one would not beat it with less; "
                  "where it does beat a cheaper one, an equal-compute check trains the cheaper group longer.", "",
                  "| group | fwd FLOPs/token | × cheapest | test accuracy (all) | at equal compute |",
                  "|---|---|---|---|---|"]
        for g in costed:
            a = g["accuracy"]["all"]
            lines.append(f"| {g['group']} | {g['forward_flops_per_token'] / 1e6:.2f} M | "
                         f"{g['forward_flops_per_token'] / base:.2f} | {_ms(a)} | {equal_compute(g, costed)} |")
        lines.append("")
    terms = [g for g in groups if g["final_loss_terms"]]
    if terms:
        lines += ["## Loss terms (last logged training step, first seed, unweighted)", "",
                  "| group | " + " | ".join(LOSS_TERMS) + " |", "|---" * (len(LOSS_TERMS) + 1) + "|"]
        for g in terms:
            lines.append(f"| {g['group']} | " + " | ".join(_fmt(g["final_loss_terms"].get(t), ".4f") for t in LOSS_TERMS) + " |")
        lines.append("")
    if "loss" in plots:
        lines += [f"![train loss]({plots['loss']})", ""]
    lines += ["## Hypotheses", ""]
    if data["hypotheses"]:
        for h in data["hypotheses"]:
            lines.append(f"- {h['claim']}: **{'yes' if h['holds'] else 'no'}** ({h['evidence']})")
    else:
        lines.append("- not evaluated (needs groups labelled A and D or E that finished)")
    lines.append("")
    failed = [t for t in data["trials"] if not t["ok"]] + [
        {"name": n, "config": "test evaluation", "error": e} for n, e in data["test_errors"].items()]
    if failed:
        lines += ["## Failed trials", ""]
        for t in failed:
            lines += [f"### {t['name']} ({t['config']})", "", "```", (t["error"] or "").strip(), "```", ""]
    return "\n".join(lines)


def _mean_test_length(trials: list[dict]) -> float:
    """Mean tokens per test problem (prompt + reference), from the teacher-forced pass."""
    for t in trials:
        per = (t.get("test") or {}).get("lru") or {}
        if per.get("all", {}).get("tokens") and t["test"].get("samples"):
            return per["all"]["tokens"] / t["test"]["samples"]
    return 128.0


def write_report(specs, results, chosen: dict, test_errors: dict, plan, out_dir: Path, prefix: str,
                 command: str = "", launcher: str = "subprocess", title: Optional[str] = None,
                 quick: bool = False) -> Path:
    import torch

    from metareason.api import cpu_name

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = [collect_trial(r) for r in results]
    seq_len = _mean_test_length(trials)
    groups = [aggregate(s, [t for t in trials if t["group"] == s.group], chosen.get(s.group), seq_len) for s in specs]
    budget = specs[0].budget if specs else {}
    data = {"title": title or "LRU sweep: ZeroModel groups on causal-loop levels",
            "command": command, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "metareason": __version__, "launcher": launcher, "quick": quick,
            "protocol": {"lrs": plan.lrs, "extend": plan.extend, "seeds": plan.seeds, "val_samples": plan.val_samples,
                         "test_samples": plan.test_samples, "jobs": plan.jobs, "threads": plan.threads,
                         "budget": (f"{budget.get('train.max_steps')} steps × batch {budget.get('train.batch_size')} "
                                    f"(grad_accum {budget.get('train.grad_accum')}), max_length "
                                    f"{budget.get('data.max_length')}, the same training data")},
            "mean_test_tokens": seq_len, "groups": groups, "hypotheses": hypotheses(groups),
            "trials": trials, "test_errors": test_errors}
    plots = {}
    for key, fn in (("accuracy", lambda q: plot_accuracy(groups, q)),
                    ("iterations", lambda q: plot_lru(groups, "iterations", "mean LRU iterations", q)),
                    ("convergence", lambda q: plot_lru(groups, "convergence_ratio", "last / first residual", q)),
                    ("loss", lambda q: plot_loss(groups, q))):
        name = f"{prefix}-{key}.png"
        if fn(out_dir / name):
            plots[key] = name
    data["plots"] = plots
    write_json_atomic(out_dir / f"{prefix}.json", data, indent=1)
    md = out_dir / f"{prefix}.md"
    write_text_atomic(md, render_markdown(data, plots) + "\n")
    return md
