"""The layer rules of docs/architecture.md, checked on the source: every `import` of a qlorakit module in
src/qlorakit is read with `ast` (at the top of a module and inside functions, plus `importlib.import_module`
of a constant name) and the graph must

- give every module a floor (the packages of the layout: a module outside it is a misplaced file);
- only go down: a module imports its own package and packages on lower floors, never one beside it or
  above it, and `quant` imports only `core`, `data` only `core` and `config`;
- have no cycle between modules (a cycle hidden behind a function-level import still is one);
- keep qlorakit's own imports at the top of each module, so the graph can be read off the first lines. The
  one exception is the command table of cli.py: `qlorakit --help` must not import every command.

Lazy imports of heavy third-party packages (transformers, matplotlib, gguf, ...) are allowed anywhere: only
qlorakit's own modules are checked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The floors, lowest first. A unit is a top-level module or package of qlorakit; `cli` and `__main__` count
# as the `commands` unit (the command line is one room: the entry point and one module per command).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("core",),
    ("quant",),  # below config: config turns its QuantConfig into quant's own QuantSettings
    ("config",),
    ("lora",),
    ("models", "data", "methods"),  # methods: the fine-tuning methods (lora/, ...) behind one interface
    ("loss",),
    ("train", "eval", "export"),
    ("tools",),
    ("commands",),
)
# Units that may import less than everything below them.
ONLY: dict[str, frozenset[str]] = {
    "quant": frozenset({"core"}),  # the 4-bit maths knows nothing of the application's config or LoRA
    "data": frozenset({"core", "config"}),  # beside lora/models: rows and tokens, no model code
}
_ALIASES = {"cli": "commands", "__main__": "commands", "": "core"}  # "": the package root (its version)
# The one place a qlorakit import may be deferred: cli.py imports the module of the command being run.
LAZY_ALLOWED: dict[str, str] = {"qlorakit.cli": "qlorakit.commands."}

FLOOR_OF = {unit: level for level, units in enumerate(FLOORS) for unit in units}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported qlorakit module, dotted
    path: str  # file of the importing module, relative to src/
    line: int
    function: str | None  # the enclosing function, for an import that is not at the top of the module

    def where(self) -> str:
        inside = f" (inside {self.function}())" if self.function else ""
        return f"{self.path}:{self.line}{inside}"


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """`qlorakit.quant.linear` -> `quant`; `qlorakit.cli` -> `commands`; `qlorakit` -> `core`."""
    first = module.split(".")[1] if "." in module else ""
    return _ALIASES.get(first, first)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of `from <level dots><name> import ...` written in `module`."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


class _Imports(ast.NodeVisitor):
    """Collects the qlorakit imports of one module, with the function each sits in (None at the top)."""

    def __init__(self, module: str, is_package: bool, known: set[str], strings: dict[str, str]) -> None:
        self.module, self.is_package, self.known, self.strings = module, is_package, known, strings
        self.found: list[tuple[str, int, str | None]] = []
        self._function: list[str] = []

    def _add(self, target: str, line: int) -> None:
        if target == "qlorakit" or target.startswith("qlorakit."):
            self.found.append((target, line, self._function[-1] if self._function else None))

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._function.append(getattr(node, "name", "<lambda>"))
        self.generic_visit(node)
        self._function.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.module, self.is_package, node.level, node.module)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in self.known else base, node.lineno)  # `from pkg import submodule`

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(arg.value, node.lineno)
            elif isinstance(arg, ast.Name) and arg.id in self.strings:
                self._add(self.strings[arg.id], node.lineno)
            elif self.module in LAZY_ALLOWED:  # the command table: every module name it lists
                for name in self.strings.values():
                    if name.startswith(LAZY_ALLOWED[self.module]):
                        self._add(name, node.lineno)
        self.generic_visit(node)


def _string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level string constants, and the string values of module-level dicts (a command table)."""
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            for target in targets:
                if not isinstance(target, ast.Name):
                    continue
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    out[target.id] = value.value
                elif isinstance(value, ast.Dict):
                    for i, v in enumerate(value.values):
                        if isinstance(v, ast.Constant) and isinstance(v.value, str):
                            out[f"{target.id}[{i}]"] = v.value
    return out


def collect(src: Path) -> tuple[set[str], list[Edge]]:
    """All modules of the package under `src` and every qlorakit import between them."""
    files = sorted((src / "qlorakit").rglob("*.py"))
    modules = {module_name(f, src): f for f in files}
    edges = []
    for module, file in modules.items():
        tree = ast.parse(file.read_text(), filename=str(file))
        visitor = _Imports(module, file.name == "__init__.py", set(modules), _string_constants(tree))
        visitor.visit(tree)
        rel = str(file.relative_to(src))
        found = dict.fromkeys(visitor.found)  # one edge per imported module per statement, in order
        edges += [Edge(module, t, rel, line, fn) for t, line, fn in found if t != module]
    return set(modules), edges


