"""``metareason behaviors bench retrieval``: a 10,000-behavior handbook.

Behaviors are generated programmatically as (domain x technique x goal): 20 x 25 x 20 = 10,000
distinct instructions ("In modular arithmetic problems, check small cases to find the
remainder."). Every facet also has a paraphrase that is never used to build the handbook; a
query is the paraphrase of one behavior's three facets in another order ("When the remainder is
asked for, try the first few values (congruence questions)."), and it is a hit at K when that
behavior is among the top K. Measured: insert throughput (embedding + merge check + SQLite
write, batches of ``batch``), query latency p50/p99 (one query: embedding + FAISS search + row
look-up) and each part alone (embedding, FAISS search, SQL row look-up), batched throughput (all
queries in one ``search_many`` call), recall@1/5/10, index rebuild time from the DB. A hit is the
target behavior itself: a target that merged into another behavior on insert is a miss, and
finding the behavior it merged into is reported apart.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np

DOMAINS = [
    ("modular arithmetic", "congruence questions"), ("triangle geometry", "problems about triangles"),
    ("polynomial roots", "questions on the zeros of polynomials"), ("probability", "chance and likelihood questions"),
    ("combinatorics", "counting problems"), ("sequences and series", "questions about progressions"),
    ("inequalities", "problems comparing quantities"), ("number bases", "positional numeral system tasks"),
    ("circle geometry", "problems with circles and arcs"), ("linear systems", "simultaneous equation problems"),
    ("prime factorization", "questions on prime decompositions"), ("functional equations", "problems defining a function by an identity"),
    ("vectors", "problems with arrows in space"), ("logarithms", "questions with log expressions"),
    ("trigonometry", "sine and cosine problems"), ("graph theory", "problems on networks of nodes and edges"),
    ("complex numbers", "questions with imaginary units"), ("integer divisibility", "questions on what divides what"),
    ("rates and work", "speed and joint-work word problems"), ("coordinate geometry", "problems on the cartesian plane"),
]
TECHNIQUES = [
    ("check small cases", "try the first few values"), ("substitute a new variable", "rename a subexpression with a fresh letter"),
    ("exploit symmetry", "use the problem's invariance under swapping"), ("bound the expression", "squeeze the quantity between limits"),
    ("factor the expression", "write it as a product"), ("work backwards from the goal", "reverse the reasoning from the target"),
    ("draw a diagram", "sketch a picture"), ("use complementary counting", "count what is excluded and subtract"),
    ("apply the pigeonhole principle", "argue that some box gets two items"), ("look for an invariant", "find a quantity that never changes"),
    ("use induction", "prove the base case then the step"), ("telescope the sum", "let consecutive terms cancel"),
    ("complete the square", "rewrite the quadratic as a square plus a constant"), ("use a parity argument", "reason about odd and even"),
    ("set up an equation", "translate the words into a formula"), ("take logarithms", "apply log to both sides"),
    ("use generating functions", "encode the counts as power series coefficients"),
    ("apply the triangle inequality", "use that one side is shorter than the other two"),
    ("use the extremal principle", "consider the largest or smallest element"),
    ("split into cases", "separate the situation into exhaustive branches"), ("normalize the scale", "choose units so one length is one"),
    ("use modular reduction", "reduce everything by the modulus first"), ("estimate and verify", "guess the order of magnitude then check"),
    ("apply inclusion-exclusion", "add single sets, subtract pairwise overlaps"), ("use coordinates", "place the figure on axes"),
]
GOALS = [
    ("to find the remainder", "when the remainder is asked for"), ("to count arrangements", "when asked how many orderings exist"),
    ("to find the maximum", "when the largest possible value is wanted"), ("to prove a bound", "when an estimate must be shown"),
    ("to find an area", "when a region's size is required"), ("to solve for the unknown", "when the missing value is sought"),
    ("to simplify an expression", "when a formula must be made shorter"), ("to find the minimum", "when the least value is wanted"),
    ("to compute a probability", "when the chance of an event is asked"), ("to find a closed form", "when an explicit formula is needed"),
    ("to check divisibility", "when asked whether one number divides another"), ("to count solutions", "when the number of answers is asked"),
    ("to find a length", "when a distance must be computed"), ("to find an angle", "when the measure of an angle is wanted"),
    ("to evaluate a sum", "when the total of many terms is needed"), ("to find the last digit", "when only the units digit matters"),
    ("to compare two quantities", "when deciding which of two values is bigger"),
    ("to show impossibility", "when one must prove something cannot happen"),
    ("to find an expected value", "when the average outcome is asked"), ("to find integer solutions", "when only whole-number answers count"),
]


def _slug(text: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split())[:28].strip("_")


def generate(n: int):
    """``(behaviors, paraphrase queries)``: the first ``n`` combinations in a fixed random order."""
    from metareason.plugins.behaviors.behavior import Behavior

    combos = [(d, t, g) for d in range(len(DOMAINS)) for t in range(len(TECHNIQUES)) for g in range(len(GOALS))]
    random.Random(0).shuffle(combos)
    combos = combos[:n]
    behaviors, queries = [], []
    for d, t, g in combos:
        dom, tech, goal = DOMAINS[d], TECHNIQUES[t], GOALS[g]
        name = f"behavior_{_slug(dom[0])}_{_slug(tech[0])}_{_slug(goal[0])}"
        behaviors.append(Behavior(name, f"In {dom[0]} problems, {tech[0]} {goal[0]}.", topic=dom[0]))
        queries.append(f"{goal[1][0].upper()}{goal[1][1:]}, {tech[1]} ({dom[1]}).")
    return behaviors, queries


def score_hits(found: list, targets: list, stored_as: list, ks=(1, 5, 10)) -> dict:
    """Recall@k over queries: ``found[q]`` the ranked names returned for query q, ``targets[q]`` the
    name of the behavior it paraphrases, ``stored_as[q]`` the name that behavior was stored under
    (another one's name when it merged on insert). A hit at k is the target itself among the top k;
    a target merged into another behavior is a miss, and finding the behavior it merged into is
    counted apart (``found_merged_into``), never as a hit."""
    recall = {f"@{k}": 0 for k in ks}
    merged_found = {f"@{k}": 0 for k in ks}
    merged = 0
    for names, target, into in zip(found, targets, stored_as):
        merged += into != target
        for k in ks:
            recall[f"@{k}"] += target in names[:k]
            merged_found[f"@{k}"] += into != target and into in names[:k]
    n = max(len(targets), 1)
    return {"recall": {k: v / n for k, v in recall.items()}, "merged_targets": merged,
            "found_merged_into": merged_found}


def run_retrieval_bench(n: int = 10000, queries: int = 1000, out: str = "bench-results/behaviors-retrieval.json",
                        embedder: str = "minilm", batch: int = 500, quiet: bool = False) -> dict:
    import os
    import platform

    from metareason.api import cpu_name, progress, write_record
    from metareason.plugins.behaviors.store import Handbook

    behaviors, paraphrases = generate(n)
    rng = random.Random(1)
    picked = sorted(rng.sample(range(len(behaviors)), min(queries, len(behaviors))))
    with tempfile.TemporaryDirectory() as tmp:
        hb = Handbook(Path(tmp) / "handbook.db", embedder=embedder)
        hb.embedder.encode(["warm up"])
        stored_name = []
        bar = progress(total=len(behaviors), desc="insert", quiet=quiet)
        t0 = time.perf_counter()
        for s in range(0, len(behaviors), batch):
            rep = hb.add_many(behaviors[s: s + batch])
            stored_name.extend(rep.names)
            bar.update(len(behaviors[s: s + batch]))
        insert_s = time.perf_counter() - t0
        bar.close()
        stored = len(hb)
        t0 = time.perf_counter()
        hb.close()  # writes the index
        save_s = time.perf_counter() - t0
        os.remove(Path(tmp) / "handbook.db.faiss")
        t0 = time.perf_counter()
        hb = Handbook(Path(tmp) / "handbook.db", embedder=embedder)
        hb.search("warm", 1)  # rebuilds the index from the DB
        rebuild_s = time.perf_counter() - t0
        # one query at a time: the whole search, then its three parts timed apart
        lat, embed_lat, faiss_lat, sql_lat, found_names = [], [], [], [], []
        bar = progress(total=len(picked), desc="query", quiet=quiet)
        for i in picked:
            t0 = time.perf_counter()
            found = hb.search(paraphrases[i], 10)
            lat.append(time.perf_counter() - t0)
            found_names.append([b.name for b, _ in found])
            t0 = time.perf_counter()
            vec = hb.embedder.encode([paraphrases[i]])
            embed_lat.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, ids = hb.index_search(vec, 10)
            faiss_lat.append(time.perf_counter() - t0)
            wanted = [int(x) for x in ids[0] if x >= 0]
            t0 = time.perf_counter()
            hb.rows(wanted)
            sql_lat.append(time.perf_counter() - t0)
            bar.update(1)
        bar.close()
        # batched: every query in one search_many call, and its embedding part alone
        texts = [paraphrases[i] for i in picked]
        t0 = time.perf_counter()
        batched = hb.search_many(texts, 10)
        batch_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hb.embedder.encode(texts)
        batch_embed_s = time.perf_counter() - t0
        hb.close()
    # the batched path should rank as the single one does (a mismatch is a float tie broken apart)
    batch_mismatch = sum([b.name for b, _ in r] != names for r, names in zip(batched, found_names))
    hits = score_hits(found_names, [behaviors[i].name for i in picked], [stored_name[i] for i in picked])

    def pct(xs, q):
        return float(np.percentile(np.array(xs) * 1000.0, q))

    record = {
        "benchmark": "behaviors-retrieval", "command": f"metareason behaviors bench retrieval --n {n} --queries {queries}"
        + (f" --embedder {embedder}" if embedder != "minilm" else ""),
        "cpu": cpu_name(), "threads": os.environ.get("OMP_NUM_THREADS", "default"), "python": platform.python_version(),
        "embedder": embedder, "generated": n, "stored": stored, "merged_on_insert": n - stored,
        "insert_batch": batch, "insert_s": insert_s, "insert_per_s": n / insert_s,
        "index_save_s": save_s, "index_rebuild_from_db_s": rebuild_s,
        "queries": len(picked), "query_ms_p50": pct(lat, 50), "query_ms_p99": pct(lat, 99),
        "embed_ms_p50": pct(embed_lat, 50), "embed_ms_p99": pct(embed_lat, 99),
        "faiss_search_ms_p50": pct(faiss_lat, 50), "faiss_search_ms_p99": pct(faiss_lat, 99),
        "sql_rows_ms_p50": pct(sql_lat, 50), "sql_rows_ms_p99": pct(sql_lat, 99),
        "batched_queries_per_s": len(picked) / batch_s, "batched_s": batch_s, "batched_embed_s": batch_embed_s,
        "batched_rank_mismatches": batch_mismatch,
        "recall": hits["recall"], "merged_targets": hits["merged_targets"],
        "found_merged_into": hits["found_merged_into"],
        "query_example": paraphrases[picked[0]], "target_example": behaviors[picked[0]].instruction,
    }
    md = (f"# behaviors: retrieval on a handbook of {n:,} behaviors\n\n"
          f"`{record['command']}` on {record['cpu']} (OMP_NUM_THREADS={record['threads']}), embedder `{embedder}`.\n\n"
          "| measure | value |\n|---|---|\n"
          f"| behaviors generated / stored (merged on insert) | {n} / {stored} ({n - stored}) |\n"
          f"| insert throughput (embed + merge check + SQLite, batches of {batch}) | {record['insert_per_s']:.0f} behaviors/s ({insert_s:.1f} s) |\n"
          f"| query latency p50 / p99 (embed + FAISS + rows) | {record['query_ms_p50']:.2f} / {record['query_ms_p99']:.2f} ms |\n"
          f"| embedding one query p50 / p99 | {record['embed_ms_p50']:.2f} / {record['embed_ms_p99']:.2f} ms |\n"
          f"| FAISS search alone p50 / p99 | {record['faiss_search_ms_p50']:.3f} / {record['faiss_search_ms_p99']:.3f} ms |\n"
          f"| SQL row look-up alone p50 / p99 | {record['sql_rows_ms_p50']:.3f} / {record['sql_rows_ms_p99']:.3f} ms |\n"
          f"| batched `search_many` ({len(picked)} queries in one call) | {record['batched_queries_per_s']:.0f} queries/s "
          f"({batch_s:.2f} s; embedding the same queries again, alone: {batch_embed_s:.2f} s) |\n"
          f"| index rebuild from the DB | {rebuild_s:.2f} s |\n"
          + "".join(f"| recall{k} ({len(picked)} held-out paraphrases; a hit is the target itself) | {v:.3f} |\n"
                    for k, v in record["recall"].items())
          + f"| queries whose target was merged into another behavior (never a hit) | {hits['merged_targets']} |\n"
          + "".join(f"| of those, the behavior it merged into found{k} (reported apart, not a hit) | {v} |\n"
                    for k, v in hits["found_merged_into"].items())
          + f"\nExample query: \"{record['query_example']}\" -> target \"{record['target_example']}\".\n"
          "Queries paraphrase every facet (domain, technique, goal) with wording never inserted; the 10,000 "
          "behaviors share their templates, so a neighbour differs from the target in one facet only.\n")
    write_record(out, record, md)
    return record
