"""Config: YAML + dotted overrides + plugin sections, one-line errors naming file and field."""
import pytest

from metareason.config import ConfigError, apply_overrides, load_config
from tests.conftest import run_cli


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "name: a\ntrain:\n  lr: 1.0e-3\n")
    cfg, _ = load_config(p, ["train.lr=3e-4", "model.dtype=bfloat16", "data.max_length=64"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.dtype == "bfloat16"
    assert cfg.data.max_length == 64
    assert cfg.train.batch_size == 8  # default kept


def test_override_creates_nested_and_parses_lists():
    out = apply_overrides({}, ['generation.stop=["\\n", "##"]', "a.b.c=3"])
    assert out["generation"]["stop"] == ["\n", "##"]
    assert out["a"]["b"]["c"] == 3


@pytest.mark.parametrize("text,expected", [
    ("train:\n  lrr: 0.1\n", "train.lrr: unknown field"),
    ("train:\n  lr: fast\n", "train.lr: Input should be a valid number"),
    ("bogus: 1\n", "bogus: unknown field"),
    ("data:\n  train:\n    - {task: causal_loop, num_samples: -1}\n", "data.train[0].num_samples:"),
    ("model:\n  dtype: float8\n", "model.dtype:"),
])
def test_errors_name_file_and_field(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: ")
    assert expected in msg
    assert "\n" not in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    p = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(p)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(tmp_path, "name: a\n"), ["train.lr"])


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    res = run_cli("config", "show", str(p))
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: {p}: train.lrr: unknown field"
    assert "Traceback" not in res.stderr
    res = run_cli("--debug", "config", "show", str(p))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_cli_config_show_resolves(tmp_path):
    p = write(tmp_path, "name: shown\n")
    res = run_cli("config", "show", str(p), "train.max_steps=7")
    assert res.returncode == 0, res.stderr
    assert "name: shown" in res.stdout and "max_steps: 7" in res.stdout


def test_plugin_section_is_validated(tmp_path, ext_plugin):
    cfg, _ = load_config(write(tmp_path, "ext_example:\n  prefix: 'Q: '\n"))
    assert cfg.ext_example.prefix == "Q: "
    with pytest.raises(ConfigError, match=r"ext_example.prefx: unknown field"):
        load_config(write(tmp_path, "ext_example:\n  prefx: 1\n"))
    # the section is absent when the plugin is not enabled
    with pytest.raises(ConfigError, match=r"ext_example: unknown field"):
        load_config(write(tmp_path, "plugins: []\next_example:\n  prefix: a\n"))
