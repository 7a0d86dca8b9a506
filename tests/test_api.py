"""The public plugin API (``metareason.api``): every listed name resolves, importing it loads no
torch (plugins import it while the kernel discovers them), and the type-checking imports list the
same names as the lazy table; the shared exact McNemar test."""
import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

import metareason.api as api
from metareason.stats import mcnemar_exact


def test_every_public_name_resolves_to_the_object_its_module_defines():
    import importlib

    assert api.__all__ == sorted(api._NAMES)
    for name in api.__all__:
        module, attr = api._NAMES[name].split(":")
        assert getattr(api, name) is getattr(importlib.import_module(module), attr), name
    with pytest.raises(AttributeError, match="public API is metareason.api.__all__"):
        api.train_sft  # noqa: B018  (internal: not in the API)


def test_the_type_checking_imports_name_the_same_objects_as_the_table():
    tree = ast.parse(Path(api.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        for alias in node.names:
            seen[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    assert seen == api._NAMES


def test_importing_the_api_imports_no_torch():
    code = "import sys, metareason.api as a; a.hookimpl; a.Section; a.UserError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact(8, 0) == pytest.approx(2 / 256)
    assert mcnemar_exact(3, 3) == 1.0  # capped
    for b, c in [(2, 9), (10, 4), (30, 45)]:
        n, k = b + c, min(b, c)
        assert mcnemar_exact(b, c) == pytest.approx(2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    assert 0 < mcnemar_exact(600, 700) < 0.02  # n past 1024: exact integers, no float overflow
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mcnemar_exact(-1, 2)
