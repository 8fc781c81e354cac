"""What the docs say about the repository's own commands holds (issue 29, item 10)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDINALS = ("first", "second", "third", "fourth", "fifth")


def demo_commands() -> list[str]:
    """The calm commands of the Makefile's demo target, in order, as a user types them."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    commands = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        commands.append(line.strip().replace("$(VENV)/bin/", ""))
    return commands


def test_docs_name_the_demo_command_they_show():
    commands = demo_commands()
    text = (ROOT / "docs" / "cli.md").read_text()
    claims = list(re.finditer(r"`make demo`'s (\w+) command", text))
    assert claims
    for claim in claims:
        shown = re.search(r"^\$ (calm .*)$", text[claim.end() :], re.MULTILINE)
        assert shown is not None
        index = ORDINALS.index(claim.group(1))
        assert commands[index] == shown.group(1), (claim.group(0), commands)
