"""The house rules of calm/, cli/ and eval/: modules under 400 lines, functions under about 60, type hints
on every public function.

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
