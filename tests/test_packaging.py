"""The package as setuptools builds it: every directory it ships is declared, so `pip install -e .` prints no
"absent from the `packages` configuration" warning, and the shipped checkpoint's files are in the build
(issue 29, item 9)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setuptools_builds_the_package_without_warnings_and_ships_the_assets(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for name in ("calm", "cli", "eval"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "build_py", "--build-lib", "lib"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "absent from the `packages` configuration" not in out.stderr, out.stderr[-2000:]
    shipped = {p.name for p in (tmp_path / "lib" / "calm" / "assets" / "smollm2").iterdir()}
    assert shipped == {p.name for p in (ROOT / "calm" / "assets" / "smollm2").iterdir()}
    assert (tmp_path / "lib" / "calm" / "cli" / "main.py").is_file()
