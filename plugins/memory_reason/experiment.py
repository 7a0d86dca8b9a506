"""The issue-29 experiment on the varied world (``metareason memory_reason experiment``); the design
is docs/memory_reason.md, "Experiment design (issue 29)".

Stages (each resumable: finished runs are recorded in ``<output-dir>/experiment.json``):

* ``base``: per seed, a base (``base.yaml``, ``train.seed=seed``), exported to ``<run>/hf``, with
  its two gates: recall of every fact and the arithmetic table (``base_arith.yaml``);
* ``grid``: per arm and learning rate, a run on the seed-0 base evaluated on the validation split;
  the arm's lr = the best validation accuracy (a tie: the smaller lr);
* ``heldout``: per seed and arm, a run at the chosen lr evaluated on the held-out questions (seed 0
  re-evaluates the grid run of the chosen lr on held-out instead of training it again), then its
  recall of every fact (forgetting; samples in ``eval_samples_recall.jsonl``);
* ``report``: accuracy per arm (per seed, mean, bootstrap interval, per structure), the paired
  comparisons H1 (B vs A), H2 (B vs C), H3 (E vs D) with Holm, and the fine error attribution,
  recomputed from each run's ``eval_samples.jsonl`` -> ``<out>.json`` and ``<out>.md``.

A config folder may hold ``experiment.yaml`` (see :data:`SETTINGS`) to run the same stages on
another setting: ``configs/memory_reason/smollm2/`` gives one facts stage shared by every seed
(LoRA, exported merged), its own recall gate and no arithmetic gate, two arms and its own grid.
Command-line values win over it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from metareason.api import UserError, write_json_atomic

ARMS = {"plain": "A plain CoT", "tokens_full": "B step tokens, full", "filler": "C filler control",
        "plain_lora": "D plain CoT + LoRA", "tokens_lora_pt": "E step tokens, lora+prompt-tuning"}
GRID = {"plain": (3e-4, 1e-3, 3e-3), "tokens_full": (3e-4, 1e-3, 3e-3), "filler": (3e-4, 1e-3, 3e-3),
        "plain_lora": (1e-3, 3e-3, 1e-2), "tokens_lora_pt": (1e-3, 3e-3, 1e-2)}
HYPOTHESES = {"H1": ("tokens_full", "plain"), "H2": ("tokens_full", "filler"), "H3": ("tokens_lora_pt", "plain_lora")}
H4 = {"H4 (full)": ("tokens_full", "plain"), "H4 (PEFT)": ("tokens_lora_pt", "plain_lora")}  # secondary, uncorrected
WORLD = "entities: 16, attributes: 3, world_seed: 0"
QUICK_ARITH = ("data.eval=[{task: memory_world, num_samples: 20, "
               f"params: {{kind: pretrain, mix: {{arithmetic: 1}}, {WORLD}}}}}]")
RECALL = f"data.eval=[{{task: memory_world, num_samples: 1000, params: {{kind: recall, {WORLD}}}}}]"
QUICK = ["train.max_steps=2", "train.batch_size=4", "train.warmup_steps=0", "generation.max_new_tokens=8"]


def eval_override(split: str, n: int) -> str:
    return (f"data.eval=[{{task: memory_world, num_samples: {n}, seed: 1, "
            f"params: {{kind: varied, split: {split}, {WORLD}}}}}]")


SETTINGS = {  # experiment.yaml in the config folder; these defaults are the varied world's design
    "title": "step tokens on the varied world",
    "base": "base.yaml",            # the base stage's config
    "base_arith": "base_arith.yaml",  # its arithmetic gate's eval config; null: no arithmetic gate
    "shared_base": False,           # true: one base (the first seed's) for every seed
    "merge_base": False,            # true: export the base with its LoRA merged (a LoRA base stage)
    "recall_gate": 1.0,             # the base's fact recall must be >= this
    "arith_gate": 0.95,
    "arms": list(ARMS),
    "grid": {a: list(v) for a, v in GRID.items()},
    "n_val": 300,
    "n_heldout": 700,
}


def read_settings(config_dir: Path) -> dict:
    """SETTINGS updated by ``<config_dir>/experiment.yaml`` when it exists (an unknown key: an error)."""
    from metareason.api import read_yaml

    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SETTINGS.items()}
    path = Path(config_dir) / "experiment.yaml"
    if path.is_file():
        given = read_yaml(path) or {}
        unknown = sorted(set(given) - set(SETTINGS))
        if unknown:
            raise UserError(f"{path}: {unknown[0]}: unknown setting (known: {', '.join(SETTINGS)})")
        settings.update(given)
    return settings


def choose_lr(results: dict) -> str:
    """The lr (a key such as ``"0.001"``) with the best validation accuracy; a tie: the smaller lr."""
    return max(sorted(results, key=float), key=lambda k: results[k]["val_accuracy"])  # max keeps the first


class Experiment:
    def __init__(self, config_dir, output_dir, seeds, arms=None, overrides=(), quiet=False, quick=False, gates=True,
                 n_val=None, n_heldout=None, grid=None):
        self.config_dir, self.output_dir = Path(config_dir), Path(output_dir)
        self.settings = read_settings(self.config_dir)
        self.seeds, self.arms = tuple(seeds), tuple(arms or self.settings["arms"])
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise UserError(f"--arms: unknown arm {unknown[0]!r} ({', '.join(ARMS)})")
        self.overrides = list(QUICK if quick else []) + list(overrides)
        self.quiet, self.quick = quiet, quick
        self.n_val = n_val or self.settings["n_val"]
        self.n_heldout = n_heldout or self.settings["n_heldout"]
        self.gates = gates and not quick  # 2 steps never pass them: a quick run records them only
        missing = [a for a in self.arms if not grid and a not in self.settings["grid"]]
        if missing:
            raise UserError(f"{self.config_dir / 'experiment.yaml'}: grid: no learning rates for arm {missing[0]!r}")
        self.grid = {a: tuple(float(x) for x in (grid or self.settings["grid"][a])) for a in self.arms}
        self.state_path = self.output_dir / "experiment.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        for key in ("bases", "grid", "chosen", "heldout"):
            self.state.setdefault(key, {})

    def _save(self):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, self.state)

    def _config(self, name: str) -> Path:
        path = self.config_dir / name
        if not path.is_file():
            raise UserError(f"--config-dir: {self.config_dir}: missing {name}")
        return path

    def _run(self, file: str, name: str, overrides: list) -> tuple[dict, Path]:
        """Train (and evaluate) one run. A run dir left by an interrupted run of exactly this config
        goes on from its last checkpoint; any other is overwritten (the experiment's own dirs)."""
        from metareason.api import Kernel, dump_config, latest_checkpoint

        kernel = Kernel(self._config(file), overrides=[f"output_dir={self.output_dir}", f"name={name}",
                                                       f"quiet={str(self.quiet).lower()}"] + self.overrides + overrides)
        run_dir = Path(kernel.config.run_dir)
        written = run_dir / "config.yaml"
        resume = (run_dir.is_dir() and latest_checkpoint(run_dir) is not None and written.is_file()
                  and written.read_text(encoding="utf-8") == dump_config(kernel.config))
        metrics = kernel.run(resume=resume, overwrite=not resume)
        return metrics, run_dir

    def _base_seeds(self) -> tuple:
        return self.seeds[:1] if self.settings["shared_base"] else self.seeds

    def base(self):
        from metareason.api import evaluate_target, export_run

        st = self.settings
        for seed in self._base_seeds():
            key = str(seed)
            if key in self.state["bases"]:
                continue
            metrics, run_dir = self._run(st["base"], f"base-s{seed}", [f"train.seed={seed}"])
            hf = run_dir / "hf"
            export_run(run_dir, hf, merge=st["merge_base"])
            info = {"recall": metrics.get("eval/accuracy"), "arithmetic": None, "hf": str(hf.resolve())}
            if st["base_arith"]:
                arith, _ = evaluate_target(str(self._config(st["base_arith"])),
                                           [f"model.path={hf.resolve()}", f"output_dir={self.output_dir}"] +
                                           [o for o in self.overrides if o.startswith("generation.")] +
                                           ([QUICK_ARITH] if self.quick else []), quiet=self.quiet)
                info["arithmetic"] = arith.get("eval/accuracy")
            info["gates_passed"] = info["recall"] >= st["recall_gate"] and (
                info["arithmetic"] is None or info["arithmetic"] >= st["arith_gate"])
            arith_text = "" if info["arithmetic"] is None else f", arithmetic {info['arithmetic']:.3f}"
            print(f"[memory_reason] base s{seed}: recall {info['recall']:.3f}{arith_text}", file=sys.stderr)
            if self.gates and not info["gates_passed"]:
                need = f"recall {info['recall']:.3f} must be >= {st['recall_gate']:.3f}" + (
                    "" if info["arithmetic"] is None else f", arithmetic {info['arithmetic']:.3f} >= {st['arith_gate']}")
                raise UserError(f"base s{seed}: gates failed ({need}); train it longer ({st['base']} train.max_steps)")
            self.state["bases"][key] = info
            self._save()

    def _base_path(self, seed) -> str:
        if self.settings["shared_base"]:
            seed = self.seeds[0]
        info = self.state["bases"].get(str(seed))
        if info is None:
            raise UserError(f"no base for seed {seed} (run the base stage first)")
        return info["hf"]

    def grid_stage(self):
        seed = self.seeds[0]
        for arm in self.arms:
            results = self.state["grid"].setdefault(arm, {})
            for lr in self.grid[arm]:
                if f"{lr:g}" in results:
                    continue
                metrics, run_dir = self._run(f"{arm}.yaml", f"{arm}-lr{lr:g}-s{seed}",
                                             [f"model.path={self._base_path(seed)}", f"train.seed={seed}",
                                              f"train.lr={lr}", eval_override("val", self.n_val)])
                (run_dir / "eval_samples.jsonl").replace(run_dir / "eval_samples_val.jsonl")
                results[f"{lr:g}"] = {"val_accuracy": metrics["eval/accuracy"], "run_dir": str(run_dir)}
                self._save()
            self.state["chosen"][arm] = choose_lr(results)
            self._save()

    def heldout(self):
        from metareason.api import evaluate_target

        for seed in self.seeds:
            for arm in self.arms:
                key = f"{arm}|{seed}"
                if key in self.state["heldout"]:
                    continue
                lr = self.state["chosen"].get(arm)
                if lr is None:
                    raise UserError(f"{arm}: no learning rate chosen (run the grid stage first)")
                grid_run = self.state["grid"][arm][lr]["run_dir"]
                if seed == self.seeds[0]:
                    metrics, _ = evaluate_target(grid_run, [eval_override("heldout", self.n_heldout)], quiet=self.quiet)
                    run_dir = grid_run
                else:
                    metrics, run_dir = self._run(f"{arm}.yaml", f"{arm}-lr{lr}-s{seed}",
                                                 [f"model.path={self._base_path(seed)}", f"train.seed={seed}",
                                                  f"train.lr={lr}", eval_override("heldout", self.n_heldout)])
                recall = self._recall(Path(run_dir))
                self.state["heldout"][key] = {"accuracy": metrics["eval/accuracy"], "run_dir": str(run_dir), "lr": lr,
                                              "recall": recall}
                self._save()

    def _recall(self, run_dir: Path) -> float:
        """Fact recall of a fine-tuned run (forgetting), its samples kept as eval_samples_recall.jsonl;
        eval_samples.jsonl stays the held-out one."""
        from metareason.api import evaluate_target

        held, keep = run_dir / "eval_samples.jsonl", run_dir / "eval_samples_heldout.jsonl"
        held.replace(keep)
        metrics, _ = evaluate_target(str(run_dir), [RECALL], quiet=self.quiet)
        held.replace(run_dir / "eval_samples_recall.jsonl")
        keep.replace(held)
        return metrics["eval/accuracy"]

    def report(self, out: str) -> dict:
        from metareason.api import write_record

        record = report_record(self.state, self.arms, self.seeds, self.config_dir, self.n_heldout)
        record.update(title=self.settings["title"], shared_base=self.settings["shared_base"])
        write_record(Path(out).with_suffix(".json"), record, markdown(record))
        return record


def _arm_section(config_dir: Path, arm: str):
    from metareason.api import read_yaml
    from metareason.plugins.memory_reason.config import MemoryReasonSection

    return MemoryReasonSection(**read_yaml(config_dir / f"{arm}.yaml").get("memory_reason", {}))


def report_record(state: dict, arms, seeds, config_dir: Path, n_heldout: int) -> dict:
    import numpy as np

    from metareason.plugins.memory_reason.analysis import analyse
    from metareason.plugins.memory_reason.stats import bootstrap_ci, compare, correctness, holm
    from metareason.plugins.memory_reason.tasks import make_world_task
    from metareason.plugins.memory_reason.tokens import vocabulary

    gold = {e["id"]: e for e in make_world_task({"kind": "varied", "split": "heldout", "entities": 16,
                                                 "attributes": 3, "world_seed": 0}, 1, n_heldout).examples}
    rows, mats, memory_errors, ids = {}, {}, {}, None
    for arm in arms:
        runs = [state["heldout"].get(f"{arm}|{s}") for s in seeds]
        if not all(runs):
            continue
        mat, ids = correctness([r["run_dir"] for r in runs], ids)
        mats[arm] = mat
        section = _arm_section(config_dir, arm)
        stats, mem = [], []
        for r in runs:
            lines = [json.loads(x) for x in (Path(r["run_dir"]) / "eval_samples.jsonl").read_text().splitlines() if x]
            samples = [dict(x, example=gold.get(x["id"], {})) for x in lines]
            stats.append(analyse(samples, vocabulary(section), section.answer_prefix))
            by_id = {x["id"]: x for x in samples}
            mem.append([float(_memory_error(by_id[i], vocabulary(section), section.answer_prefix)) for i in ids])
        memory_errors[arm] = np.array(mem)
        by_structure = {}
        for s in sorted({gold[i]["structure"] for i in ids if i in gold}):
            cols = [k for k, i in enumerate(ids) if gold.get(i, {}).get("structure") == s]
            by_structure[s] = float(mat[:, cols].mean())
        keys = ("error_entity", "error_value", "error_operation", "error_structure", "error_neither", "type_accuracy",
                "steps")
        rows[arm] = {"label": ARMS[arm], "lr": runs[0]["lr"], "per_seed": [float(x) for x in mat.mean(1)],
                     "recall": float(np.mean([r.get("recall", float("nan")) for r in runs])),
                     "mean": float(mat.mean()), "ci": bootstrap_ci(mat), "by_structure": by_structure,
                     "macro": float(np.mean(list(by_structure.values()))) if by_structure else None,
                     **{k: float(np.mean([st[k] for st in stats if k in st])) if any(k in st for st in stats)
                        else None for k in keys}}
    tests = {h: dict(compare(mats[a], mats[b]), a=a, b=b) for h, (a, b) in HYPOTHESES.items()
             if a in mats and b in mats}
    rejected = holm({h: t["p_sign_flip"] for h, t in tests.items()}) if tests else {}
    for h in tests:
        tests[h]["holm_rejects_null"] = rejected[h]
    h4 = {h: dict(compare(memory_errors[a], memory_errors[b]), a=a, b=b,
                  rate_a=float(memory_errors[a].mean()), rate_b=float(memory_errors[b].mean()))
          for h, (a, b) in H4.items() if a in memory_errors and b in memory_errors}
    from metareason.api import relative_path

    for r, arm in zip(rows.values(), rows):  # records are committed: no absolute paths of this machine
        r["run_dirs"] = [relative_path(state["heldout"][f"{arm}|{s}"]["run_dir"]) for s in seeds]
    return {"command": "metareason memory_reason experiment " + " ".join(sys.argv[3:]).strip(), "seeds": list(seeds),
            "bases": {s: dict(b, hf=relative_path(b["hf"])) for s, b in state["bases"].items()},
            "chosen_lr": state["chosen"],
            "grid": {a: {lr: v["val_accuracy"] for lr, v in g.items()} for a, g in state["grid"].items()},
            "arms": rows, "tests": tests, "h4": h4, "n_questions": len(ids or [])}


def _memory_error(sample: dict, voc, answer_prefix: str) -> bool:
    """H4's per-question outcome: the answer is wrong and its first wrong step recalled a wrong
    entity or a wrong value (the fine attribution's ``entity`` / ``value``)."""
    from metareason.plugins.memory_reason.analysis import attribute_error_fine
    from metareason.plugins.memory_reason.steps import parse_generated

    gold = (sample.get("example") or {}).get("cot_steps")
    if sample["score"] >= 1.0 or not gold:
        return False
    return attribute_error_fine(parse_generated(sample["completion"], voc, answer_prefix), gold) in ("entity", "value")


def _f(v, d=3):
    return "n/a" if v is None else f"{v:.{d}f}"


def markdown(record: dict) -> str:
    shared = record.get("shared_base", False)
    lines = [f"# memory_reason, issue 29: {record.get('title', SETTINGS['title'])}", "",
             f"Command: `{record['command']}`", "",
             f"Seeds {record['seeds']} ({'one base shared by every seed' if shared else 'each with its own base'}); "
             f"{record['n_questions']} held-out questions; "
             "design: docs/memory_reason.md, \"Experiment design (issue 29)\".", "",
             "Bases: " + "; ".join(f"s{s}: recall {_f(b['recall'])}"
                                   + ("" if b.get("arithmetic") is None else f", arithmetic {_f(b['arithmetic'])}")
                                   for s, b in record["bases"].items()), "",
             "Learning rates chosen on validation: " + "; ".join(
                 f"{a} {lr} (val: " + ", ".join(f"{k} {_f(v)}" for k, v in record["grid"].get(a, {}).items()) + ")"
                 for a, lr in record["chosen_lr"].items()), "",
             "| arm | lr | accuracy (95% CI) | per seed | macro over structures | err. entity | err. value | "
             "err. operation | err. structure | err. neither | type acc. | fact recall |", "|---" * 12 + "|"]
    for r in record["arms"].values():
        lines.append(f"| {r['label']} | {r['lr']} | {_f(r['mean'])} ({_f(r['ci'][0])}-{_f(r['ci'][1])}) | "
                     f"{', '.join(_f(x) for x in r['per_seed'])} | {_f(r['macro'])} | {_f(r['error_entity'])} | "
                     f"{_f(r['error_value'])} | {_f(r['error_operation'])} | {_f(r['error_structure'])} | "
                     f"{_f(r['error_neither'])} | {_f(r['type_accuracy'])} | {_f(r['recall'])} |")
    lines += ["", "| hypothesis | difference (95% CI) | sign-flip p | Holm rejects null | "
              "McNemar per seed (a>b, b>a, p) |", "|---|---|---|---|---|"]
    for h, t in record["tests"].items():
        mc = "; ".join(f"{x}, {y}, {_f(p)}" for x, y, p in t["mcnemar"])
        lines.append(f"| {h}: {t['a']} vs {t['b']} | {t['diff']:+.3f} ({t['ci'][0]:+.3f} to {t['ci'][1]:+.3f}) | "
                     f"{t['p_sign_flip']:.4f} | {t['holm_rejects_null']} | {mc} |")
    if record.get("h4"):
        lines += ["", "H4 (secondary, no correction): the share of questions answered wrong with a wrong entity or "
                  "value as the first wrong step (per question, averaged over seeds; paired sign-flip test):", "",
                  "| comparison | rate a | rate b | difference a - b (95% CI) | sign-flip p |", "|---|---|---|---|---|"]
        for h, t in record["h4"].items():
            lines.append(f"| {h}: {t['a']} vs {t['b']} | {_f(t['rate_a'])} | {_f(t['rate_b'])} | "
                         f"{t['diff']:+.3f} ({t['ci'][0]:+.3f} to {t['ci'][1]:+.3f}) | {t['p_sign_flip']:.4f} |")
    structures = sorted({s for r in record["arms"].values() for s in r["by_structure"]})
    lines += ["", "Accuracy per structure:", "", "| arm | " + " | ".join(structures) + " |",
              "|---|" + "---|" * len(structures)]
    for r in record["arms"].values():
        lines.append(f"| {r['label']} | " + " | ".join(_f(r["by_structure"].get(s)) for s in structures) + " |")
    return "\n".join(lines) + "\n"


def run_experiment(config_dir="configs/memory_reason/varied", output_dir="runs/memory_reason_i29", seeds=(0, 1, 2),
                   arms=None, stages="base,grid,heldout,report", out="bench-results/memory_reason-varied",
                   overrides=(), quiet=False, quick=False, gates=True, n_val=None, n_heldout=None, grid=None) -> dict:
    wanted = [s.strip() for s in stages.split(",") if s.strip()]
    bad = set(wanted) - {"base", "grid", "heldout", "report"}
    if bad:
        raise UserError(f"--stages: unknown stage {sorted(bad)[0]!r} (base, grid, heldout, report)")
    exp = Experiment(config_dir, output_dir, seeds, arms, overrides, quiet, quick, gates, n_val, n_heldout, grid)
    if "base" in wanted:
        exp.base()
    if "grid" in wanted:
        exp.grid_stage()
    if "heldout" in wanted:
        exp.heldout()
    if "report" in wanted:
        return exp.report(out)
    return exp.state
