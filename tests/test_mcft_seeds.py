"""The run seed is part of the critique mask's seed (issue 30): two runs with different
``train.seed`` drop different tokens of the same example in the same epoch, the same seed drops
the same ones, also when the run is stopped and resumed from a checkpoint. Without this the
experiment's seeds would share one mask and their spread would say nothing about masking."""
import torch

from metareason import Kernel, hookimpl
from metareason.data.tokenize import IGNORE_INDEX
from tests.test_mcft import batch_of, tiny_config, write_rows

from metareason.plugins.mcft import format as fmt


class MaskSpy:
    """Records, per (example id, epoch), which label positions inside <think> the loss does not see."""

    def __init__(self, tok):
        self.open_id = tok.convert_tokens_to_ids(fmt.THINK)
        self.close_id = tok.convert_tokens_to_ids(fmt.THINK_END)
        self.masks = {}

    @hookimpl
    def metareason_extra_losses(self, batch):
        for i, ex in enumerate(batch["examples"]):
            row = batch["input_ids"][i].tolist()
            lo, hi = row.index(self.open_id), row.index(self.close_id)
            key = (ex["id"], int(batch["epoch"]))
            self.masks.setdefault(key, (batch["labels"][i, lo + 1: hi] == IGNORE_INDEX).clone())


def hook_masks(kernel, tok, examples, epoch=0):
    batch = batch_of(tok, examples, epoch)
    labels = kernel.chain("metareason_sft_labels", "labels", batch["labels"], batch=batch, tokenizer=tok,
                          config=kernel.config)
    return {e["id"]: (labels[i] == IGNORE_INDEX) for i, e in enumerate(batch["examples"])}


def test_the_label_hook_draws_other_masks_for_another_run_seed(tmp_path):
    data = tmp_path / "d.jsonl"
    write_rows(data, n=8)
    masks = {}
    for seed in (0, 0, 1):
        cfg = tiny_config(tmp_path, data, threshold=0.3)
        cfg["train"]["seed"] = seed
        k = Kernel(cfg)
        _, tok = k.load()
        task = k.build_task(k.config.data.train[0])
        got = hook_masks(k, tok, [task[i] for i in range(len(task))])
        if seed in masks:
            assert all(torch.equal(masks[seed][key], got[key]) for key in got)  # same seed: same masks
        masks[seed] = got
    assert all(bool(m.any()) for m in masks[0].values())
    differ = sum(not torch.equal(masks[0][key], masks[1][key]) for key in masks[0])
    assert differ == len(masks[0]), f"only {differ}/{len(masks[0])} masks differ between train.seed 0 and 1"


def _run(tmp_path, data, name, seed, max_steps, resume=False):
    cfg = tiny_config(tmp_path, data, name=name, threshold=0.3)
    cfg["train"].update(seed=seed, max_steps=max_steps, save_every=2, keep_last=2)
    k = Kernel(cfg)
    spy = MaskSpy(k.load()[1])
    k.register(spy, name="maskspy")
    k.run(resume=resume)
    return spy.masks


def test_runs_with_other_seeds_mask_other_tokens_and_a_resumed_run_masks_the_same(tmp_path):
    data = tmp_path / "d.jsonl"
    write_rows(data, n=8)  # 8 rows, batch 4: 2 steps an epoch, 4 steps = epochs 0 and 1
    straight = _run(tmp_path, data, "a", seed=0, max_steps=4)
    assert {e for _, e in straight} == {0, 1} and len(straight) == 16
    ids = {i for i, _ in straight}  # epoch 1 draws new masks, so resuming into it must find the epoch
    assert sum(not torch.equal(straight[(i, 0)], straight[(i, 1)]) for i in ids) == len(ids)
    first = _run(tmp_path, data, "b", seed=0, max_steps=2)
    resumed = _run(tmp_path, data, "b", seed=0, max_steps=4, resume=True)
    assert {e for _, e in resumed} == {1}  # only the steps after the checkpoint ran
    both = {**first, **resumed}
    assert both.keys() == straight.keys()
    assert all(torch.equal(straight[key], both[key]) for key in straight)
    other = _run(tmp_path, data, "c", seed=1, max_steps=4)
    assert other.keys() == straight.keys()
    differ = sum(not torch.equal(straight[key], other[key]) for key in straight)
    assert differ == len(straight), f"only {differ}/{len(straight)} masks differ between train.seed 0 and 1"
