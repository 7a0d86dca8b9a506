"""Generator backends: one interface over local, python and plugin-registered types; the
``generators:`` config section with errors naming the field; chat rendering."""
import pytest

from metareason import Kernel, hookimpl
from metareason.config import ConfigError
from metareason.generation.generate import generate_batch
from metareason.generators import Completion, Generator, GeneratorError
from metareason.generators.local import render_prompt
from metareason.generators.python_backend import PythonGenerator
from tests.conftest import save_bigram_llama

CHAIN = {"a": "b", "b": "c", "c": "d", "d": "e", "e": "f", "f": ";", "x": "y", "y": "z", "z": ";"}


def echo_upper(prompt, *, max_new_tokens, temperature, top_p, stop, seed, sample_index):
    """A programmatic teacher for tests: the prompt upper-cased, then the sample index."""
    return f"{prompt.upper()}#{sample_index} END"


def kernel_with(generators):
    return Kernel({"plugins": [], "generators": generators})


def test_python_backend_from_config_keeps_order_and_cuts_at_stop():
    gen = kernel_with({"teacher": {"type": "python", "function": "tests.test_generators:echo_upper"}}).generator("teacher")
    out = gen.generate(["ab", "cd e"], n=2, stop=[" END"])
    assert [(c.prompt_index, c.sample_index, c.text) for c in out] == [
        (0, 0, "AB#0"), (0, 1, "AB#1"), (1, 0, "CD E#0"), (1, 1, "CD E#1")]
    assert out[2].prompt_tokens == 2 and out[2].completion_tokens == 2 and out[0].finish_reason == "stop"


def test_the_kernel_builds_each_generator_once():
    kernel = kernel_with({"t": {"type": "python", "function": "tests.test_generators:echo_upper"}})
    assert kernel.generator("t") is kernel.generator("t")


