"""The sweep report: ``<prefix>.json`` (everything measured), ``<prefix>.md`` (tables, the
hypothesis checks, plots) and ``<prefix>-*.png``, all written atomically into the out dir.

Per group it reads the run directory: ``metrics.jsonl`` (final evaluation: accuracy per level;
training rows: loss curve, tokens/s, the logged loss terms), ``config.yaml`` and
``lru_stats.json`` (per-level LRU statistics, parameter count).
"""
from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

from metareason.metrics import read_metrics
from metareason.version import __version__

LOSS_TERMS = ("L_pred", "L_stability", "L_sparsity", "L_ponder")


def _atomic_write(path: Path, data, binary: bool = False) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if binary:
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _levels(keys) -> list[str]:
    def order(g: str):
        tail = g.rsplit("_", 1)[-1]
        return (0, int(tail), g) if tail.isdigit() else (1, 0, g)

    return sorted({k for k in keys if k != "all"}, key=order)


def collect_group(result) -> dict[str, Any]:
    """Everything the report needs about one group, from its run directory."""
    spec = result.spec
    run_dir = Path(spec.run_dir)
    row: dict[str, Any] = {"group": spec.group, "description": spec.description, "config": spec.config,
                           "run_dir": spec.run_dir, "ok": result.ok, "error": result.error,
                           "train_wall_s": round(result.train_wall_s, 1), "stats_wall_s": round(result.stats_wall_s, 1)}
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    arch = (cfg.get("model") or {}).get("arch") or {}
    train = cfg.get("train") or {}
    row.update(model_type=arch.get("model_type"), use_lru=bool(arch.get("use_lru", False)) if arch.get("model_type") == "deepseek_mla" else False,
               lru_fixed_iterations=bool(arch.get("lru_fixed_iterations", False)),
               lru_max_iterations=arch.get("lru_max_iterations"), max_steps=train.get("max_steps"),
               batch_size=train.get("batch_size"), lr=train.get("lr"))
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    tps = [r["train/tokens_per_s"] for r in train_rows if isinstance(r.get("train/tokens_per_s"), (int, float))]
    row["tokens_per_s"] = round(sum(tps) / len(tps), 1) if tps else None
    row["final_train_loss"] = train_rows[-1]["train/loss"] if train_rows else None
    row["loss_curve"] = [[r["step"], r["train/loss"]] for r in train_rows]
    row["final_loss_terms"] = {t: train_rows[-1][f"train/{t}"] for t in LOSS_TERMS
                               if train_rows and f"train/{t}" in train_rows[-1]}
    accuracy = {}
    if evals:
        last = evals[-1]
        accuracy = {k[len("eval/accuracy/"):]: last[k] for k in last if k.startswith("eval/accuracy/")}
        accuracy["all"] = last["eval/accuracy"]
        row["eval_samples"] = last.get("eval/num_samples")
    row["accuracy"] = accuracy
    row["majority_baseline"] = majority_baseline(run_dir / "eval_samples.jsonl")
    stats_path = run_dir / "lru_stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.exists() else {}
    row["num_parameters"] = stats.get("num_parameters")
    row["lru"] = stats.get("levels") or {}
    return row


def majority_baseline(samples: Path) -> dict[str, float]:
    """Per group, the accuracy of always giving that group's most frequent gold answer (loop
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


def hypotheses(groups: list[dict]) -> list[dict]:
    """The issue's two checks, evaluated on whatever was measured."""
    by = {g["group"]: g for g in groups if g["ok"]}
    checks = []
    d = by.get("D")
    if d and d["lru"]:
        levels = _levels(d["lru"])
        its = [d["lru"][lv]["iterations"] for lv in levels]
        rising = all(b > a for a, b in zip(its, its[1:]))
        checks.append({"claim": "D's mean iterations rise with level", "holds": rising,
                       "evidence": ", ".join(f"{lv}: {v:.3f}" for lv, v in zip(levels, its))})
    a = by.get("A")
    if a and d:
        for level in ("level_2", "level_4"):
            if level in a["accuracy"] and level in d["accuracy"]:
                da, aa = d["accuracy"][level], a["accuracy"][level]
                checks.append({"claim": f"D beats A on {level}", "holds": da > aa,
                               "evidence": f"D {da:.3f} vs A {aa:.3f}"})
    return checks


# ------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    os.replace(tmp, path)


