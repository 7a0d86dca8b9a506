"""CSPO alternating inference on Ray: target and alter actors are placed by one PACK placement
group with the GPU counts from the config (0 here: the loopback runtime has no GPU)."""
import os

import pytest

from metareason import Kernel
from tests.test_cspo_alternating import ALTER, TARGET
from tests.test_cspo_takeover import save_bigram

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_runtime():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", include_dashboard=False, object_store_memory=80_000_000, num_cpus=2, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


def test_target_and_alter_share_a_pack_placement_group(ray_runtime, tmp_path):
    from ray.util import placement_group_table

    from metareason.plugins.cspo.alternating import AlternatingPair

    target = save_bigram(tmp_path / "target", TARGET)
    alter = save_bigram(tmp_path / "alter", ALTER)
    kernel = Kernel({"plugins": ["cspo"], "quiet": True, "generation": {"max_new_tokens": 16, "batch_size": 2},
                     "cspo": {"enabled": True, "ray": True, "target_model_name": str(target),
                              "alter_model_name": str(alter), "target_model_gpu": 0, "alter_model_gpu": 0,
                              "max_target_tokens": 64, "TRIGGER_TOKENS": ["<control>"], "alter_max_tokens": 8}})
    with AlternatingPair(kernel.config) as pair:
        gens = pair.generate(["A=1;B=A+1;B=?"], [{"id": "a"}], quiet=True)
        pg = pair.placement_group
        table = placement_group_table(pg)
        ids = {ray.get(pair.target.placement_group_id.remote()), ray.get(pair.alter.placement_group_id.remote())}
    assert gens[0]["text"] == "123<control>ok</control>9"
    assert table["strategy"] == "PACK"
    assert [dict(b) for b in table["bundles"].values()] == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert ids == {pg.id.hex()}  # both actors run inside the group
    assert placement_group_table(pg)["state"] == "REMOVED"  # closed with the pair