@pytest.mark.parametrize("generators, name, message", [
    ({}, "teacher", r"generators: no generator named 'teacher' \(none configured\)"),
    ({"t": {"type": "vllm"}}, "t", r"generators\.t\.type: unknown backend 'vllm' \(available: local, openai, python\)"),
    ({"t": {"type": "openai", "model": "m"}}, "t", r"generators\.t\.base_url: field required"),
    ({"t": {"type": "openai", "base_url": "localhost:8000", "model": "m"}}, "t", r"generators\.t\.base_url: String should match"),
    ({"t": {"type": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m", "concurency": 2}}, "t",
     r"generators\.t\.concurency: unknown field"),
    ({"t": {"type": "python", "function": "os:system("}}, "t", r"generators\.t\.function: String should match"),
    ({"t": {"type": "local"}}, "t", r"generators\.t\.path: field required"),
])
def test_config_errors_name_the_field(generators, name, message):
    with pytest.raises(ConfigError, match=message) as info:
        kernel_with(generators).generator(name)
    assert "\n" not in str(info.value)


def test_openai_backend_needs_its_key_variable_set(monkeypatch):
    monkeypatch.delenv("MR_TEST_KEY", raising=False)
    kernel = kernel_with({"t": {"type": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m",
                                "api_key_env": "MR_TEST_KEY"}})
    with pytest.raises(GeneratorError, match="generators.t.api_key_env: environment variable MR_TEST_KEY is not set"):
        kernel.generator("t")


def test_python_function_that_cannot_be_imported():
    kernel = kernel_with({"t": {"type": "python", "function": "tests.test_generators:no_such_function"}})
    with pytest.raises(GeneratorError, match="generators.t.function: cannot import"):
        kernel.generator("t")


def test_bad_sampling_arguments_name_the_argument():
    gen = PythonGenerator(echo_upper)
    for kwargs, name in [({"n": 0}, "n"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                         ({"top_p": 0}, "top_p"), ({"stop": [""]}, "stop")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            gen.generate(["a"], **kwargs)


def test_a_plugin_registers_a_backend_type():
    from metareason.config import Section

    class ConstConfig(Section):
        type: str = "const"
        text: str

    class Const(Generator):
        def __init__(self, text):
            self.text = text

        def generate(self, prompts, *, n=1, max_new_tokens=128, temperature=0.0, top_p=1.0, stop=None, seed=None):
            return [Completion(self.text, 1, 1, "stop", i, j) for i in range(len(prompts)) for j in range(n)]

    class Plugin:
        @hookimpl
        def metareason_register_generator_backends(self, register):
            register("const", ConstConfig, lambda cfg, name: Const(cfg.text))

    kernel = kernel_with({"c": {"type": "const", "text": "hello"}, "bad": {"type": "const"}})
    kernel.register(Plugin(), name="const_plugin")
    assert [c.text for c in kernel.generator("c").generate(["p", "q"])] == ["hello", "hello"]
    with pytest.raises(ConfigError, match=r"generators\.bad\.text: field required"):
        kernel.generator("bad")


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory):
    return save_bigram_llama(tmp_path_factory.mktemp("bigram"), CHAIN)


def test_local_backend_equals_the_kernels_generation(bigram_dir):
    kernel = kernel_with({"local": {"type": "local", "path": str(bigram_dir), "batch_size": 2}})
    gen = kernel.generator("local")
    prompts = ["a", "x", "c", "b"]
    out = gen.generate(prompts, max_new_tokens=6, stop=[";"])
    ref = generate_batch(gen.model, gen.tokenizer, prompts, max_new_tokens=6, do_sample=False, temperature=1.0,
                         top_p=1.0, stop=[";"])
    assert [c.text for c in out] == [g.text for g in ref] == ["bcdef", "yz", "def", "cdef"]
    assert [c.finish_reason for c in out] == ["stop"] * 4
    assert out[0].prompt_tokens == 2  # BOS + "a", as in training
    short = gen.generate(["a"], max_new_tokens=2)
    assert short[0].text == "bc" and short[0].finish_reason == "length" and short[0].completion_tokens == 2


def test_local_backend_samples_n_per_prompt_reproducibly_with_a_seed(bigram_dir):
    gen = kernel_with({"l": {"type": "local", "path": str(bigram_dir)}}).generator("l")
    a = gen.generate(["a", "x"], n=3, max_new_tokens=4, temperature=1.5, seed=7)
    b = gen.generate(["a", "x"], n=3, max_new_tokens=4, temperature=1.5, seed=7)
    assert [(c.prompt_index, c.sample_index) for c in a] == [(i, j) for i in range(2) for j in range(3)]
    assert [c.text for c in a] == [c.text for c in b]


def test_chat_messages_use_the_template_or_role_lines(bigram_dir):
    gen = kernel_with({"l": {"type": "local", "path": str(bigram_dir)}}).generator("l")
    assert render_prompt(gen.tokenizer, [{"role": "user", "content": "a"}]) == "a"
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]
    assert render_prompt(gen.tokenizer, two) == "system: s\nuser: a\nassistant:"
    gen.tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}>"
    assert render_prompt(gen.tokenizer, two) == "[system]s[user]a>"
    with pytest.raises(ValueError, match=r"prompt\[0\]: expected \{role: str, content: str\}"):
        render_prompt(gen.tokenizer, [{"role": "user"}])


def test_local_backend_on_a_run_directory_applies_its_checkpoint(tmp_path, tiny_model_dir):
    import torch

    from metareason.trained import load_trained

    cfg = {"name": "r", "output_dir": str(tmp_path), "plugins": [], "quiet": True,
           "model": {"path": str(tiny_model_dir), "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
           "data": {"max_length": 64, "train": [{"task": "causal_loop", "num_samples": 8, "params": {"levels": [1]}}]},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 5e-2, "save_every": 0}, "eval": {"at_end": False}}
    Kernel(cfg).run()
    gen = kernel_with({"l": {"type": "local", "path": str(tmp_path / "r")}}).generator("l")
    trained = load_trained(tmp_path / "r")
    ref = generate_batch(trained.model.eval(), trained.tokenizer, ["A=1;B=A+2;"], max_new_tokens=8, do_sample=False,
                         temperature=1.0, top_p=1.0, stop=[])
    assert gen.generate(["A=1;B=A+2;"], max_new_tokens=8)[0].text == ref[0].text
    assert hasattr(gen.model, "peft_config") and torch.is_tensor(next(gen.model.parameters()))
