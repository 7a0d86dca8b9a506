"""The strategist pipeline through a real ``metareason serve`` subprocess with the ``openai``
generator backend: solve -> reflect -> extract over HTTP, behaviors parsed and stored."""
import pytest

from metareason.kernel import Kernel
from metareason.plugins.behaviors.examples import load_examples
from metareason.plugins.behaviors.store import Handbook
from metareason.plugins.behaviors.strategist import extract_behaviors
from tests.conftest import save_bigram_llama
from tests.test_serve import Served

# Greedy, the bigram model continues any prompt ending in "\n" with exactly this line (every
# character of it is distinct, so the chain is a path): a valid extraction line.
LINE = "behavior_dusk: Cnt."
CHAIN = {"\n": LINE[0]} | {a: b for a, b in zip(LINE, LINE[1:])}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert len(set(LINE)) == len(LINE)
    s = Served(save_bigram_llama(tmp_path_factory.mktemp("strategist"), CHAIN), "--model-name", "strategist-lm")
    yield s
    s.stop()


@pytest.mark.slow
def test_strategist_pipeline_through_served_openai_endpoint(server, tmp_path):
    cfg = {
        "name": "beh-serve", "output_dir": str(tmp_path / "runs"), "plugins": ["behaviors"], "quiet": True,
        "behaviors": {"enabled": True, "handbook": str(tmp_path / "hb.db"), "embedder": "hashing",
                      "batch_size": 2, "max_new_tokens": 40, "retry_backoff": 0.0},
        "generators": {"strategist": {"type": "openai", "base_url": server.base + "/v1", "model": "strategist-lm",
                                      "max_retries": 1}},
        "data": {"train": [{"task": "behavior_chain", "num_samples": 3, "seed": 0, "params": {"split": "train"}}]},
    }
    kernel = Kernel(cfg)
    section = kernel.config.behaviors
    exs = [ex for _, ex in load_examples(kernel)]
    gen = kernel.generator("strategist")
    try:
        with Handbook(section.handbook, embedder="hashing") as hb:
            rep = extract_behaviors(gen, exs, hb, section, quiet=True)
            assert (rep.examples_done, rep.parsed, rep.rejected, rep.failures) == (3, 3, 0, [])
            assert (rep.inserted, rep.merged) == (1, 2)
            b = hb.get("behavior_dusk")
            assert b.instruction == "Cnt."
            assert sorted(p.example_id for p in b.provenance) == sorted(ex["id"] for ex in exs)
            assert all(p.generator == "strategist" and len(p.trace_hash) == 16 for p in b.provenance)
            assert {b.topic, *b.topics} == {ex["topic"] for ex in exs}
    finally:
        gen.close()
