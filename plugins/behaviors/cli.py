"""``metareason behaviors extract|list|show|search|prune|export|import|stats|improve|bcsft|bench``.

Handbook commands find the handbook through ``--config`` (its ``behaviors:`` section, with
dotted ``--set`` overrides) and/or ``--handbook PATH`` / ``--embedder SPEC`` (which win).
Heavy modules load only when a command runs.
"""
from __future__ import annotations

import json
import re
import sys

from metareason.api import UserError


def _section(args):
    from metareason.plugins.behaviors.config import BehaviorsSection

    if getattr(args, "config", None):
        from metareason.plugins.behaviors.examples import section_of
        from metareason.api import load_config

        config, _ = load_config(args.config, list(getattr(args, "set", None) or []))
        section = section_of(type("K", (), {"config": config, "source": args.config})())
    else:
        section = BehaviorsSection()
    update = {}
    if getattr(args, "handbook", None):
        update["handbook"] = args.handbook
    if getattr(args, "embedder", None):
        update["embedder"] = args.embedder
    return section.model_copy(update=update)


def _open(args, create: bool = False):
    from metareason.plugins.behaviors.store import open_handbook

    return open_handbook(_section(args), create=create)


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


# ------------------------------------------------------------------ pipeline commands
def _extract(args) -> int:
    from metareason.api import Kernel
    from metareason.plugins.behaviors.examples import load_examples, section_of
    from metareason.plugins.behaviors.store import open_handbook
    from metareason.plugins.behaviors.strategist import ExtractionReport, extract_behaviors

    kernel = Kernel(args.config, overrides=list(args.overrides) + (["quiet=true"] if args.quiet else []))
    section = section_of(kernel)
    pairs = load_examples(kernel, args.split, args.limit)
    generator = kernel.generator(section.strategist)
    report = ExtractionReport()
    with open_handbook(section) as hb:
        try:
            extract_behaviors(generator, [ex for _, ex in pairs], hb, section, quiet=kernel.config.quiet,
                              report=report)
        finally:
            print(json.dumps(dict(report.to_json(), handbook=str(hb.path), behaviors_in_handbook=len(hb)),
                             indent=2), file=sys.stdout)
    return 0


def _improve(args) -> int:
    from pathlib import Path

    from metareason.api import Kernel
    from metareason.plugins.behaviors.examples import load_examples, section_of
    from metareason.plugins.behaviors.improve import self_improve

    kernel = Kernel(args.config, overrides=list(args.overrides) + (["quiet=true"] if args.quiet else []))
    section = section_of(kernel)
    pairs = load_examples(kernel, args.split, args.limit)
    out = Path(section.output or kernel.config.run_dir / "self_improve.jsonl")
    if not args.store:
        _print(self_improve(kernel, pairs, out=out, quiet=kernel.config.quiet))
        return 0
    from metareason.plugins.behaviors.store import open_handbook

    with open_handbook(section) as hb:
        _print(self_improve(kernel, pairs, out=out, quiet=kernel.config.quiet, handbook=hb))
    return 0


def _bcsft(args) -> int:
    from metareason.plugins.behaviors.bcsft import run_bcsft

    summary = run_bcsft(args.config, list(args.overrides), mode=args.mode, quiet=args.quiet, name=args.name,
                        train=not args.data_only)
    _print(summary)
    return 0


def _bench(args) -> int:
    if args.which == "retrieval":
        from metareason.plugins.behaviors.retrieval_bench import run_retrieval_bench

        run_retrieval_bench(n=args.n, queries=args.queries, out=args.out or "bench-results/behaviors-retrieval.json",
                            embedder=args.embedder or "minilm", quiet=args.quiet)
    else:
        from metareason.plugins.behaviors.demo import run_demo

        run_demo(args.config_dir, stages=args.stages, out=args.out or "bench-results/behaviors-demo.json",
                 quiet=args.quiet)
    return 0


# ------------------------------------------------------------------ handbook commands
def _list(args) -> int:
    with _open(args) as hb:
        items = hb.all(topic=args.topic, order=args.order)
        for b in items[: args.limit] if args.limit else items:
            print(f"{b.name}\t{b.topic or '-'}\tcited={b.cited} correct={b.cited_correct} "
                  f"retrieved={b.retrieved}\t{b.instruction}")
    return 0


def _show(args) -> int:
    with _open(args) as hb:
        b = hb.get(args.name)
        if b is None:
            raise UserError(f"{hb.path}: no behavior named {args.name!r}")
        _print(b.to_json())
    return 0


def _search(args) -> int:
    with _open(args) as hb:
        if args.topic:
            found = [(b, None) for b in hb.by_topic(args.topic, args.k)]
        else:
            if not args.query:
                raise UserError("search: give a QUERY or --topic")
            found = hb.search(args.query, args.k)
        for b, score in found:
            print(f"{'' if score is None else f'{score:.3f}'}\t{b.name}\t{b.instruction}")
    return 0


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([dhms]?)$")