def plot_accuracy(groups: list[dict], path: Path) -> bool:
    levels = _levels({k for g in groups for k in g["accuracy"]})
    if not levels:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / max(len(groups), 1)
    for i, g in enumerate(groups):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(levels))]
        bars = ax.bar(xs, [g["accuracy"].get(lv, 0.0) for lv in levels], width, label=g["group"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(levels)), levels)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("exact-match accuracy")
    ax.legend(ncol=len(groups), fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_lru(groups: list[dict], key: str, ylabel: str, path: Path) -> bool:
    with_lru = [g for g in groups if g["lru"]]
    if not with_lru:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for g in with_lru:
        levels = _levels(g["lru"])
        ax.plot(levels, [g["lru"][lv][key] for lv in levels], marker="o", label=g["group"])
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
        ax.plot([p[0] for p in g["loss_curve"]], [p[1] for p in g["loss_curve"]], lw=1.2, label=g["group"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
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


def render_markdown(data: dict, plots: dict[str, str]) -> str:
    groups = data["groups"]
    lines = [f"# {data['title']}", "",
             f"Command: `{data['command']}`", "",
             f"Measured {data['created']} on {data['device']} ({data['cpus']} CPUs, OMP_NUM_THREADS="
             f"{data['omp_num_threads']}), torch {data['torch']}, metareason {data['metareason']}; groups launched as "
             f"{data['launcher']}, one at a time. Run wall = `metareason run` (training + final evaluation); "
             f"tokens/s = non-padding training tokens per second (mean of the logged windows).", ""]
    lines += ["## Groups", "",
              "| group | description | model | parameters | steps × batch | run wall (s) | train tokens/s | final train loss |",
              "|---|---|---|---|---|---|---|---|"]
    for g in groups:
        model = g["model_type"] or "?"
        if g["model_type"] == "deepseek_mla":
            model += (" + LRU " + ("fixed" if g["lru_fixed_iterations"] else "ACT") + f" (N={g['lru_max_iterations']})"
                      if g["use_lru"] else " (no LRU)")
        params = f"{g['num_parameters']:,}" if g["num_parameters"] else "–"
        lines.append(f"| {g['group']} | {g['description']} | {model} | {params} | {g['max_steps']} × {g['batch_size']} | "
                     f"{g['train_wall_s']:.0f} | {_fmt(g['tokens_per_s'], '.0f')} | {_fmt(g['final_train_loss'], '.4f')} |")
    lines.append("")
    levels = _levels({k for g in groups for k in g["accuracy"]})
    if levels:
        n = next((g.get("eval_samples") for g in groups if g.get("eval_samples")), "?")
        lines += ["## Accuracy per level", "",
                  f"Held-out problems (`split: test`), greedy decoding, exact match of the final answer; {n} eval examples per group.", "",
                  "| group | " + " | ".join(levels) + " | all |", "|---" * (len(levels) + 2) + "|"]
        for g in groups:
            lines.append(f"| {g['group']} | " + " | ".join(_fmt(g["accuracy"].get(lv)) for lv in levels)
                         + f" | {_fmt(g['accuracy'].get('all'))} |")
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
        lv = _levels({k for g in with_lru for k in g["lru"]})
        lines += ["## LRU statistics per level", "",
                  "Teacher-forced pass over the same eval examples (prompt + reference solution), all real tokens, "
                  "averaged over LRU layers. Iterations = steps the LRU ran per token (fixed mode: always N); "
                  "first-step residual = mean ||h_1 − h_0|| (how far the first step moves the latent); convergence ratio = "
                  "mean residual ||h_n − h_{n−1}|| of each token's last step / mean of its first.", "",
                  "| group | quantity | " + " | ".join(lv) + " | all |", "|---" * (len(lv) + 3) + "|"]
        for g in with_lru:
            for key, label, spec in (("iterations", "mean iterations", ".3f"), ("ponder", "ponder cost n+R", ".3f"),
                                     ("first_residual", "first-step residual", ".3g"),
                                     ("convergence_ratio", "convergence ratio", ".3g")):
                lines.append(f"| {g['group']} | {label} | " + " | ".join(_fmt(g["lru"].get(x, {}).get(key), spec) for x in lv)
                             + f" | {_fmt(g['lru'].get('all', {}).get(key), spec)} |")
        lines.append("")
        for name, alt in (("iterations", "mean iterations per level"), ("convergence", "convergence ratio per level")):
            if name in plots:
                lines += [f"![{alt}]({plots[name]})", ""]
    terms = [g for g in groups if g["final_loss_terms"]]
    if terms:
        lines += ["## Loss terms (last logged training step, unweighted)", "",
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
        lines.append("- not evaluated (needs groups labelled A and D that finished)")
    lines.append("")
    failed = [g for g in groups if not g["ok"]]
    if failed:
        lines += ["## Failed groups", ""]
        for g in failed:
            lines += [f"### {g['group']} ({g['config']})", "", "```", (g["error"] or "").strip(), "```", ""]
    return "\n".join(lines)


def write_report(results, out_dir: Path, prefix: str, command: str = "", launcher: str = "subprocess",
                 title: Optional[str] = None) -> Path:
    import torch

    from metareason.benchmarks import cpu_name

    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [collect_group(r) for r in results]
    data = {"title": title or "LRU sweep: ZeroModel groups on causal-loop levels",
            "command": command, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "metareason": __version__, "launcher": launcher,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "groups": groups, "hypotheses": hypotheses(groups)}
    plots = {}
    for key, fn in (("accuracy", lambda p: plot_accuracy(groups, p)),
                    ("iterations", lambda p: plot_lru(groups, "iterations", "mean LRU iterations", p)),
                    ("convergence", lambda p: plot_lru(groups, "convergence_ratio", "last / first residual", p)),
                    ("loss", lambda p: plot_loss(groups, p))):
        name = f"{prefix}-{key}.png"
        if fn(out_dir / name):
            plots[key] = name
    data["plots"] = plots
    _atomic_write(out_dir / f"{prefix}.json", json.dumps(data, indent=2) + "\n")
    md = out_dir / f"{prefix}.md"
    _atomic_write(md, render_markdown(data, plots) + "\n")
    return md
