"""memory_reason training modes: prompt-tuning trains only the new input and output rows (tied or
untied embeddings, weight decay on: every other row bit-identical after several AdamW steps),
lora+prompt-tuning adds LoRA, lora leaves the new rows alone; a PEFT checkpoint holds the adapter
plus the new rows only, and `load_trained` (what `metareason eval RUN_DIR` uses) restores it exactly."""
import pytest
import torch
from safetensors.torch import load_file

from metareason import Kernel
from metareason.train.optim import build_optimizer
from metareason.trained import load_trained

from conftest import TINY_LLAMA

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["gate_proj", "up_proj", "down_proj"]}


def config(tmp_path, mode, tied=True, path=None, name="mr", **train):
    model = {"tokenizer": {"type": "char"}, "device": "cpu"}
    if path is None:
        model["arch"] = dict(TINY_LLAMA, tie_word_embeddings=tied)
    else:
        model["path"] = str(path)
    if "lora" in mode:
        model["lora"] = dict(LORA)
    tr = {"max_steps": 4, "batch_size": 4, "log_every": 1, "lr": 1e-2, "weight_decay": 0.1, "warmup_steps": 0,
          "max_grad_norm": None}
    tr.update(train)
    return {"name": name, "output_dir": str(tmp_path), "quiet": True, "model": model,
            "data": {"max_length": 256,
                     "train": [{"task": "memory_world", "num_samples": 16, "params": {"entities": 4, "attributes": 1}}],
                     "eval": [{"task": "memory_world", "num_samples": 3, "seed": 1,
                               "params": {"entities": 4, "attributes": 1, "split": "heldout"}}]},
            "train": tr, "generation": {"max_new_tokens": 6},
            "memory_reason": {"enabled": True, "mode": mode, "n_prefix": 2, "n_special": 2, "attention_samples": 2}}


def _vocab_matrices(model, tok):
    """The full embedding / output matrices (rows = vocabulary), wherever the adapters put them."""
    return {n: p for n, p in model.named_parameters() if p.ndim == 2 and p.shape[0] == len(tok)}


def _train_steps(kernel, model, tok, steps=4):
    """A few AdamW steps (the kernel's optimizer, weight decay on) on text with every new token."""
    opt = build_optimizer(model, kernel.config.train)
    text = ("Q: x<prefix_0><prefix_1><memory_0><memory_1> Ava has 3 pens.\n<prefix_0><prefix_1><reason_0><reason_1> "
            "3+4=7\n<prefix_0><prefix_1><answer_0><answer_1> The answer is: 7")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]] * 2)
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _new_ids(tok):
    return sorted(i for t, i in tok.get_vocab().items() if t.startswith(("<prefix_", "<memory_", "<reason_", "<answer_")))