def parse_days(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise UserError(f"--older-than: {text!r} is not a duration (e.g. 30, 30d, 12h, 90m)")
    scale = {"": 1.0, "d": 1.0, "h": 1 / 24, "m": 1 / 1440, "s": 1 / 86400}[m.group(2)]
    return float(m.group(1)) * scale


def _prune(args) -> int:
    days = parse_days(args.older_than)
    if args.min_cited < 0:
        raise UserError("--min-cited: must be >= 0")
    with _open(args) as hb:
        removed = hb.prune(args.min_cited, days)
        _print({"removed": len(removed), "names": removed, "left": len(hb)})
    return 0


def _export(args) -> int:
    with _open(args) as hb:
        n = hb.export_jsonl(args.out)
    print(f"wrote {n} behaviors to {args.out}")
    return 0


def _import(args) -> int:
    if args.max_mb <= 0:
        raise UserError(f"--max-mb: expected a positive number of megabytes, got {args.max_mb}")
    with _open(args, create=True) as hb:
        report = hb.import_jsonl(args.path, max_bytes=args.max_mb * 1024 * 1024)
        _print({"inserted": report.inserted, "merged": report.merged, "behaviors_in_handbook": len(hb)})
    return 0


def _stats(args) -> int:
    with _open(args) as hb:
        _print(hb.stats())
    return 0


def _handbook_args(p) -> None:
    p.add_argument("--config", "-c", help="run config whose behaviors: section names the handbook")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="dotted override of --config (repeatable)")
    p.add_argument("--handbook", help="handbook file (overrides the config's behaviors.handbook)")
    p.add_argument("--embedder", help="minilm | sentence-transformers dir | hashing[:dim] (overrides the config)")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("behaviors", help="metacognitive reuse: the behavior handbook, BCI, "
                                                "self-improvement, BC-SFT")
    sub = p.add_subparsers(dest="behaviors_command", metavar="SUBCOMMAND", required=True)

    def pipeline(name, fn, help_text):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("config", help="YAML run config with a behaviors: section and generators:")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. behaviors.batch_size=8")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        s.set_defaults(func=fn)
        return s

    s = pipeline("extract", _extract, "strategist: solve -> reflect -> extract behaviors into the handbook")
    s.add_argument("--split", choices=("train", "eval"), default="train", help="questions of data.train or data.eval")
    s.add_argument("--limit", type=int, default=None, help="at most N questions")
    s = pipeline("improve", _improve, "behavior-guided self-improvement vs critique-and-revise on the same questions")
    s.add_argument("--split", choices=("train", "eval"), default="eval")
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--store", action="store_true", help="also add the behaviors extracted from attempt 1 to the handbook")
    s = pipeline("bcsft", _bcsft, "teacher answers under BCI (or plainly), then SFT of the student on them")
    s.add_argument("--mode", choices=("bci", "plain"), default="bci", help="bci: BC-SFT; plain: the SFT baseline")
    s.add_argument("--name", default=None, help="run name of the student (default <name>-bcsft / <name>-sft)")
    s.add_argument("--data-only", action="store_true", help="write the teacher's JSONL, do not train")

    s = sub.add_parser("list", help="list behaviors")
    _handbook_args(s)
    s.add_argument("--topic", default=None)
    s.add_argument("--order", choices=("id", "cited", "retrieved", "name"), default="id")
    s.add_argument("--limit", type=int, default=None)
    s.set_defaults(func=_list)
    s = sub.add_parser("show", help="one behavior with its provenance and counters (JSON)")
    _handbook_args(s)
    s.add_argument("name")
    s.set_defaults(func=_show)
    s = sub.add_parser("search", help="embedding top-K for a query, or a topic's behaviors (--topic)")
    _handbook_args(s)
    s.add_argument("query", nargs="?", default=None)
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--topic", default=None)
    s.set_defaults(func=_search)
    s = sub.add_parser("prune", help="delete behaviors cited fewer than N times and older than D")
    _handbook_args(s)
    s.add_argument("--min-cited", type=int, required=True, metavar="N")
    s.add_argument("--older-than", required=True, metavar="D", help="days, or with a unit: 30d, 12h, 90m, 10s")
    s.set_defaults(func=_prune)
    s = sub.add_parser("export", help="write the handbook as JSONL (one behavior per line, with provenance)")
    _handbook_args(s)
    s.add_argument("out")
    s.set_defaults(func=_export)
    s = sub.add_parser("import", help="add behaviors from JSONL (near-duplicates merge)")
    _handbook_args(s)
    s.add_argument("path")
    s.add_argument("--max-mb", type=int, default=256, metavar="MB",
                   help="refuse a file larger than this (default 256; the file is read whole and checked first)")
    s.set_defaults(func=_import)
    s = sub.add_parser("stats", help="counts, counters, topics, most cited (JSON)")
    _handbook_args(s)
    s.set_defaults(func=_stats)

    s = sub.add_parser("bench", help="measured results under bench-results/: demo (the first tiny-model demo, "
                       "kept as a record; the redesigned experiment is bench/behaviors_method.py) | retrieval (10k)")
    s.add_argument("which", choices=("demo", "retrieval"))
    s.add_argument("config_dir", nargs="?", default="configs/behaviors", help="demo: folder of its configs")
    s.add_argument("--stages", default="all", help="demo: comma list of stages (default all)")
    s.add_argument("--n", type=int, default=10000, help="retrieval: handbook size")
    s.add_argument("--queries", type=int, default=1000, help="retrieval: held-out paraphrase queries")
    s.add_argument("--embedder", default=None, help="retrieval: embedder (default minilm)")
    s.add_argument("--out", default=None, help="result JSON path (.md beside it)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_bench)
