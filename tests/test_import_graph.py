"""The project's modules import each other in one direction: no import cycle among them, and
`benchmarks/` -> `training/` -> `dschat_hal/` -> `accel/`, never back up.

The graph is read from the source with `ast` (nothing is imported). Every import statement counts,
wherever it stands: at module level, inside a function (a deferred import is still a dependency; it
only moves the cycle from start-up to the first call) or under `if TYPE_CHECKING:`. An import that
must stay lazy *and* close a cycle would have to be listed in `ALLOWED` below with its reason; there
is none. How names resolve:

- `import a.b.c` depends on `a.b.c` (its parent packages `a`, `a.b` are not counted: a package's
  `__init__` may re-export its own modules);
- `from a.b import c` depends on the module `a.b.c` when there is one, else on `a.b` (its `__init__`);
- relative imports resolve against the importing module's package; only project modules count.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("accel", "dschat_hal", "training", "benchmarks")  # lowest first: each may import only those before it

# (importer, imported) edges allowed to close a cycle, each with its reason: none needed today
ALLOWED: dict[tuple[str, str], str] = {}

RUNTIME = ("dschat_hal.rlhf.engine", "dschat_hal.rlhf.trainer", "dschat_hal.rlhf.generation")
# inside dschat_hal: (importer prefix, prefixes it must not import, why)
LAYERS = [
    (
        "dschat_hal.decisions",
        ("dschat_hal.memory_plan", "dschat_hal.runtime", *RUNTIME),
        "the run's decisions sit below both the memory plan and the runtime",
    ),
    ("dschat_hal.memory_plan", RUNTIME, "the plan measures; it learns the run's decisions from dschat_hal.decisions"),
    ("dschat_hal.rlhf", ("dschat_hal.memory_plan",), "the runtime obeys the run's decisions; it never asks the plan"),
    ("dschat_hal.models", ("dschat_hal.rlhf", "dschat_hal.memory_plan"), "models sit below step 3 and the plan"),
]


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted name, is a package) of a source file under `root`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def project_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Every module of PACKAGES: name -> (file, is a package)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            name, is_package = _module_name(path, root)
            modules[name] = (path, is_package)
    return modules


def _project_module(name: str, modules: dict) -> str | None:
    """`name`, or the nearest enclosing project module of it (None: not the project's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, is_package: bool, modules: dict) -> dict[str, int]:
    """The project modules `name` imports -> the first line that does."""
    package = name if is_package else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target and target != name:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_project_module(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else _project_module(source, modules), node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line}."""
    modules = project_modules(root)
    return {name: imports_of(name, path, is_package, modules) for name, (path, is_package) in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """Per strongly connected component of more than one module (Tarjan's algorithm, iterative; the
    ALLOWED edges left out): one shortest cycle through it (its first module repeated at the end), and
    all of its modules."""
    edges = {m: sorted(t for t in targets if (m, t) not in ALLOWED and t in graph) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(edges[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [(_one_cycle(sorted(component), edges), sorted(component)) for component in components]


def _one_cycle(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first, within the component)."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in edges[node]:
                if child == start:
                    return [*paths[node], start]
                if child in members and child not in paths:
                    paths[child] = [*paths[node], child]
                    following.append(child)
        frontier = following
    return component  # unreachable for a strongly connected component


def _describe(cycle: list[str], members: list[str], graph: dict[str, dict[str, int]]) -> str:
    """`a (line N) -> b (line M) -> a` (each line the importer's), and any other module tied in with them."""
    text = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle[:-1], cycle[1:], strict=True))
    others = [m for m in members if m not in cycle]
    return f"{text} -> {cycle[-1]}" + (f"; in the same knot: {', '.join(others)}" if others else "")


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def direction_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    """Imports against PACKAGES' order or against LAYERS, one line each."""
    rank = {package: i for i, package in enumerate(PACKAGES)}
    out = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets.items()):
            if rank[target.split(".")[0]] > rank[module.split(".")[0]]:
                out.append(f"{module} (line {line}) imports {target}: {target.split('.')[0]}/ is above it")
            for importer, forbidden, why in LAYERS:
                if _inside(module, importer) and any(_inside(target, f) for f in forbidden):
                    out.append(f"{module} (line {line}) imports {target}: {why}")
    return out


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(_describe(c, members, graph) for c, members in found)


def test_imports_go_one_way():
    assert direction_violations(import_graph()) == []


def test_the_checks_catch_a_cycle_a_deferred_import_and_an_upward_import(tmp_path):
    def write(path: str, text: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)

    for package in PACKAGES:
        write(f"{package}/__init__.py", "")
    write("dschat_hal/a.py", "from dschat_hal import b\n")
    write("dschat_hal/b.py", "def f():\n    from .c import g\n")  # deferred and relative: still an edge
    write("dschat_hal/c.py", "import dschat_hal.a\nimport os\n")
    write("dschat_hal/d.py", "from dschat_hal.a import f\n")  # a name in a module: an edge to that module
    write("accel/x.py", "from training import y\n")
    graph = import_graph(tmp_path)
    assert graph["dschat_hal.d"] == {"dschat_hal.a": 1}
    (cycle, members), *others = cycles(graph)
    assert cycle == ["dschat_hal.a", "dschat_hal.b", "dschat_hal.c", "dschat_hal.a"] and not others
    assert members == ["dschat_hal.a", "dschat_hal.b", "dschat_hal.c"]
    assert "dschat_hal.b (line 2) -> dschat_hal.c (line 1) -> dschat_hal.a" in _describe(cycle, members, graph)
    assert direction_violations(graph) == ["accel.x (line 1) imports training: training/ is above it"]
