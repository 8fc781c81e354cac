"""Reading documents: JSONL records (`document`, optional `summary`: one reference summary, or a list of
them) and plain text files, with
clear errors for empty files, missing fields and bad encodings (prompts: calm.prompts.templates)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from calm.errors import InputError
from calm.prompts.templates import SUMMARY_TEMPLATE as SUMMARY_PROMPT
from calm.prompts.templates import summary_prompt, truncate_document

# summary_prompt and truncate_document live in calm.prompts.templates; they are importable from here too.
__all__ = ["SUMMARY_PROMPT", "Record", "parse_jsonl", "read_jsonl", "read_text", "summary_prompt", "truncate_document"]


@dataclass(frozen=True)
class Record:
    id: str
    document: str
    summary: str | None = None  # the (first) reference summary
    references: tuple[str, ...] = ()  # every reference, where the summary field holds a list of them

    @property
    def all_references(self) -> tuple[str, ...]:
        """The reference summaries: the list given, else the one summary (none: empty)."""
        return self.references or ((self.summary,) if self.summary else ())


def read_jsonl(
    path: str | Path,
    document_field: str = "document",
    summary_field: str | None = "summary",
    require_summary: bool = False,
    limit: int | None = None,
    skipped: list[int] | None = None,
) -> list[Record]:
    """Records of a JSONL file. Every line must be a JSON object with a non-empty `document_field`;
    when a `skipped` list is given, records with a blank document are left out and their line
    numbers appended to it instead."""
    records = parse_jsonl(_read_text(Path(path)), str(path), document_field, summary_field, require_summary, skipped)
    return records[:limit] if limit is not None else records


def parse_jsonl(
    content: str,
    source: str,
    document_field: str = "document",
    summary_field: str | None = "summary",
    require_summary: bool = False,
    skipped: list[int] | None = None,
) -> list[Record]:
    """Records of JSONL text read from `source` (a file name or <stdin>, for messages)."""
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        record = _record(
            line,
            f"{source}:{number}",
            number,
            document_field,
            summary_field,
            require_summary,
            skip_blank=skipped is not None,
        )
        if record is not None:
            records.append(record)
        elif skipped is not None:  # only a blank document is skipped, and only on request
            skipped.append(number)
    if not records:
        raise InputError(f"{source} holds no records" + (" with a non-empty document" if skipped else ""))
    return records


def _record(
    line: str,
    where: str,
    number: int,
    document_field: str,
    summary_field: str | None,
    require_summary: bool,
    skip_blank: bool = False,
) -> Record | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if document_field not in obj:
        raise InputError(
            f"{where}: no field {document_field!r} (fields: {', '.join(sorted(obj))}); "
            "name the document field with --field-document"
        )
    document = obj[document_field]
    if skip_blank and isinstance(document, str) and not document.strip():
        return None
    if not isinstance(document, str) or not document.strip():
        raise InputError(f"{where}: field {document_field!r} is empty or not text")
    summary = obj.get(summary_field) if summary_field else None
    references: tuple[str, ...] = ()
    if isinstance(summary, list):
        references = tuple(s for s in summary if isinstance(s, str) and s.strip())
        summary = references[0] if references else None
    summary = summary if isinstance(summary, str) else None
    if require_summary and (not isinstance(summary, str) or not summary.strip()):
        raise InputError(f"{where}: no reference summary in field {summary_field!r}; name it with --field-summary")
    return Record(id=str(obj.get("id", number)), document=document, summary=summary, references=references)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents; an error if it is missing, not UTF-8 or empty."""
    text = _read_text(Path(path))
    if not text.strip():
        raise InputError(f"{path} is empty")
    return text


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a file in it (JSONL or plain text)")
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8") from exc
