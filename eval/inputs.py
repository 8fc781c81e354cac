"""Documents to summarise: a JSONL file of records, a plain text file (one document), stdin ('-',
either form) or a string. Errors say which file and line is wrong and what to do."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from calm.errors import InputError
from calm.prompts.documents import Record, parse_jsonl, read_jsonl, read_text

STDIN = "-"


def load_documents(
    source: str | None = None,
    text: str | None = None,
    document_field: str = "document",
    limit: int | None = None,
    stdin: TextIO | None = None,
) -> list[Record]:
    """Records from exactly one of: `text`, a file path, or '-' (stdin). A file is read as JSONL when it
    ends in .jsonl or its first line is a JSON object, else as one plain-text document."""
    if (source is None) == (text is None):
        raise InputError(
            "give a FILE (or - for stdin) or --text, but not both"
            if source is not None
            else 'nothing to summarise: give a FILE, - for stdin, or --text "..."'
        )
    if text is not None:
        return [_single("text", text, "--text")]
    if source is None:
        raise AssertionError("the check above leaves exactly one of source and text")
    if source == STDIN:
        name, content = "<stdin>", (stdin or sys.stdin).read()
    elif source.endswith(".jsonl"):
        return read_jsonl(source, document_field=document_field, summary_field=None, limit=limit)
    else:
        name, content = source, read_text(source)
    if _first_line_is_object(content):
        records = parse_jsonl(content, name, document_field, summary_field=None)
        return records[:limit] if limit else records
    return [_single("stdin" if source == STDIN else Path(source).stem, content, name)]


def _first_line_is_object(content: str) -> bool:
    first = next((line for line in content.splitlines() if line.strip()), "")
    return first.lstrip().startswith("{")


def _single(id_: str, document: str, where: str) -> Record:
    if not document.strip():
        raise InputError(f"{where} is empty: give some text to summarise")
    return Record(id=id_, document=document)
