"""The package's shape, read from its source with ``ast`` (nothing is imported; fast and pure).

* **No import cycles** between the modules of ``megatron_smd/``. Every import counts, at module level
  or inside a function, relative or absolute. An import names the module it loads: ``import a.b``
  and ``from a import b`` with ``b`` a submodule load ``a.b``; ``from a.b import name`` with ``name``
  not a submodule loads ``a.b``, for a package its ``__init__``. Loading ``a.b.c`` also runs the
  ``__init__`` of every package above it, so it counts as importing those ``__init__`` s too, except
  the packages the importing module is itself inside (they are already being initialised: a package
  ``__init__`` re-exporting its submodules while they import each other is not a cycle, a submodule
  importing its own package's ``__init__`` is).
* **One reader of the launcher's environment**: only ``megatron_smd/parallel/layout.py`` names
  ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in a module that touches the process environment
  (``os.environ``, ``os.getenv``); everything else asks its helpers (:func:`env_rank`,
  :func:`launched_by_torchrun`, :func:`clean_launcher_env`, :func:`one_process_env`).
* **No module over 600 lines.**
"""

from __future__ import annotations

import ast
import os
import tempfile
from collections import deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = "megatron_smd"
ROOT = REPO / PKG
MAX_LINES = 600
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
ENV_OWNER = ROOT / "parallel" / "layout.py"


@dataclass(frozen=True)
class Module:
    name: str  # dotted
    path: Path
    is_package: bool  # an __init__.py

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    @property
    def inside(self) -> set[str]:
        """The packages this module is inside (a package's __init__ is inside itself)."""
        parts = self.name.split(".")
        own = parts if self.is_package else parts[:-1]
        return {".".join(own[:i]) for i in range(1, len(own) + 1)}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    how: str  # the import as written, and why it reaches dst


