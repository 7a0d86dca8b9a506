"""Chat templates (metareason.data.chat) on the real SmolLM2 tokenizer, and the generic rewards.

The tokenized SFT example must equal ``apply_chat_template`` of the conversation, the loss must
cover exactly the assistant reply, and training, eval, RL, the local generator and ``serve`` must
render a prompt to the same text."""
import pytest
import torch

from metareason.config import ConfigError
from metareason.data.chat import ChatFormat, ChatTemplateError, render_example, render_prompt
from metareason.data.tokenize import IGNORE_INDEX, collate
from metareason.kernel import Kernel

pytestmark = pytest.mark.timeout(600)

QUESTION = "What is 3 + 4?"
REPLY = "3 + 4 = 7.\nanswer: 7"


def _kernel(model_dir, **data):
    return Kernel({"quiet": True, "model": {"path": str(model_dir)},
                   "data": dict({"train": [{"task": "causal_loop", "num_samples": 8}]}, **data)})


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)


def _template_ids(tok, messages, **kw):
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("system_prompt", [None, "Answer with 'answer: <number>'."])
def test_sft_example_equals_apply_chat_template_and_the_loss_covers_the_reply(smollm2_dir, smol_tokenizer,
                                                                               system_prompt):
    from metareason.train.sft import encode_sft_examples

    tok = smol_tokenizer
    kernel = _kernel(smollm2_dir, system_prompt=system_prompt)
    enc = encode_sft_examples(kernel, tok, [{"prompt": QUESTION, "completion": REPLY, "id": "q"}])
    head = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": QUESTION}]
    conv = head + [{"role": "assistant", "content": REPLY}]
    assert enc.input_ids[0] == _template_ids(tok, conv)
    plen = len(_template_ids(tok, head, add_generation_prompt=True))
    assert enc.prompt_lengths[0] == plen
    labels = collate(enc.input_ids, enc.prompt_lengths, tok.pad_token_id)["labels"][0]
    learned = labels != IGNORE_INDEX
    assert not learned[:plen].any() and learned[plen:].all()
    # the learned tokens are the reply and the template's end of turn, nothing of the prompt
    assert tok.decode(labels[learned]) == REPLY + "<|im_end|>\n"
    if system_prompt:
        assert system_prompt in tok.decode(enc.input_ids[0][:plen])
        assert "SmolLM" not in tok.decode(enc.input_ids[0][:plen])  # the template's default system is replaced


def test_messages_examples_and_prompt_completion_examples_tokenize_the_same(smollm2_dir, smol_tokenizer):
    from metareason.train.sft import encode_sft_examples

    kernel = _kernel(smollm2_dir)
    a = encode_sft_examples(kernel, smol_tokenizer, [{"prompt": QUESTION, "completion": REPLY}])
    b = encode_sft_examples(kernel, smol_tokenizer, [{"messages": [{"role": "user", "content": QUESTION},
                                                                   {"role": "assistant", "content": REPLY}]}])
    assert a.input_ids == b.input_ids and a.prompt_lengths == b.prompt_lengths


def test_chat_template_none_keeps_raw_text_and_eos(smollm2_dir, smol_tokenizer):
    from metareason.train.sft import encode_sft_examples

    tok = smol_tokenizer
    kernel = _kernel(smollm2_dir, chat_template="none")
    enc = encode_sft_examples(kernel, tok, [{"prompt": QUESTION, "completion": REPLY}])
    raw = tok(QUESTION + REPLY, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[0] == [tok.bos_token_id] + raw + [tok.eos_token_id]
    assert kernel.prompt_text({"prompt": QUESTION}, tok) == QUESTION


def test_every_path_renders_the_same_prompt(smollm2_dir, smol_tokenizer):
    """Training/eval/RL (Kernel.prompt_text), the local generator and serve see the same text."""
    from metareason.generators.local import LocalGenerator

    system = "Be brief."
    kernel = _kernel(smollm2_dir, system_prompt=system)
    fmt = kernel.chat_format(smol_tokenizer)
    text = kernel.prompt_text({"prompt": QUESTION}, smol_tokenizer)
    gen = LocalGenerator(torch.nn.Linear(1, 1), smol_tokenizer, fmt=fmt)
    assert gen.render([{"role": "user", "content": QUESTION}]) == text
    assert text == smol_tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
        tokenize=False, add_generation_prompt=True)
    # prompt transforms act on the user's text, inside the template
    from metareason import hookimpl

    class Upper:
        @hookimpl
        def metareason_transform_prompt(self, prompt, example, config):
            return prompt.upper()

    kernel.register(Upper(), name="upper")
    assert "<|im_start|>user\nWHAT IS 3 + 4?<|im_end|>" in kernel.prompt_text({"prompt": QUESTION}, smol_tokenizer)