def _effective_rows(model, ids):
    """The input and output rows the model really uses for ``ids`` (after any adapter)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    t = torch.tensor(ids)
    with torch.no_grad():
        rows_in = base.get_input_embeddings()(t).clone()
        probe = torch.eye(rows_in.shape[1])
        rows_out = base.get_output_embeddings()(probe)[:, t].T.clone()
    return rows_in, rows_out


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("mode", ["prompt-tuning", "lora+prompt-tuning"])
def test_only_new_rows_train_with_weight_decay(tmp_path, mode, tied):
    kernel = Kernel(config(tmp_path, mode, tied=tied))
    model, tok = kernel.load()
    ids = _new_ids(tok)
    assert len(ids) == 2 + 3 * 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    matrices = _vocab_matrices(model, tok)
    assert len(matrices) == (1 if tied else 2) and not any(p.requires_grad for p in matrices.values())
    before_in, before_out = _effective_rows(model, ids)
    _train_steps(kernel, model, tok)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{n} changed"
    after_in, after_out = _effective_rows(model, ids)
    assert (after_in - before_in).abs().amax(-1).min() > 0, "every new input row trains"
    assert (after_out - before_out).abs().amax(-1).min() > 0, "every new output row trains"
    if tied:
        assert torch.allclose(after_in, after_out), "tied: the output layer uses the same new rows"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("trainable_tokens_delta" in n or "lora_" in n for n in trainable)
    assert any("lora_" in n for n in trainable) == (mode == "lora+prompt-tuning")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_train < next(iter(matrices.values())).numel()


def test_lora_mode_leaves_the_new_rows_at_their_init(tmp_path):
    kernel = Kernel(config(tmp_path, "lora"))
    model, tok = kernel.load()
    ids = _new_ids(tok)
    before_in, _ = _effective_rows(model, ids)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    _train_steps(kernel, model, tok)
    assert torch.equal(_effective_rows(model, ids)[0], before_in)
    assert any(not torch.equal(p.detach(), lora[n]) for n, p in model.named_parameters() if n in lora)


def test_full_mode_trains_everything(tmp_path):
    model, _ = Kernel(config(tmp_path, "full")).load()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode", ["prompt-tuning", "lora+prompt-tuning"])
def test_peft_checkpoint_holds_adapter_and_new_rows_only_and_reloads_exactly(tmp_path, tiny_model_dir, mode):
    """From a saved base (model.path), whose vocabulary the run resizes: without
    save_embedding_layers=False peft would store the whole embedding matrices."""
    kernel = Kernel(config(tmp_path, mode, path=tiny_model_dir, name=mode.replace("+", "_")))
    kernel.run()
    run_dir = kernel.config.run_dir
    ckpt = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert not list(ckpt.glob("model*.safetensors"))
    state = load_file(str(ckpt / "adapter_model.safetensors"))
    rows = [k for k in state if "trainable_tokens_delta" in k]
    assert rows and all(state[k].shape[0] == 8 for k in rows)
    assert all("trainable_tokens_delta" in k or "lora_" in k for k in state), sorted(state)[:5]
    assert any("lora_" in k for k in state) == (mode == "lora+prompt-tuning")
    hidden = TINY_LLAMA["hidden_size"]
    assert sum(v.numel() for v in state.values()) < 115 * hidden  # less than one embedding matrix

    trained = kernel.last_model.eval()
    tok = kernel.last_tokenizer
    ids = torch.tensor([tok("Q: How many pens do Ava and Bo have?\n<prefix_0><prefix_1><memory_0>",
                            add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = trained(input_ids=ids).logits
    back = load_trained(run_dir)
    back.model.eval()
    with torch.no_grad():
        got = back.model(input_ids=ids).logits
    assert torch.equal(got, want)
    fresh_model, _ = Kernel(config(tmp_path, mode, path=tiny_model_dir, name="fresh")).load()
    with torch.no_grad():
        assert not torch.equal(fresh_model.eval()(input_ids=ids).logits, want), "training changed the model"


def test_export_merged_prompt_tuning_run_gives_the_trained_logits(tmp_path):
    """`metareason export --merge` writes the new rows into the full matrices (untied: both)."""
    from transformers import AutoModelForCausalLM

    from metareason.model_export import export_run

    kernel = Kernel(config(tmp_path, "prompt-tuning", tied=False, max_steps=2))
    kernel.run()
    tok = kernel.last_tokenizer
    ids = torch.tensor([tok("Q: x<prefix_0><memory_0> Ava", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = kernel.last_model.eval()(input_ids=ids).logits
    out = export_run(kernel.config.run_dir, tmp_path / "export", merge=True)
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, want)


def test_rows_the_kernel_already_trains_are_kept_and_others_cannot_be_added():
    """lora+prompt-tuning on an adapter the kernel built with trainable token rows: the rows it
    already trains are enough; rows it lacks are a one-line error (peft cannot add them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from metareason.api import ConfigError
    from metareason.plugins.memory_reason.modes import add_trainable_tokens

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"],
                                             trainable_token_indices={"embed_tokens": [3, 4]}))
    assert add_trainable_tokens(model, [4, 3]) is model
    with pytest.raises(ConfigError, match=r"already trains token rows \[3, 4\], not \[5\]"):
        add_trainable_tokens(model, [3, 5])
