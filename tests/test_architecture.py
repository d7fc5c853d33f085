"""The layout's rules, checked: no import cycle anywhere in trd_hpc (lazy imports inside
functions included), every module imports on its own, argparse only in the CLI package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "trd_hpc"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # an entry point, never imported
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path], name: str) -> set[str]:
    """trd_hpc modules that ``path`` imports, at any depth of the file."""
    found: set[str] = set()
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    found.add(sub)  # `from pkg import submodule`
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules, name) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert "trd_hpc.experiment" in graph["trd_hpc.cli.run"] or any("experiment" in m for m in graph["trd_hpc.cli.run"])
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_domain_never_imports_the_cli():
    graph = import_graph()
    offenders = {
        m: sorted(t for t in targets if t.startswith("trd_hpc.cli"))
        for m, targets in graph.items()
        if not m.startswith("trd_hpc.cli")
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_argparse_only_in_the_cli_package():
    users = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if "argparse" in names and not name.startswith("trd_hpc.cli"):
                users.append(name)
    assert not users, f"argparse outside trd_hpc/cli: {users}"


def test_every_module_imports_on_its_own():
    """Each module imported into an interpreter holding no trd_hpc module yet (third-party
    packages stay loaded, so this is quick): an import that only works after another
    module happened to load first fails here."""
    code = (
        "import importlib, sys, traceback\n"
        f"mods = {sorted(_modules())!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'trd_hpc' or k.startswith('trd_hpc.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


def test_ruff_lint_and_format_are_clean():
    """`ruff check` and `ruff format --check` over the tree (configured in pyproject.toml)."""
    for args in (["check", "."], ["format", "--check", "."]):
        res = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, f"ruff {' '.join(args)}:\n{res.stdout[-4000:]}{res.stderr[-2000:]}"
