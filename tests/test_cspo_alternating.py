"""Alternating control inference on a real local Ray runtime: target and alter (two tiny local
Hugging Face models, saved and loaded by path) each in their own actor; the target's
`<control>` hands over to the alter through the kernel's generation hook, the alter writes the
segment, the target resumes after it."""
import os

import pytest

from metareason import Kernel
from tests.test_cspo_takeover import save_bigram

ray = pytest.importorskip("ray")

# the target writes "123<control>", and after "</control>" it writes "9" and stops; on its own
# it would follow "<control>" with "X"
TARGET = {"?": "1", "1": "2", "2": "3", "3": "<control>", "<control>": "X", "</control>": "9", "9": "</s>"}
# the alter's prompt ends with "<control>": it writes "ok" and closes the segment
ALTER = {"<control>": "o", "o": "k", "k": "</control>"}


@pytest.fixture(scope="module")
def ray_runtime():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", include_dashboard=False, object_store_memory=80_000_000, num_cpus=2, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_alternating_inference_hands_over_between_ray_actors(ray_runtime, tmp_path):
    from metareason.plugins.cspo.alternating import AlternatingPair

    target = save_bigram(tmp_path / "target", TARGET)
    alter = save_bigram(tmp_path / "alter", ALTER)
    kernel = Kernel({"plugins": ["cspo"], "quiet": True, "generation": {"max_new_tokens": 16, "batch_size": 2},
                     "cspo": {"enabled": True, "ray": True, "target_model_name": str(target),
                              "alter_model_name": str(alter), "target_model_gpu": 0, "alter_model_gpu": 0,
                              "max_target_tokens": 64, "TRIGGER_TOKENS": ["<control>"],
                              "TARGET_VALIDATION_KEYWORDS": ["wait", "check"], "alter_max_tokens": 8}})
    with AlternatingPair(kernel.config) as pair:
        gens = pair.generate(["A=1;B=A+1;B=?", "A=2;B=A*3;B=?"], [{"id": "a"}, {"id": "b"}], quiet=True)
        stats = pair.stats()
        pids = {ray.get(pair.target.pid.remote()), ray.get(pair.alter.pid.remote()), os.getpid()}
    for g in gens:
        # "ok" can only come from the alter; "9" is the target resuming after the closing tag
        assert g["text"] == "123<control>ok</control>9"
        assert g["handovers"] == [{"round": 0, "trigger": "<control>", "text": "ok</control>"}]
        assert g["num_tokens"] == 5  # target tokens only: 1, 2, 3, <control>, 9
    assert stats["takeovers"] == 2
    assert len(pids) == 3  # driver, target actor and alter actor are three processes


def python_alter(prompt, **params):
    """A programmatic alter behind the `python` generator type."""
    assert prompt.endswith("<control>") and params["stop"] == ["</control>"] and params["temperature"] == 0.0
    return "fine</control>ignored"


def _pair_config(target, generators, ray_on):
    return {"plugins": ["cspo"], "quiet": True, "generation": {"max_new_tokens": 16, "batch_size": 2},
            "generators": generators,
            "cspo": {"enabled": True, "ray": ray_on, "target_model_name": str(target), "alter_generator": "alter",
                     "max_target_tokens": 64, "TRIGGER_TOKENS": ["<control>"], "alter_max_tokens": 8}}


def test_the_alter_can_be_a_python_generator(tmp_path):
    from metareason.plugins.cspo.alternating import AlternatingPair

    target = save_bigram(tmp_path / "target", TARGET)
    kernel = Kernel(_pair_config(target, {"alter": {"type": "python",
                                                    "function": "tests.test_cspo_alternating:python_alter"}}, False))
    with AlternatingPair(kernel.config) as pair:
        gens = pair.generate(["A=1;B=A+1;B=?"], [{"id": "a"}], quiet=True)
    assert gens[0]["text"] == "123<control>fine</control>9"


def test_the_alter_can_be_an_openai_compatible_endpoint(ray_runtime, tmp_path):
    """The seed's setup: the alter is a model behind an OpenAI-compatible server (here our own)."""
    from metareason.plugins.cspo.alternating import AlternatingPair
    from tests.test_serve import Served

    target = save_bigram(tmp_path / "target", TARGET)
    served = Served(save_bigram(tmp_path / "alter", ALTER), "--model-name", "alter-70b")
    try:
        generators = {"alter": {"type": "openai", "base_url": served.base + "/v1", "model": "alter-70b"}}
        kernel = Kernel(_pair_config(target, generators, True))
        with AlternatingPair(kernel.config) as pair:
            gens = pair.generate(["A=1;B=A+1;B=?", "A=2;B=A*3;B=?"], [{"id": "a"}, {"id": "b"}], quiet=True)
        assert [g["text"] for g in gens] == ["123<control>ok</control>9"] * 2
        assert served.health()["requests_done"] == 2  # both takeovers went to the served alter
    finally:
        served.stop()


def test_an_alter_generator_that_is_not_configured_is_named():
    from metareason.errors import UserError
    from metareason.plugins.cspo.alternating import check_alter

    kernel = Kernel({"plugins": ["cspo"], "cspo": {"enabled": True, "alter_generator": "teacher"},
                     "generators": {"other": {"type": "python", "function": "x:y"}}})
    with pytest.raises(UserError, match=r"cspo.alter_generator: no generator named 'teacher' in generators: \(other\)"):
        check_alter(kernel.config)
