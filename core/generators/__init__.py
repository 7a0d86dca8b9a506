"""Generator backends: "a model that answers prompts" behind one interface.

Methods need models that are not the one being trained: a strategist or teacher that writes
behaviors or critiques, the CSPO alter. Users run those behind an OpenAI-compatible endpoint
(vLLM, SGLang, TGI, a hosted API, ``metareason serve``), locally, or as a program for synthetic
tasks. Plugins ask the kernel for a generator by the name it has in the run config's
``generators:`` section (``kernel.generator("teacher")``) and never build a client themselves.

    gens = kernel.generator("teacher").generate(["2+2="], n=2, max_new_tokens=8, temperature=0.7)
    gens[0].text, gens[0].prompt_tokens, gens[0].completion_tokens, gens[0].finish_reason

Built-in types: ``local`` (:mod:`.local`), ``openai`` (:mod:`.openai_backend`), ``python``
(:mod:`.python_backend`); plugins add types with ``metareason_register_generator_backends``.
"""
from metareason.generators.base import Completion, Generator, GeneratorError, Prompt, check_params

__all__ = ["Completion", "Generator", "GeneratorError", "Prompt", "check_params"]
