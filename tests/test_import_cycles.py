"""No import cycle among metareason's modules: a static graph of every import statement (module
level and inside functions, ``TYPE_CHECKING`` blocks left out) read from core/ and plugins/, whose
strongly connected components must be single modules.

Function-local imports are counted too: they keep start-up cheap, but one that closes a loop only
hides the cycle (it breaks at whichever call comes first). Known cycles are listed in ``KNOWN``
with the reason they remain; a new one fails here, naming its modules and edges.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"metareason": ROOT / "core", "metareason.plugins": ROOT / "plugins"}
EXTENSIONS = {"metareason._C"}  # compiled modules: leaves

# each entry: the set of modules of one cycle that remains, and why
KNOWN: dict[frozenset, str] = {}  # none remains; a cycle that has to stay is listed here with its reason


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root)
            if pkg == "metareason" and rel.parts[0] == "plugins":
                continue  # a local link to plugins/ in a worktree; plugins are read from their own root
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = f
    return out


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node outside ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    known = set(mods) | EXTENSIONS

    def owner(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    g: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # ``from pkg import sub`` depends on the submodules; ``from pkg import name`` on pkg
                names = [s for s in subs if s in known] or [base]
            for name in names:
                dep = owner(name)
                if dep and dep != mod and dep in mods:
                    deps.add(dep)
        g[mod] = deps
    return g


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = 0
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def test_the_graph_sees_the_modules_and_their_imports():
    mods = modules()
    g = graph(mods)
    assert "metareason.generation.generate" in g and "metareason.plugins.lru.plugin" in g
    assert "metareason.generation.decode" in g["metareason.generation.generate"]
    assert "metareason.kernel" in g["metareason.eval_command"]
    # a function-local import is an edge too
    assert "metareason.generation.generate" in g["metareason.evaluate"]


def test_cycles_are_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_but_the_known_ones():
    g = graph(modules())
    found = {frozenset(c) for c in cycles(g)}
    new = [c for c in found if c not in KNOWN]
    msg = "; ".join(" / ".join(f"{m} -> {sorted(d for d in g[m] if d in c)}" for m in sorted(c)) for c in new)
    assert not new, f"import cycle: {msg}"
    gone = [KNOWN[c] for c in KNOWN if c not in found]
    assert not gone, f"a known cycle is gone, remove it from KNOWN: {gone}"
