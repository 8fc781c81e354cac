"""The house rules of calm/, cli/ and eval/: modules under 400 lines, functions under about 60, type hints
on every public function, and imports that run down the floors of FLOORS, never up and never in a circle.

A function may run longer when its `def` line, or the line above it, carries a comment with `long:` and the
reason. A function's lines are counted from its `def` line to the end of its body, decorators not included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("calm", "cli", "eval")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def python_files(root: Path) -> list[Path]:
    return sorted(path for package in PACKAGES for path in (root / package).rglob("*.py"))


def long_modules(files: list[Path], root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    found = []
    for path in files:
        lines = len(path.read_text().splitlines())
        if lines > limit:
            found.append(f"{path.relative_to(root)}: {lines} lines")
    return found


def justified(lines: list[str], def_line: int) -> bool:
    """Whether the `def` line (1-based) or the line above it has a `# ... long: reason` comment."""
    nearby = lines[max(def_line - 2, 0) : def_line]
    return any("#" in line and "long:" in line.split("#", 1)[1] for line in nearby)


def long_functions(path: Path, root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    functions = [
        node
        for node in ast.walk(ast.parse(source, filename=str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    found = []
    for node in sorted(functions, key=lambda node: node.lineno):
        length = (node.end_lineno or node.lineno) - node.lineno + 1
        if length > limit and not justified(lines, node.lineno):
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines")
    return found


def untyped_functions(path: Path, root: Path) -> list[str]:
    """Public functions and methods (no leading underscore) with a parameter or the return not annotated."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
        missing = [a.arg for a in params if a.annotation is None and a.arg not in ("self", "cls")]
        missing += ["return"] if node.returns is None else []
        if missing:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {', '.join(missing)}")
    return found


def test_no_module_over_400_lines() -> None:
    offenders = long_modules(python_files(ROOT), ROOT)
    assert not offenders, "modules over 400 lines:\n" + "\n".join(offenders)


def test_no_function_over_60_lines_without_a_reason() -> None:
    offenders = [entry for path in python_files(ROOT) for entry in long_functions(path, ROOT)]
    assert not offenders, "functions over 60 lines (split them, or add `# long: <reason>`):\n" + "\n".join(offenders)


def test_public_functions_have_type_hints() -> None:
    offenders = [entry for path in python_files(ROOT) for entry in untyped_functions(path, ROOT)]
    assert not offenders, "public functions without type hints:\n" + "\n".join(offenders)


def test_the_checker_finds_long_code_and_honours_a_reason(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "calm").mkdir()
    probe = tmp_path / "calm" / "probe.py"
    probe.write_text(
        "def short():\n    return 1\n\n\n"
        f"@decorated\ndef long_one():\n{body}\n\n\n"
        f"# long: a probe that must be allowed\ndef long_two():\n{body}\n\n\n"
        f"def long_three():  # long: the reason may stand on the def line\n{body}\n\n\n"
        f"class Holder:\n    def method(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n"
    )
    assert python_files(tmp_path) == [probe]
    assert long_functions(probe, tmp_path) == [
        "calm/probe.py:6 long_one: 62 lines",
        "calm/probe.py:200 method: 62 lines",
    ]
    lines = len(probe.read_text().splitlines())
    assert long_modules([probe], tmp_path, limit=lines - 1) == [f"calm/probe.py: {lines} lines"]
    assert long_modules([probe], tmp_path, limit=lines) == []


def test_the_checker_finds_missing_hints(tmp_path: Path) -> None:
    (tmp_path / "cli").mkdir()
    probe = tmp_path / "cli" / "probe.py"
    probe.write_text(
        "def typed(a: int, *rest: str, **more: float) -> None: ...\n"
        "def _private(a): ...\n"
        "def no_return(a: int): ...\n"
        "def loose(a, *rest, b: int = 0, **more) -> int: ...\n"
        "class C:\n    def method(self, x) -> None: ...\n    @classmethod\n    def build(cls) -> 'C': ...\n"
    )
    assert untyped_functions(probe, tmp_path) == [
        "cli/probe.py:3 no_return: return",
        "cli/probe.py:4 loose: a, rest, more",
        "cli/probe.py:6 method: x",
    ]


# ---- the floors: imports run down, never up, and never in a circle ---------------------------------------

