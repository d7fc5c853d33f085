"""The layout's rules, checked: every import goes down CONTRIBUTING.md's layer table, no
import cycle anywhere in trd_hpc (lazy imports inside functions and package __init__ execution
included), no paper folder imports another, every module imports on its own, argparse only in
the CLI package, small modules and functions."""

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


def import_graph(with_inits: bool = True) -> dict[str, set[str]]:
    """Module -> the trd_hpc modules importing it runs.  Importing ``a.b.c`` also runs the
    ``__init__`` of ``a.b`` (and ``a``): with ``with_inits`` those packages are edges too, so
    a package ``__init__`` that imports its submodules shows the cycle it closes."""
    modules = _modules()
    graph = {name: _imports(path, modules, name) for name, path in modules.items()}
    if not with_inits:
        return graph
    packages = {m for m, p in modules.items() if p.name == "__init__.py"}
    for name, targets in graph.items():
        for t in list(targets):
            parts = t.split(".")
            for i in range(2, len(parts)):
                pkg = ".".join(parts[:i])
                # a module inside the package has run its __init__ already
                if pkg in packages and not name.startswith(pkg + "."):
                    targets.add(pkg)
    return graph


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


def test_package_init_execution_is_an_edge():
    """trd_hpc.launch's __init__ once imported launch.submit, so importing launch.plan (as the
    trainer does) ran submit: a 12-module cycle no module-level edge shows."""
    graph = import_graph()
    assert "trd_hpc.launch" in graph["trd_hpc.train.trainer"] or not any(
        t.startswith("trd_hpc.launch.") for t in graph["trd_hpc.train.trainer"]
    )
    assert "trd_hpc.tasks" in graph["trd_hpc.evaluation"] or not any(
        t.startswith("trd_hpc.tasks.") for t in graph["trd_hpc.evaluation"]
    )


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert "trd_hpc.experiment" in graph["trd_hpc.cli.experiment"] or any(
        "experiment" in m for m in graph["trd_hpc.cli.experiment"]
    )
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_cycle_between_folders():
    """The top-level parts (a folder such as trd_hpc.train, or a module such as trd_hpc.bundle)
    form no cycle either: each one can be read, tested and replaced above the ones it uses."""
    graph = import_graph()

    def top(m: str) -> str:
        return ".".join(m.split(".")[:2])

    parts: dict[str, set[str]] = {}
    for m, targets in graph.items():
        parts.setdefault(top(m), set()).update(top(t) for t in targets if top(t) != top(m))
    assert len(parts) > 20
    found = cycles(parts)
    assert not found, "cycles between folders: " + "; ".join(" -> ".join(c) for c in found)


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


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100


def test_modules_and_functions_stay_small():
    """No module over 600 lines and no function over 100 in trd_hpc/: a file or a function past
    that holds several things, and is split along the seams it has (measure, report, print)."""
    long_modules = []
    long_functions = []
    for name, path in _modules().items():
        text = path.read_text()
        n = text.count("\n")
        if n > MAX_MODULE_LINES:
            long_modules.append(f"{name} ({n} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name} ({length} lines)")
    assert not long_modules and not long_functions, f"modules: {long_modules}; functions: {long_functions}"


def test_every_name_imported_from_the_package_exists():
    """``from trd_hpc.X import name`` anywhere in trd_hpc/ or tests/, imports inside functions
    included: a name moved or renamed fails here, not on the code path that runs the import."""
    code = (
        "import ast, importlib, pathlib, sys\n"
        "bad = []\n"
        "for p in sorted(pathlib.Path('trd_hpc').rglob('*.py')) + sorted(pathlib.Path('tests').rglob('*.py')):\n"
        "    for n in ast.walk(ast.parse(p.read_text())):\n"
        "        if isinstance(n, ast.ImportFrom) and n.level == 0 and (n.module or '').startswith('trd_hpc'):\n"
        "            m = importlib.import_module(n.module)\n"
        "            for a in n.names:\n"
        "                if not hasattr(m, a.name):\n"
        "                    try:\n"
        "                        importlib.import_module(f'{n.module}.{a.name}')\n"
        "                    except ImportError:\n"
        "                        bad.append(f'{p}:{n.lineno}: {n.module}.{a.name}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


def _layer_table() -> dict[str, int]:
    """CONTRIBUTING.md's layer table: part (trd_hpc.X) -> layer."""
    import re

    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Layout: who may import whom") :]
    section = section[: section.index("\n## ", 3)]
    out: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        for part in re.findall(r"`([^`]+)`", m.group(2)):
            name = part.rstrip("/").removesuffix(".py")
            out["trd_hpc" if name == "__init__" else f"trd_hpc.{name}"] = int(m.group(1))
    return out


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def upward_imports(graph: dict[str, set[str]], table: dict[str, int]) -> list[str]:
    """Imports from one part to another that do not go to a lower layer."""
    return [
        f"{m} (layer {table[_part(m)]}) -> {t} (layer {table[_part(t)]})"
        for m, targets in sorted(graph.items())
        for t in sorted(targets)
        if _part(t) != _part(m) and table[_part(t)] >= table[_part(m)]
    ]


def test_every_import_goes_down_the_layer_table():
    """Each module's part is in CONTRIBUTING.md's table, every part there exists, and every
    import (lazy ones and package __init__ execution included) goes to a lower layer or
    stays inside its own part."""
    table = _layer_table()
    graph = import_graph()
    assert len(table) > 25
    parts = {_part(m) for m in graph}
    assert not parts - set(table), f"parts missing from CONTRIBUTING.md's layer table: {sorted(parts - set(table))}"
    assert not set(table) - parts, f"the layer table names parts that do not exist: {sorted(set(table) - parts)}"
    upward = upward_imports(graph, table)
    assert not upward, "imports that do not go down the layer table:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import():
    table = _layer_table()
    graph = import_graph()
    graph["trd_hpc.config"] = graph["trd_hpc.config"] | {"trd_hpc.experiment"}
    graph["trd_hpc.data.shards"] = graph["trd_hpc.data.shards"] | {"trd_hpc.eval.metrics"}  # same layer
    assert upward_imports(graph, table) == [
        f"trd_hpc.config (layer {table['trd_hpc.config']}) -> trd_hpc.experiment (layer {table['trd_hpc.experiment']})",
        f"trd_hpc.data.shards (layer {table['trd_hpc.data']}) -> trd_hpc.eval.metrics (layer {table['trd_hpc.eval']})",
    ]


def test_no_paper_folder_imports_another():
    """One paper, one folder: a paper's modules use the shared layers, never another paper's."""
    graph = import_graph()

    def paper(m: str) -> str | None:
        parts = m.split(".")
        return parts[2] if len(parts) > 3 and parts[1] == "tasks" else None

    crossing = [f"{m} -> {t}" for m, ts in graph.items() for t in ts if paper(m) and paper(t) and paper(m) != paper(t)]
    assert not crossing, crossing
