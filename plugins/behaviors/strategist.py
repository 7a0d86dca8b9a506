"""The metacognitive strategist: solve -> reflect -> extract, behaviors into the handbook.

For each batch of examples (``behaviors.batch_size``) the strategist generator (``behaviors.
strategist``, a ``generators:`` entry) answers the three prompt templates in turn; the
extraction output is parsed strictly (``behavior.parse_extraction``); malformed lines are
rejected and counted. Each batch's behaviors are committed to the handbook (with provenance:
example id, hash of the solution trace, generator name) before the next batch starts, so a
failure keeps everything extracted before it. A generator call that keeps failing after
``behaviors.retries`` retries is reported with its example id: extraction stops
(``ExtractionError``) unless ``behaviors.keep_going``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from metareason.api import UserError
from metareason.plugins.behaviors.behavior import Provenance, parse_extraction, trace_hash
from metareason.plugins.behaviors.calls import CallFailure, stage_call
from metareason.plugins.behaviors.config import fill


class ExtractionError(UserError):
    """The strategist failed on an example (after retries); the message names the example."""


REJECTED_SAMPLES = 20  # rejected lines kept in the report, with their reasons
REJECTED_PER_EXAMPLE = 2


@dataclass
class ExtractionReport:
    examples: int = 0
    examples_done: int = 0
    returned_lines: int = 0  # non-blank lines of the extraction outputs (what the parser was given)
    parsed: int = 0  # behaviors that passed the strict parser
    inserted: int = 0
    merged: int = 0
    rejected: int = 0  # lines / items the parser refused
    rejected_samples: list = field(default_factory=list)  # the first two of each example, 20 at most, with the reason
    failures: list = field(default_factory=list)  # {example_id, stage, error}

    def to_json(self) -> dict:
        return asdict(self)


def example_id(ex: dict, i: int) -> str:
    return str(ex.get("id", i))


def extract_behaviors(generator, examples: list[dict], handbook, section, quiet: bool = False,
                      report: Optional[ExtractionReport] = None) -> ExtractionReport:
    from metareason.api import progress

    report = report or ExtractionReport()
    report.examples += len(examples)
    p = section.prompts
    topic_field = section.bci.topic_field
    gen_name = getattr(generator, "name", section.strategist)
    bar = progress(total=len(examples), desc="extract", quiet=quiet)
    try:
        for start in range(0, len(examples), section.batch_size):
            batch = examples[start: start + section.batch_size]
            ids = [example_id(ex, start + j) for j, ex in enumerate(batch)]
            alive = list(range(len(batch)))
            texts: dict[str, dict[int, str]] = {}
            failures: list[CallFailure] = []
            for stage in ("solve", "reflect", "extract"):
                prompts = [_prompt(p, stage, batch[j]["prompt"], texts, j) for j in alive]
                got, failed = stage_call(generator, prompts, [ids[j] for j in alive], section, stage, quiet)
                failures.extend(failed)
                texts[stage] = {alive[i]: c.text for i, c in got.items()}
                alive = [j for j in alive if j in texts[stage]]
            new = []
            for j in alive:
                report.returned_lines += sum(1 for line in texts["extract"][j].splitlines() if line.strip())
                parsed = parse_extraction(texts["extract"][j], section.max_instruction_sentences)
                report.rejected += len(parsed.rejected)
                for line, why in parsed.rejected:
                    # a few from each example, so that one looping output cannot fill the samples
                    mine = sum(r["example_id"] == ids[j] for r in report.rejected_samples)
                    if len(report.rejected_samples) < REJECTED_SAMPLES and mine < REJECTED_PER_EXAMPLE:
                        report.rejected_samples.append({"example_id": ids[j], "text": line, "reason": why})
                topic = batch[j].get(topic_field)
                for b in parsed.behaviors:
                    b.topic = None if topic is None else str(topic)
                    b.provenance = [Provenance(ids[j], trace_hash(texts["solve"][j]), gen_name)]
                    new.append(b)
            report.parsed += len(new)
            ins = handbook.add_many(new)  # committed before the next batch: a later failure keeps it
            report.inserted += ins.inserted
            report.merged += ins.merged
            report.examples_done += len(alive)
            report.failures.extend(asdict(f) for f in failures)
            bar.update(len(batch))
            if failures and not section.keep_going:
                f = failures[0]
                raise ExtractionError(
                    f"strategist {gen_name!r} failed on example {f.example_id} at the {f.stage} step after "
                    f"{section.retries} retries: {f.error} ({report.inserted + report.merged} behaviors of "
                    f"{report.examples_done} examples are in {handbook.path})")
    finally:
        bar.close()
    return report


def _prompt(p, stage: str, question: str, texts: dict, j: int) -> str:
    if stage == "solve":
        return fill(p.solve, question=question)
    if stage == "reflect":
        return fill(p.reflect, question=question, trace=texts["solve"][j])
    return fill(p.extract, question=question, trace=texts["solve"][j], reflection=texts["reflect"][j])