@cache
def modules() -> dict[str, Module]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = Module(".".join(parts), p, is_pkg)
    return out


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (None: not ours)."""
    mods = modules()
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def _base(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    pkg = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    pkg = pkg[:len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


def _text(node: ast.AST) -> str:
    return ast.unparse(node).replace("\n", " ")


def import_edges(mod: Module) -> list[Edge]:
    """Every module of the package that ``mod`` imports, directly or by initialising its packages."""
    mods = modules()
    edges = []
    for node in ast.walk(tree(mod.path)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [t for a in node.names if (t := _known(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = _base(mod, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                t = sub if sub in mods else _known(base)
                if t:
                    targets.append(t)
        else:
            continue
        written = _text(node)
        for t in dict.fromkeys(targets):
            if t != mod.name:
                edges.append(Edge(mod.name, t, node.lineno, written))
            parts = t.split(".")
            for i in range(1, len(parts)):
                pkg = ".".join(parts[:i])
                if pkg not in mod.inside and pkg in mods:
                    edges.append(Edge(mod.name, pkg, node.lineno,
                                      f"{written}  (loading {t} runs the package __init__ {mods[pkg].rel})"))
    return edges


def import_graph() -> dict[str, dict[str, Edge]]:
    graph: dict[str, dict[str, Edge]] = {m: {} for m in modules()}
    for name, mod in modules().items():
        for e in import_edges(mod):
            graph[name].setdefault(e.dst, e)  # the first import of a target names the edge
    return graph


def strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def shortest_cycle(graph: dict[str, dict[str, Edge]], comp: list[str]) -> list[Edge]:
    """A shortest cycle through the first module of ``comp`` (BFS inside the component)."""
    members, start = set(comp), comp[0]
    prev: dict[str, Edge] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w, e in sorted(graph[v].items()):
            if w not in members:
                continue
            if w == start:
                path = [e]
                while path[0].src != start:
                    path.insert(0, prev[path[0].src])
                return path
            if w not in prev:
                prev[w] = e
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {comp}")


def describe_cycle(cycle: list[Edge]) -> str:
    mods = modules()
    chain = " -> ".join([cycle[0].src] + [e.dst for e in cycle])
    lines = [f"cycle: {chain}"]
    for e in cycle:
        lines.append(f"    {mods[e.src].rel}:{e.line}: {e.how}")
    return "\n".join(lines)


def test_no_import_cycles():
    graph = import_graph()
    comps = strongly_connected(graph)
    report = []
    for comp in comps:
        report.append(f"modules importing each other: {', '.join(comp)}\n" + describe_cycle(shortest_cycle(graph, comp)))
    assert not comps, f"{len(comps)} import cycle(s) in {PKG}/:\n" + "\n".join(report)


def _touches_environment(t: ast.Module) -> list[int]:
    """Lines where the module reads or writes the process environment."""
    lines = []
    for node in ast.walk(t):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "environb", "getenv", "putenv", "unsetenv"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "environb", "getenv") for a in node.names):
            lines.append(node.lineno)
    return sorted(set(lines))


def _launcher_names(t: ast.Module) -> list[tuple[int, str]]:
    """Where the module spells a launcher variable: a string literal or a keyword argument."""
    out = []
    for node in ast.walk(t):
        if isinstance(node, ast.Constant) and node.value in LAUNCHER_VARS:
            out.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.keyword) and node.arg in LAUNCHER_VARS:
            out.append((node.value.lineno, f"{node.arg}=..."))
    return sorted(out)


def test_launcher_environment_read_only_by_layout():
    bad = []
    for mod in modules().values():
        if mod.path == ENV_OWNER:
            continue
        t = tree(mod.path)
        env = _touches_environment(t)
        names = _launcher_names(t)
        if env and names:
            where = ", ".join(f"line {ln}: {what}" for ln, what in names)
            bad.append(f"{mod.rel}: names {'/'.join(LAUNCHER_VARS)} ({where}) and touches the environment "
                       f"(lines {', '.join(map(str, env))})")
    assert not bad, (
        f"only {ENV_OWNER.relative_to(REPO)} reads or edits the launcher's {'/'.join(LAUNCHER_VARS)}; use its "
        f"env_rank(), launched_by_torchrun(), clean_launcher_env(env) or one_process_env() instead:\n  "
        + "\n  ".join(bad))


def test_no_module_over_max_lines():
    long = sorted((n, m.rel) for m in modules().values() if (n := len(m.path.read_text().splitlines())) > MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split them along a seam):\n  " + "\n  ".join(
        f"{rel}: {n} lines" for n, rel in reversed(long))


# ------------------------------------------------------------------------------ the checks, checked
def _graph_of(edges: dict[str, list[str]]) -> dict[str, dict[str, Edge]]:
    return {s: {d: Edge(s, d, 1, "import") for d in ds} for s, ds in edges.items()}


def test_cycle_finder_on_known_graphs():
    g = _graph_of({"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"]})
    assert strongly_connected(g) == [["a", "b", "c"]]
    assert [(e.src, e.dst) for e in shortest_cycle(g, ["a", "b", "c"])] == [("a", "b"), ("b", "c"), ("c", "a")]
    assert strongly_connected(_graph_of({"a": ["b"], "b": ["c"], "c": []})) == []


def test_import_resolution_counts_package_inits():
    """The rules the cycle test applies, on modules that exist: a submodule reached from outside its
    package also initialises the package; from inside it does not; ``from pkg import submodule``
    names the submodule."""
    mods = modules()
    assert f"{PKG}.sync" in mods and mods[f"{PKG}.sync"].is_package

    def edges(src: str, code: str, tmp=Path(tempfile.mkdtemp(prefix="smd-structure-"))) -> set[tuple[str, str]]:
        p = tmp / f"case{len(list(tmp.iterdir()))}.py"
        p.write_text(code)
        return {(e.src, e.dst) for e in import_edges(Module(src, p, mods[src].is_package))}

    outside = f"{PKG}.errors"
    assert edges(outside, "from .sync.bucket import Bucket\n") == {
        (outside, f"{PKG}.sync.bucket"), (outside, f"{PKG}.sync")}
    assert edges(outside, "def f():\n    import megatron_smd.sync.bucket\n") == {
        (outside, f"{PKG}.sync.bucket"), (outside, f"{PKG}.sync")}
    assert edges(outside, "from . import sync\n") == {(outside, f"{PKG}.sync")}
    inside = f"{PKG}.sync.bucket"
    assert edges(inside, "from .staging import WeightSyncError\n") == {(inside, f"{PKG}.sync.staging")}
    assert edges(inside, "from . import staging\n") == {(inside, f"{PKG}.sync.staging")}
    assert edges(inside, "from . import WeightSyncError\n") == {(inside, f"{PKG}.sync")}
    assert edges(inside, "from ..errors import SMDError\nimport torch\n") == {(inside, f"{PKG}.errors")}
    init = f"{PKG}.sync"
    assert edges(init, "from .bucket import Bucket\n") == {(init, f"{PKG}.sync.bucket")}


def test_environment_check_sees_reads_and_edits():
    def flagged(code: str) -> bool:
        t = ast.parse(code)
        return bool(_touches_environment(t) and _launcher_names(t))

    assert flagged("import os\nr = int(os.environ.get('RANK', '0'))\n")
    assert flagged("import os\nif 'WORLD_SIZE' in os.environ: pass\n")
    assert flagged("import os\nos.environ.update(RANK='0')\n")
    assert flagged("import os\nenv = {k: v for k, v in os.environ.items() if k not in ('LOCAL_RANK',)}\n")
    assert flagged("from os import getenv\nr = getenv('RANK')\n")
    assert not flagged("import os\nx = os.environ.get('SMD_FAULT_DRILL')\n")
    assert not flagged("env = {'RANK': '0'}\n")  # a child's environment built from scratch


def test_launcher_helpers(monkeypatch):
    """The helpers the environment check points to (``parallel/layout.py``) do what they say."""
    from megatron_smd.parallel import layout

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert layout.env_rank() == 0 and not layout.launched_by_torchrun()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert layout.env_rank() == 3 and layout.launched_by_torchrun()
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "29500", "MASTER_ADDR": "h", "PATH": "/b"}
    assert layout.clean_launcher_env(env) == {"MASTER_ADDR": "h", "PATH": "/b"}
    with layout.one_process_env():
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
        assert int(os.environ["MASTER_PORT"]) > 0
    assert (layout.env_rank(), os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == (3, "4", "10.0.0.1")
    assert "MASTER_PORT" not in os.environ and "LOCAL_RANK" not in os.environ
    try:
        with layout.one_process_env():
            raise KeyError("x")
    except KeyError:
        pass
    assert os.environ["RANK"] == "3" and "MASTER_PORT" not in os.environ