def unplaced_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if unit_of(m) not in FLOOR_OF)


def forbidden_edges(edges: list[Edge]) -> list[str]:
    problems = []
    for e in edges:
        src_unit, dst_unit = unit_of(e.source), unit_of(e.target)
        if src_unit == dst_unit or src_unit not in FLOOR_OF or dst_unit not in FLOOR_OF:
            continue  # inside one package; a module without a floor is reported on its own
        if dst_unit not in ONLY.get(src_unit, {dst_unit}):
            why = f"{src_unit} imports only {', '.join(sorted(ONLY[src_unit]))}"
        elif FLOOR_OF[dst_unit] > FLOOR_OF[src_unit]:
            why = f"{dst_unit} is above {src_unit}"
        elif FLOOR_OF[dst_unit] == FLOOR_OF[src_unit]:
            why = f"{dst_unit} is beside {src_unit}, on the same floor"
        else:
            continue
        problems.append(f"{e.where()}: {e.source} imports {e.target} ({why})")
    return problems


def import_cycles(modules: set[str], edges: list[Edge]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan), each listed from its smallest name."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        if e.target in graph:
            graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def deferred_imports(edges: list[Edge]) -> list[str]:
    return [
        f"{e.where()}: {e.source} imports {e.target}"
        for e in edges
        if e.function is not None
        and not (e.source in LAZY_ALLOWED and e.target.startswith(LAZY_ALLOWED[e.source]))
    ]


def _report(title: str, lines: list[str]) -> str:
    return f"{len(lines)} {title}:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The rules, on the package


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Edge]]:
    modules, edges = collect(SRC)
    assert "qlorakit.cli" in modules, f"no qlorakit package under {SRC}"
    return modules, edges


def test_every_module_lives_on_a_floor(graph):
    modules, _ = graph
    misplaced = unplaced_modules(modules)
    floors = " < ".join("|".join(units) for units in FLOORS)
    assert not misplaced, _report(f"modules outside the layout ({floors})", misplaced)


def test_imports_only_go_down_the_floors(graph):
    _, edges = graph
    problems = forbidden_edges(edges)
    assert not problems, _report("imports against the layer rules", problems)


def test_no_import_cycle_between_modules(graph):
    modules, edges = graph
    cycles = [" <-> ".join(group) for group in import_cycles(modules, edges)]
    assert not cycles, _report("import cycles", cycles)


def test_qlorakit_imports_are_at_the_top_of_each_module(graph):
    _, edges = graph
    problems = deferred_imports(edges)
    assert not problems, _report("qlorakit imports inside functions (move them to the top)", problems)


# ---------------------------------------------------------------------------------------------------------
# The checker, on a made-up package with one of each fault


def test_the_checker_finds_each_kind_of_fault(tmp_path):
    files = {
        "qlorakit/__init__.py": "",
        "qlorakit/core/__init__.py": "",
        "qlorakit/core/errors.py": "",
        "qlorakit/config.py": "from qlorakit.core import errors\n",
        "qlorakit/quant/__init__.py": "",
        "qlorakit/quant/state.py": "from qlorakit.config import X\nfrom . import linear\n",  # quant -> config
        "qlorakit/quant/linear.py": "from qlorakit.quant import state\n",  # cycle with state
        "qlorakit/train/loop.py": "def f():\n    from qlorakit.eval import generation\n",  # beside + deferred
        "qlorakit/eval/generation.py": "from ..core.errors import E\n",
        "qlorakit/lora/layer.py": "import qlorakit.models.load\n",  # up
        "qlorakit/models/load.py": "",
        "qlorakit/stray.py": "",  # no floor
        "qlorakit/cli.py": (
            "import importlib\nCOMMANDS = {'train': 'qlorakit.commands.train'}\n"
            "def build():\n    importlib.import_module(name)\n"  # the command table: allowed
        ),
        "qlorakit/commands/train.py": "from qlorakit.train import loop\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules, edges = collect(tmp_path)
    assert unplaced_modules(modules) == ["qlorakit.stray"]
    assert forbidden_edges(edges) == [
        "qlorakit/lora/layer.py:1: qlorakit.lora.layer imports qlorakit.models.load (models is above lora)",
        "qlorakit/quant/state.py:1: qlorakit.quant.state imports qlorakit.config (quant imports only core)",
        "qlorakit/train/loop.py:2 (inside f()): qlorakit.train.loop imports qlorakit.eval.generation "
        "(eval is beside train, on the same floor)",
    ]
    assert import_cycles(modules, edges) == [["qlorakit.quant.linear", "qlorakit.quant.state"]]
    assert deferred_imports(edges) == [
        "qlorakit/train/loop.py:2 (inside f()): qlorakit.train.loop imports qlorakit.eval.generation"
    ]
    assert any(e.source == "qlorakit.cli" and e.target == "qlorakit.commands.train" for e in edges)
    assert any(e.target == "qlorakit.core.errors" and e.source == "qlorakit.eval.generation" for e in edges)