# The floor plan, lowest first. A module may import modules on its own floor or below. "pkg.*" is the package
# pkg and everything in it; a bare name is that module alone (the more exact entry wins).
FLOORS: tuple[tuple[str, ...], ...] = (
    ("calm.errors",),
    ("calm.adapters.*",),
    ("calm.exits.*",),
    ("calm.engine.*",),
    ("calm.calibration.*",),
    ("calm.speculative.*",),
    ("calm.checkpoints.*",),
    ("calm.prompts.*",),
    (
        "calm.continuous",
        "calm.generate_policy",
        "calm.model",
        "calm.options",
        "calm",
    ),  # the facade, its options, and the package root that exports it
    ("calm.bench",),
    ("calm.serving.*",),  # calm serve: the HTTP layer over the model facade and the scheduler
    ("calm.training.*",),
    ("calm.eval.*",),
    ("calm.cli.*", "calm.training.__main__"),  # `python -m calm.training` is a command
)
SOURCE_PACKAGES = {"calm": "calm", "cli": "calm.cli", "eval": "calm.eval"}  # directory -> the package it installs as


def module_names(root: Path) -> dict[str, Path]:
    """Every module under root's calm/, cli/ and eval/ by its import name (a package by its own name)."""
    names = {}
    for directory, package in SOURCE_PACKAGES.items():
        for path in sorted((root / directory).rglob("*.py")):
            parts = path.relative_to(root / directory).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            names[".".join((package, *parts))] = path
    return names


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules a module imports, anywhere in it: at the top, in functions, under TYPE_CHECKING.
    `from package import name` counts as importing package.name where that is a module."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {module for module in found if module in known and module != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def floor_of(module: str, floors: tuple[tuple[str, ...], ...] = FLOORS) -> int | None:
    exact = [i for i, floor in enumerate(floors) if module in floor]
    if exact:
        return exact[0]
    matches = [
        (len(entry), i)
        for i, floor in enumerate(floors)
        for entry in floor
        if entry.endswith(".*") and (module == entry[:-2] or module.startswith(entry[:-1]))
    ]
    return max(matches)[1] if matches else None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules, sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def upward_imports(graph: dict[str, set[str]], floors: tuple[tuple[str, ...], ...] = FLOORS) -> list[str]:
    """Imports from a lower floor to a higher one, and modules on no floor."""
    found = []
    for module, targets in sorted(graph.items()):
        here = floor_of(module, floors)
        if here is None:
            found.append(f"{module} is on no floor (add it to FLOORS)")
            continue
        for target in sorted(targets):
            there = floor_of(target, floors)
            if there is not None and there > here:
                found.append(f"{module} (floor {here}) imports {target} (floor {there})")
    return found


def test_no_import_circles() -> None:
    found = circles(import_graph(ROOT))
    assert not found, "import circles (each line: modules that import each other round):\n" + "\n".join(
        ", ".join(group) for group in found
    )


def test_imports_run_down_the_floors() -> None:
    offenders = upward_imports(import_graph(ROOT))
    assert not offenders, "imports against the floor plan:\n" + "\n".join(offenders)


def test_the_checker_finds_a_circle_and_an_upward_import(tmp_path: Path) -> None:
    files = {
        "calm/__init__.py": "",
        "calm/errors.py": "",
        "calm/engine/__init__.py": '"""The engine."""',
        "calm/engine/step.py": "from calm.errors import CalmError\nfrom calm.engine import loop\n",
        "calm/engine/loop.py": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from calm.engine.step import Step\n"
            "def run():\n    from calm.model import CalmModel\n"
        ),
        "calm/model.py": "from calm.errors import CalmError\n",
        "cli/__init__.py": "",
        "cli/main.py": "from calm import model\nfrom . import __name__ as pkg\n",
        "eval/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["calm.engine.loop"] == {"calm.engine.step", "calm.model"}  # TYPE_CHECKING and in a function
    assert graph["calm.cli.main"] == {"calm.model", "calm.cli"}  # `from calm import model`, a relative import
    assert circles(graph) == [["calm.engine.loop", "calm.engine.step"]]
    floors = (("calm.errors",), ("calm.engine.*",), ("calm.model", "calm"), ("calm.cli.*",))
    assert upward_imports(graph, floors) == [
        "calm.engine.loop (floor 1) imports calm.model (floor 2)",
        "calm.eval is on no floor (add it to FLOORS)",
    ]
    (tmp_path / "calm/engine/step.py").write_text("from calm.errors import CalmError\n")
    assert circles(import_graph(tmp_path)) == []
