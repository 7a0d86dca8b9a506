"""Under LoRA the mcft format tags' rows are trained (SpecialToken(trainable=True) -> peft
trainable_token_indices) and come back from the checkpoint; every other row stays frozen. Frozen,
a tag's row sits near the row of "<" and a LoRA-tuned SmolLM2 wrote "<" where the tag belongs."""
import pytest
import torch

from metareason import Kernel
from metareason.api import load_trained
from metareason.plugins.mcft.format import TAGS
from tests.test_mcft import tiny_config, write_rows


def rows(model, ids):
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor([ids]))[0].clone()


def logits_of(model, h):
    with torch.no_grad():
        return model.get_output_embeddings()(h).clone()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_under_lora_the_tag_rows_train_and_come_back_from_the_checkpoint(tmp_path, tied):
    data = tmp_path / "crit.jsonl"
    write_rows(data, n=16)
    cfg = tiny_config(tmp_path, data, name=f"lora-{tied}")
    cfg["model"]["arch"]["tie_word_embeddings"] = tied
    cfg["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": "all-linear"}
    cfg["train"].update(max_steps=4, lr=5e-2, warmup_steps=0)
    torch.manual_seed(0)
    before, tok = Kernel(cfg).load()
    tags = [tok.convert_tokens_to_ids(t) for t in TAGS]
    others = tok.encode("abc 123+=", add_special_tokens=False)
    h = torch.randn(1, 3, before.get_input_embeddings().weight.shape[1])
    torch.manual_seed(0)
    k = Kernel(cfg)
    k.run()
    after = load_trained(k.config.run_dir).model
    changed = (rows(after, tags) - rows(before, tags)).abs().amax(dim=1)
    assert (changed > 1e-4).all(), changed  # every tag's input row was trained and restored
    assert torch.equal(rows(after, others), rows(before, others))  # the rest stays frozen
    out_before, out_after = logits_of(before, h), logits_of(after, h)
    assert (out_after[..., tags] - out_before[..., tags]).abs().amax() > 1e-4  # output rows of the tags too
    keep = [i for i in range(out_before.shape[-1]) if i not in tags]
    torch.testing.assert_close(out_after[..., keep], out_before[..., keep], rtol=0, atol=1e-6)
