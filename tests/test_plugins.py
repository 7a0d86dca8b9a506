"""Plugins: entry-point discovery (built-in and a real pip-installed package), selection,
programmatic registration, and errors that name the plugin and the hook."""
import pytest

from metareason import Kernel, hookimpl
from metareason.config import ConfigError
from metareason.plugin_manager import PluginError, build_plugin_manager, discover
from tests.conftest import run_cli


def test_builtin_is_loaded_through_entry_points():
    names = [ep.name for ep in discover()]
    assert "builtin" in names
    pm = build_plugin_manager()
    info = pm.infos["builtin"]
    assert info.source == "built-in"
    assert "metareason_register_tasks" in info.hooks


def test_external_plugin_discovered_and_called(ext_plugin, tmp_path):
    pm = build_plugin_manager()
    info = pm.infos[ext_plugin]
    assert info.source == "metareason-ext-example" and info.version == "0.3.1"
    kernel = Kernel({"ext_example": {"prefix": ">> "}})
    assert "ext_echo" in kernel.tasks.names()
    assert kernel.tasks.owner("ext_echo") == ext_plugin
    reward = kernel.rewards.get("ext_length")
    assert reward(["abc"], [{}]) == [3.0]
    out = kernel.chain("metareason_transform_prompt", "prompt", "2+2=", example={}, config=kernel.config)
    assert out == ">> 2+2="


def test_cli_lists_plugins_and_runs_plugin_subcommand(ext_plugin):
    res = run_cli("plugins")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(l.startswith("builtin") and "built-in" in l for l in lines)
    ext = [l for l in lines if l.startswith(ext_plugin)]
    assert len(ext) == 1 and "metareason-ext-example" in ext[0] and "0.3.1" in ext[0]
    assert "cli_commands" in ext[0]
    res = run_cli("ext-example", "tester")
    assert res.returncode == 0 and "hello from ext_example, tester" in res.stdout


def test_env_selection(ext_plugin):
    res = run_cli("plugins", env={"METAREASON_PLUGINS": "builtin"})
    assert ext_plugin not in res.stdout
    res = run_cli("plugins", env={"METAREASON_PLUGINS": "nope"})
    assert res.returncode == 2 and "unknown plugin 'nope'" in res.stderr


def test_config_plugins_list_selects(ext_plugin):
    k = Kernel({"plugins": []})
    assert "ext_echo" not in k.tasks.names() and "causal_loop" in k.tasks.names()
    with pytest.raises(ConfigError, match="unknown plugin 'missing'"):
        Kernel({"plugins": ["missing"]})


class Exploding:
    @hookimpl
    def metareason_register_rewards(self, register):
        raise KeyError("boom")


def test_error_names_plugin_and_hook():
    kernel = Kernel({"plugins": []})
    kernel.register(Exploding(), name="exploding")
    with pytest.raises(PluginError) as info:
        kernel.rewards
    assert info.value.plugin == "exploding" and info.value.hook == "metareason_register_rewards"
    assert "plugin 'exploding' failed in hook 'metareason_register_rewards'" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_duplicate_registration_is_an_error():
    class Dup:
        @hookimpl
        def metareason_register_tasks(self, register):
            register("causal_loop", lambda *a: None)

    kernel = Kernel({"plugins": []})
    kernel.register(Dup(), name="dup")
    with pytest.raises(Exception, match="registered by both 'builtin' and 'dup'"):
        kernel.tasks


def test_programmatic_register_adds_config_section():
    from pydantic import BaseModel, ConfigDict

    class Section(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weight: float = 0.5

    class WithSection:
        @hookimpl
        def metareason_config_sections(self):
            return {"mine": Section}

    # an unknown section is rejected before the plugin is registered ...
    with pytest.raises(ConfigError, match="mine: unknown field"):
        Kernel({"plugins": [], "mine": {"weight": 2.0}})
    # ... and validated once it is
    kernel = Kernel({"plugins": []})
    kernel._raw["mine"] = {"weight": 2.0}
    kernel.register(WithSection(), name="with_section")
    assert kernel.config.mine.weight == 2.0


def test_hookspec_arguments_have_no_defaults():
    """pluggy < 1.6 (the lowest release setup.py admits is 1.5) drops arguments with a default
    from a hookspec, and then refuses every implementation that asks for them."""
    import inspect

    from metareason import hookspecs

    for name, fn in vars(hookspecs).items():
        if name.startswith("metareason_") and callable(fn):
            defaults = [p.name for p in inspect.signature(fn).parameters.values()
                        if p.default is not inspect.Parameter.empty]
            assert not defaults, f"{name}: arguments with defaults {defaults}"


def test_call_each_names_every_implementation_and_keeps_none_results():
    class Counts:
        def __init__(self, got):
            self.got = got

        @hookimpl
        def metareason_on_eval(self, kernel, step, metrics):
            return None if self.got is None else {"n": self.got + step}

    kernel = Kernel({"plugins": []})
    kernel.register(Counts(1), name="one")
    kernel.register(Counts(None), name="quiet")
    kernel.register(Counts(3), name="three")
    got = kernel.call_each("metareason_on_eval", kernel=kernel, step=10, metrics={})
    # pluggy's call order (the last registered first); a None result stays, named
    assert got[:3] == [("three", {"n": 13}), ("quiet", None), ("one", {"n": 11})]
    assert [name for name, _ in got] == [name for name, _ in kernel._implementations("metareason_on_eval")]
    with pytest.raises(PluginError, match="no hook named 'metareason_nope'"):
        kernel.call_each("metareason_nope")


def test_call_each_errors_name_the_plugin():
    kernel = Kernel({"plugins": []})
    kernel.register(Exploding(), name="exploding")
    with pytest.raises(PluginError, match="plugin 'exploding' failed in hook 'metareason_register_rewards'"):
        kernel.call_each("metareason_register_rewards", register=lambda *a: None)
