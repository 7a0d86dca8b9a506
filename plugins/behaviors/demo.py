"""``metareason behaviors bench demo [configs/behaviors]``: the end-to-end demonstration.

Stages (``--stages`` picks some; each reads what the previous ones wrote under
``runs/behaviors-demo/``):

1. ``extract``  the programmatic strategist solves -> reflects -> extracts on 120 training
                questions; behaviors go into a fresh handbook (topic = the question's topic).
2. ``teacher``  the programmatic teacher answers every training question twice: under BCI
                (topic retrieval, K=3, through the handbook) and plainly.
3. ``mix``      a tiny model from scratch on the training questions, half of them (alternating)
                under BCI with the teacher's BCI answer, half plain with its plain answer. It has
                seen both formats, so "with vs without BCI" on held-out questions tests what the
                retrieved block does to ITS accuracy and output length — not whether an untrained
                model can read instructions (a from-scratch model cannot).
4. ``sft``      student: the same questions, no behaviors in the prompt, teacher's plain answers.
5. ``bcsft``    student: the same questions, no behaviors in the prompt, teacher's BCI answers.
6. ``report``   greedy evaluation on the same 300 held-out questions: mix with / without BCI,
                sft and bcsft without; accuracy, mean generated tokens, mean prompt tokens ->
                ``bench-results/behaviors-demo.md`` and ``.json``.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from metareason.api import UserError, write_json_atomic, write_jsonl_atomic

STAGES = ("extract", "teacher", "mix", "sft", "bcsft", "report")
#: the mix model learns two formats from one pass over the questions (half each); it trains for
#: this many times the students' steps so it sees as many examples of each format as a student
#: sees of its one format (with equal steps it saw half: see "history" in the result JSON)
MIX_STEPS_FACTOR = 2
WORK = Path("runs/behaviors-demo")
EXTRACT_QUESTIONS = 120


def _latest(run_dir: Path) -> Path:
    from metareason.api import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no checkpoint (run its stage first)")
    return ckpt


def _steps(run_dir: Path) -> int:
    from metareason.api import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return int(ckpt.name.split("-")[-1]) if ckpt is not None and ckpt.name.split("-")[-1].isdigit() else -1


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _evaluate(run_dir: Path, label: str, bci: bool) -> dict:
    from metareason.api import Kernel, evaluate, load_weights_into, prompt_ids

    kernel = Kernel(run_dir / "config.yaml", overrides=["quiet=true", f"behaviors.bci.enabled={str(bci).lower()}"])
    model, tok = kernel.load()
    load_weights_into(model, _latest(run_dir))
    samples = run_dir / f"eval_{label}.jsonl"
    t0 = time.perf_counter()
    metrics = evaluate(kernel, model, tok, write_samples=samples)
    rows = _rows(samples)
    prompt_tokens = sum(len(prompt_ids(tok, r["prompt"])) for r in rows) / len(rows)
    return {"accuracy": metrics["eval/accuracy"], "gen_tokens": metrics["eval/gen_tokens"],
            "prompt_tokens": prompt_tokens, "citing_share": metrics.get("eval/behaviors/citing_share"),
            "citations_per_sample": metrics.get("eval/behaviors/citations_per_sample"),
            "per_topic_accuracy": {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("eval/accuracy/")},
            "eval_s": time.perf_counter() - t0, "samples": str(samples)}


def run_demo(config_dir: str = "configs/behaviors", stages: str = "all", out: str = "bench-results/behaviors-demo.json",
             quiet: bool = False, overrides: Optional[list[str]] = None) -> dict:
    from metareason.api import Kernel, cpu_name, write_record
    from metareason.plugins.behaviors.bcsft import student_config, teacher_data
    from metareason.plugins.behaviors.examples import load_examples, section_of
    from metareason.plugins.behaviors.store import open_handbook
    from metareason.plugins.behaviors.strategist import extract_behaviors

    todo = list(STAGES) if stages == "all" else [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in todo if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage {bad[0]!r} (choose from {', '.join(STAGES)})")
    base = Path(config_dir) / "demo.yaml"
    if not base.is_file():
        raise UserError(f"{config_dir}: demo.yaml not found")
    ov = list(overrides or []) + ["quiet=true"] * quiet
    kernel = Kernel(base, overrides=ov)
    section = section_of(kernel)
    WORK.mkdir(parents=True, exist_ok=True)
    files = {m: WORK / f"teacher-{m}.jsonl" for m in ("bci", "plain")}
    files["mix"] = WORK / "mix.jsonl"
    runs = {k: Path(kernel.config.output_dir) / f"behaviors-demo-{k}" for k in ("mix", "sft", "bcsft")}
    record_path = Path(out)
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    record.setdefault("timings_s", {})
    for stage in todo:
        t0 = time.perf_counter()
        print(f"[behaviors demo] stage {stage}", file=sys.stderr, flush=True)
        if stage == "extract":
            hb_path = Path(section.handbook)
            for p in (hb_path, Path(str(hb_path) + ".faiss"), Path(str(hb_path) + ".faiss.json"),
                      Path(str(hb_path) + "-wal"), Path(str(hb_path) + "-shm")):
                if p.exists():
                    p.unlink()
            pairs = load_examples(kernel, "train")
            by_topic: dict[str, list[dict]] = {}
            for _, ex in pairs:
                by_topic.setdefault(ex["topic"], []).append(ex)
            chosen = [ex for exs in by_topic.values() for ex in exs[: EXTRACT_QUESTIONS // len(by_topic)]]
            with open_handbook(section) as hb:
                rep = extract_behaviors(kernel.generator(section.strategist), chosen, hb, section, quiet=quiet)
                record["extract"] = dict(rep.to_json(), behaviors=[{"name": b.name, "topic": b.topic,
                                                                     "instruction": b.instruction} for b in hb.all()])
        elif stage == "teacher":
            pairs = load_examples(kernel, "train")
            with open_handbook(section, create=False) as hb:
                record["teacher"] = {m: teacher_data(kernel, pairs, m, files[m], handbook=hb, quiet=quiet)
                                     for m in ("bci", "plain")}
            bci, plain = _rows(files["bci"]), _rows(files["plain"])
            plain_by_id = {r["id"]: r for r in plain}
            mixed = []
            for i, r in enumerate(bci):
                use = i % 2 == 0
                row = dict(r if use else plain_by_id[r["id"]])
                row["use_behaviors"] = use
                mixed.append(row)
            write_jsonl_atomic(files["mix"], mixed)
        elif stage in ("mix", "sft", "bcsft"):
            data = {"mix": files["mix"], "sft": files["plain"], "bcsft": files["bci"]}[stage]
            n = len(_rows(data))
            cfg = student_config(kernel.raw_config, data, n, f"behaviors-demo-{stage}")
            cfg["behaviors"]["bci"]["enabled"] = stage == "mix"  # mix: the hook prepends blocks in training
            cfg.setdefault("eval", {})["at_end"] = False  # the report evaluates every model the same way
            if stage == "mix":
                cfg["train"]["max_steps"] = MIX_STEPS_FACTOR * kernel.config.train.max_steps
            Kernel(cfg).run(overwrite=True)  # the demo's own run directory: a stage re-run starts it again
        elif stage == "report":
            if "results" in record:  # an earlier report is kept, never silently replaced
                record.setdefault("history", []).append({"results": record["results"],
                                                         "train_steps": record.get("train_steps")})
            record["train_steps"] = {"mix": _steps(runs["mix"]), "sft": _steps(runs["sft"]),
                                     "bcsft": _steps(runs["bcsft"])}
            record["results"] = {
                "mix_with_bci": _evaluate(runs["mix"], "with_bci", True),
                "mix_without_bci": _evaluate(runs["mix"], "without_bci", False),
                "student_sft": _evaluate(runs["sft"], "no_bci", False),
                "student_bcsft": _evaluate(runs["bcsft"], "no_bci", False),
            }
            with open_handbook(section, create=False) as hb:
                record["handbook_after"] = hb.stats()
        record["timings_s"][stage] = time.perf_counter() - t0
    command = "metareason behaviors bench demo " + shlex.quote(config_dir) + ("" if stages == "all" else f" --stages {stages}")
    if stages == "all":
        record["commands"] = []
    record["commands"] = record.get("commands", []) + [command]  # every invocation behind this record
    record.update(benchmark="behaviors-demo", cpu=cpu_name(), threads=os.environ.get("OMP_NUM_THREADS", "default"),
                  command=" && ".join(record["commands"]))
    if "results" in record:
        write_record(out, record, _markdown(record))
    else:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record_path, record)
    return record


def _markdown(record: dict) -> str:
    r = record["results"]
    t = record.get("teacher", {})

    def row(label, key, note):
        x = r[key]
        cites = "-" if x.get("citing_share") is None else f"{x['citing_share']:.2f}"
        return (f"| {label} | {x['accuracy']:.3f} | {x['gen_tokens']:.1f} | {x['prompt_tokens']:.1f} | {cites} | {note} |\n")

    out = ["# behaviors: metacognitive reuse on a tiny from-scratch model\n\n",
           f"`{record['command']}` on {record['cpu']} (OMP_NUM_THREADS={record['threads']}). Task `behavior_chain` "
           "(questions `Q: <topic> <n>`, each topic a chain of 2-3 of four digit procedures); 300 held-out "
           "questions (numbers never seen in training), greedy decoding; tokens are characters (char tokenizer); "
           "generated tokens include the end-of-sequence token.\n\n",
           "| model | accuracy | generated tokens | prompt tokens | share citing a behavior | what it is |\n",
           "|---|---|---|---|---|---|\n",
           row("mix, with BCI", "mix_with_bci", "K=3 behaviors of the question's topic prepended (topic retrieval)"),
           row("mix, without BCI", "mix_without_bci", "the same model and questions, plain prompt"),
           row("student after plain SFT", "student_sft", "trained on the teacher's plain answers"),
           row("student after BC-SFT", "student_bcsft", "trained on the teacher's BCI answers, no behaviors in its prompt"),
           "\n"]
    if t:
        out.append("Teacher (programmatic) on the training questions: "
                   + "; ".join(f"{m}: accuracy {v['teacher_accuracy']:.3f}, {v['teacher_completion_tokens']:.1f} "
                               f"generated words, {v['teacher_prompt_tokens']:.1f} prompt words"
                               for m, v in t.items()) + ".\n\n")
    if "extract" in record:
        e = record["extract"]
        out.append(f"Handbook: {len(e['behaviors'])} behaviors extracted from {e['examples']} questions "
                   f"({e['parsed']} parsed, {e['merged']} merged as duplicates, {e['rejected']} lines rejected).\n\n")
    mw, mo = r["mix_with_bci"], r["mix_without_bci"]
    s, b = r["student_sft"], r["student_bcsft"]
    out.append(
        "What this tests. *BCI*: one model trained on both formats answers the same held-out questions with and "
        "without the retrieved block; the block is the only difference, so the rows measure what conditioning on "
        f"behaviors does to accuracy ({mw['accuracy']:.3f} vs {mo['accuracy']:.3f}) and to generated tokens "
        f"({mw['gen_tokens']:.1f} vs {mo['gen_tokens']:.1f}, "
        f"{100 * (1 - mw['gen_tokens'] / mo['gen_tokens']):.0f}% fewer) at the cost of "
        f"{mw['prompt_tokens'] - mo['prompt_tokens']:.0f} more prompt tokens. It does not test whether a model "
        "reads instructions it was never trained on (a from-scratch model cannot); the behaviors act as cues "
        "that it learned to use. *BC-SFT vs SFT*: the same student architecture, the same questions and steps, "
        "prompts without behaviors; only the teacher's answers differ "
        f"(accuracy {b['accuracy']:.3f} vs {s['accuracy']:.3f}, generated tokens {b['gen_tokens']:.1f} vs "
        f"{s['gen_tokens']:.1f}). The short cited form asks the model to compute a procedure's result "
        "without writing its steps, so on a tiny model fewer tokens can cost accuracy; the numbers above are "
        "what came out of one seed, untuned.\n")
    steps = record.get("train_steps") or {}
    if steps:
        out.append("\nTraining steps (batch 32): " + ", ".join(f"{k} {v}" for k, v in steps.items()) + ".\n")
    for h in record.get("history", []):
        hr, hs = h["results"], h.get("train_steps") or {}
        out.append(f"\nEarlier report (steps {', '.join(f'{k} {v}' for k, v in hs.items()) or 'unrecorded'}): "
                   + "; ".join(f"{k} accuracy {v['accuracy']:.3f}, {v['gen_tokens']:.1f} generated tokens"
                               for k, v in hr.items()) + ".\n")
    out.append("\nTimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in record["timings_s"].items()) + ".\n")
    return "".join(out)