def test_system_prompt_without_a_template_is_a_config_error(tiny_model_dir):
    from metareason.models.loader import load_tokenizer

    kernel = Kernel({"quiet": True, "model": {"path": str(tiny_model_dir)}, "data": {"system_prompt": "x"}})
    tok = load_tokenizer(kernel.config.model)
    with pytest.raises(ConfigError, match="data.system_prompt: needs a chat template"):
        kernel.chat_format(tok)


def test_a_template_that_raises_is_a_one_line_error(smol_tokenizer):
    class Tok:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, *a, **k):
            return smol_tokenizer.apply_chat_template(*a, chat_template=self.chat_template, **k)

    with pytest.raises(ChatTemplateError, match="cannot render the conversation: roles must alternate"):
        render_prompt(Tok(), QUESTION, ChatFormat(True))
    with pytest.raises(ChatTemplateError, match=r"prompt\[1\]: expected"):
        render_example(smol_tokenizer, [{"role": "user", "content": "a"}, {"role": "x"}], "b", ChatFormat(True))


# ------------------------------------------------------------------------------------- rewards
def test_task_score_reward_is_the_tasks_own_scorer():
    from metareason.builtin import _task_score
    from metareason.data.reasoning_gym_task import make_task

    task = make_task({"name": "basic_arithmetic", "min_terms": 2, "max_terms": 2}, seed=3, num_samples=4)
    exs = [task[i] for i in range(4)]
    right = [f"answer: {e['answer']}" for e in exs]
    wrong = ["answer: nonsense"] * 4
    assert _task_score(right, exs, [task] * 4) == [1.0] * 4
    assert _task_score(wrong, exs, [task] * 4) == [task.score(w, e) for w, e in zip(wrong, exs)]
    assert max(_task_score(wrong, exs, [task] * 4)) < 1.0
    with pytest.raises(ValueError, match="task_score: an example has no task"):
        _task_score(right, exs, [None] * 4)


def test_format_reward_matches_the_whole_completion(tmp_path):
    from metareason.builtin import _format

    k = Kernel({"quiet": True, "rl": {"format_pattern": r".*answer: -?\d+"}})
    got = _format(["3+4=7\nanswer: 7", "answer: 7 and more", "no answer", "  answer: -2\n"], [{}] * 4, k.config)
    assert got == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="rl.format_pattern: .*not a regular expression"):
        Kernel({"quiet": True, "rl": {"format_pattern": "(unclosed"}})


def test_grpo_with_format_reward_and_no_pattern_is_refused(tmp_path, tiny_model_dir):
    from metareason.train.grpo import check_rl_config

    k = Kernel({"quiet": True, "output_dir": str(tmp_path), "model": {"path": str(tiny_model_dir)},
                "train": {"algorithm": "grpo"}, "rl": {"rewards": {"format": 1.0}}})
    with pytest.raises(ConfigError, match="rl.format_pattern: the format reward needs a regular expression"):
        check_rl_config(k)


def test_jsonl_conversations_train_like_prompt_completion(tmp_path, smollm2_dir, smol_tokenizer):
    import json

    from metareason.data import jsonl_task
    from metareason.data.base import TaskError
    from metareason.train.sft import encode_sft_examples

    conv = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REPLY}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conv, "answer": 7}) + "\n", encoding="utf-8")
    task = jsonl_task.make_task({"path": str(path), "messages_field": "messages"}, seed=0, num_samples=1)
    ex = task[0]
    assert ex["prompt"] == conv[:1] and ex["completion"] == REPLY and ex["answer"] == "7"
    kernel = _kernel(smollm2_dir)
    a = encode_sft_examples(kernel, smol_tokenizer, [ex])
    b = encode_sft_examples(kernel, smol_tokenizer, [{"prompt": QUESTION, "completion": REPLY}])
    assert a.input_ids == b.input_ids and a.prompt_lengths == b.prompt_lengths
    assert task.score("answer: 7", ex) == 1.0
    path.write_text(json.dumps({"messages": [{"role": "user"}], "answer": 7}) + "\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"chat.jsonl:1: messages\[0\]: expected \{role: str, content: str\}"):
        jsonl_task.make_task({"path": str(path), "messages_field": "messages"}, seed=0, num_samples=1)
