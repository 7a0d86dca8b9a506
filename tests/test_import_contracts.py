"""The import contracts of ``.importlinter`` (import-linter, through scripts/lint_imports.py):
(a) the kernel never imports a plugin, (b) plugins import from the kernel only ``metareason.api``,
(c) no plugin imports another. Each holds on this tree, and each notices a module that breaks it."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lint_imports", REPO / "scripts" / "lint_imports.py")
lint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lint)

CONTRACTS = {
    "kernel-knows-no-plugin": "(a) the kernel (core/) never imports metareason.plugins",
    "plugins-use-the-public-api": "(b) plugins import from the kernel only metareason.api",
    "plugins-use-the-public-api-root": "(b) plugins import nothing from the package root metareason (use metareason.api)",
    "plugins-are-independent": "(c) no plugin imports another plugin",
}


@pytest.mark.parametrize("contract", sorted(CONTRACTS))
def test_contract_holds(tmp_path, contract):
    res = lint.lint_imports(lint.layout(tmp_path), ["--contract", contract])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{CONTRACTS[contract]} KEPT" in res.stdout.replace(")KEPT", ") KEPT")


def test_the_forbidden_list_names_every_module_of_core_but_the_api():
    """(b) lists core's modules one by one (import-linter cannot forbid a package while allowing one
    of its children); a module added to core/ must join the list."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".importlinter")
    listed = set(cfg["importlinter:contract:plugins-use-the-public-api"]["forbidden_modules"].split())
    core = REPO / "core"
    modules = {f"metareason.{p.stem}" for p in core.glob("*.py") if p.stem not in ("__init__", "api")}
    modules |= {f"metareason.{p.name}" for p in core.iterdir()
                if p.is_dir() and not p.is_symlink() and (p / "__init__.py").exists()}
    assert listed == modules


def test_each_contract_notices_a_module_that_breaks_it(tmp_path):
    tree = lint.layout(tmp_path)
    pkg = tree / "metareason"
    (pkg / "zz_core_uses_a_plugin.py").write_text("from metareason.plugins.mcft import plugin\n")
    bad = pkg / "plugins" / "zz_bad"
    bad.mkdir()
    (bad / "__init__.py").write_text("from metareason.config import Section\n"
                                     "from metareason.plugins.cspo.segments import CONTROL_OPEN\n"
                                     "from metareason.api import hookimpl\n")
    (bad / "fine.py").write_text("from metareason.plugins.zz_bad import hookimpl\n")
    (bad / "root.py").write_text("from metareason import Kernel\n")
    res = lint.lint_imports(tree, [])
    assert res.returncode != 0
    out = res.stdout
    for name in CONTRACTS.values():
        assert f"{name} BROKEN" in out.replace(")BROKEN", ") BROKEN"), out
    assert "metareason.zz_core_uses_a_plugin -> metareason.plugins.mcft" in out
    assert "metareason.plugins.zz_bad -> metareason.config" in out
    assert "metareason.plugins.zz_bad -> metareason.plugins.cspo.segments" in out
    assert "metareason.plugins.zz_bad.root -> metareason (l.1)" in out
    # a plugin importing the API, or a module of its own package, breaks nothing
    assert "-> metareason.api" not in out and "zz_bad.fine" not in out
