"""The ``behaviors:`` config section.

Every hook of the plugin is a no-op unless ``behaviors.enabled`` is true; behavior-conditioned
inference (the prompt transform) additionally needs ``behaviors.bci.enabled``. The prompt
templates are the defaults written for this project (docs/behaviors.md explains each); every
``{placeholder}`` a template needs is checked when the config is loaded.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from metareason.api import Section

SOLVE_PROMPT = (
    "Solve the problem step by step, then give the final answer on a last line as 'answer: <value>'.\n"
    "Problem: {question}\n"
)
REFLECT_PROMPT = (
    "Here is a problem and a solution to it.\nProblem: {question}\nSolution: {trace}\n"
    "Reflect on the solution: is it correct? Which steps are generic procedures that would help on "
    "other problems, and which steps were re-derived at length when a known rule would have been shorter? "
    "Write your reflection.\n"
)
EXTRACT_PROMPT = (
    "Problem: {question}\nSolution: {trace}\nReflection: {reflection}\n"
    "Turn the reusable procedures of this solution into behaviors. Write one behavior per line, exactly "
    "in the form\nbehavior_<snake_case_name>: <instruction of one or two sentences>\n"
    "and nothing else (or a JSON list of objects with keys name and instruction).\n"
)
BCI_BLOCK = (
    "Behaviors (use them where they apply and cite each one you use by its name):\n"
    "{behaviors}\n\n{question}"
)
BEHAVIOR_LINE = "- {name}: {instruction}"
CRITIQUE_PROMPT = (
    "Problem: {question}\nAttempt: {trace}\n"
    "Critique the attempt: point out every error or gap, and say how to fix it.\n"
)
REVISE_PROMPT = (
    "Problem: {question}\nAttempt: {trace}\nCritique: {critique}\n"
    "Write a corrected solution, then the final answer on a last line as 'answer: <value>'.\n"
)


def _needs(*names: str):
    def check(cls, v: str) -> str:
        missing = [n for n in names if "{" + n + "}" not in v]
        if missing:
            raise ValueError(f"must contain {{{missing[0]}}}")
        return v
    return classmethod(check)


class PromptTemplates(Section):
    solve: str = SOLVE_PROMPT  # {question}
    reflect: str = REFLECT_PROMPT  # {question} {trace}
    extract: str = EXTRACT_PROMPT  # {question} {trace} {reflection}
    bci: str = BCI_BLOCK  # {behaviors} {question}
    behavior_line: str = BEHAVIOR_LINE  # {name} (required) {instruction}: one line of the BCI block
    critique: str = CRITIQUE_PROMPT  # {question} {trace}: critique-and-revise baseline
    revise: str = REVISE_PROMPT  # {question} {trace} {critique}

    _solve = field_validator("solve")(_needs("question"))
    _reflect = field_validator("reflect")(_needs("question", "trace"))
    _extract = field_validator("extract")(_needs("trace"))
    _bci = field_validator("bci")(_needs("behaviors", "question"))
    _line = field_validator("behavior_line")(_needs("name"))
    _critique = field_validator("critique")(_needs("question", "trace"))
    _revise = field_validator("revise")(_needs("question", "trace", "critique"))


class BCIConfig(Section):
    enabled: bool = False  # prepend retrieved behaviors to every prompt (training and generation)
    retrieval: Literal["topic", "embedding"] = "embedding"  # MATH setting (topic) or AIME setting (top-K)
    k: int = Field(4, gt=0)  # behaviors per prompt
    topic_field: str = "topic"  # example field holding the topic (retrieval: topic)
    count_citations: bool = True  # count citations of evaluated completions into the handbook


class BehaviorsSection(Section):
    enabled: bool = False  # turns every hook of the plugin on
    handbook: str = "behaviors/handbook.db"  # SQLite file; the FAISS index is <handbook>.faiss beside it
    embedder: str = "minilm"  # minilm | a sentence-transformers model directory | hashing[:dim] (tests)
    merge_threshold: float = Field(0.92, gt=0.0, le=1.0)  # cosine similarity above which an insert merges
    max_instruction_sentences: int = Field(2, gt=0)  # extraction rejects longer instructions

    strategist: str = "strategist"  # `generators:` entry: solve -> reflect -> extract
    teacher: str = "teacher"  # `generators:` entry answering under BCI for BC-SFT
    student: str = "student"  # `generators:` entry whose answers self-improvement revises
    max_new_tokens: int = Field(512, gt=0)  # per generator call of the pipelines
    temperature: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, gt=0)  # examples per generator call
    retries: int = Field(2, ge=0)  # extra attempts of a failing generator call
    retry_backoff: float = Field(0.5, ge=0.0)  # seconds, doubling per attempt
    keep_going: bool = False  # extraction: report a failing example and continue instead of stopping

    bci: BCIConfig = BCIConfig()
    prompts: PromptTemplates = PromptTemplates()
    output: Optional[str] = None  # JSONL written by improve / bcsft (default under runs/<name>/)
    keep_incorrect: bool = False  # bcsft: keep teacher answers whose final answer is wrong
    # bcsft: send each teacher prompt as chat messages, this system message then the prompt (with its
    # BCI block) as the user message, so a chat model answers in the template and under the system
    # prompt the student is trained and evaluated with (set it to data.system_prompt); None: text prompts
    teacher_system_prompt: Optional[str] = None

    @field_validator("embedder")
    @classmethod
    def _embedder(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be minilm, a sentence-transformers model directory or hashing[:dim]")
        return v


def fill(template: str, **values: str) -> str:
    """The template with each ``{name}`` of ``values`` replaced; other braces (a JSON example in
    a prompt) are left alone, unlike ``str.format``."""
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template
