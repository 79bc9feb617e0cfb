"""Contrast sets from files in common shapes: JSONL pairs, CSV, or two plain-text files.

Each loader returns a :class:`ContrastSet` (positive and negative texts plus where they came
from) ready for :func:`steerlab.extract.build_vector`. Malformed input raises
:class:`~steerlab.errors.PersonaError` naming the file, the line and the reason. This module
knows nothing about models.

Shapes:
  * ``.jsonl`` / ``.ndjson``: one JSON object per line, ``{"positive": "...", "negative": "..."}``
    (other keys ignored, blank lines skipped).
  * ``.csv`` / ``.tsv``: a header row with ``positive`` and ``negative`` columns (any order,
    other columns ignored); one pair per row; quoted fields may span lines.
  * two ``.txt`` files: one text per line (blank lines skipped); counts may differ for
    ``mean_diff`` / ``probe``, ``pca`` needs equal counts (pairs by line order).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import PersonaError

_MAX_TEXT = 20_000  # characters; longer lines are almost surely a wrong file


@dataclass(frozen=True)
class ContrastSet:
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    source: str

    @property
    def paired(self) -> bool:
        return len(self.positive) == len(self.negative)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except FileNotFoundError:
        raise PersonaError(f"{path}: no such contrast file") from None
    except IsADirectoryError:
        raise PersonaError(f"{path}: is a folder, not a contrast file") from None
    except UnicodeDecodeError as exc:
        raise PersonaError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None


def _text(value: object, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise PersonaError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise PersonaError(f"{where}: {key!r} is empty")
    if len(value) > _MAX_TEXT:
        raise PersonaError(f"{where}: {key!r} is {len(value)} characters long (limit {_MAX_TEXT})")
    return value


def _finish(pos: list[str], neg: list[str], source: str) -> ContrastSet:
    if not pos or not neg:
        raise PersonaError(f"{source}: no pairs found; give at least one positive and one negative text")
    return ContrastSet(tuple(pos), tuple(neg), source)


def load_jsonl(path: str | os.PathLike) -> ContrastSet:
    """JSONL of ``{"positive": ..., "negative": ...}`` objects, one per line."""
    path = Path(path)
    pos, neg = [], []
    for n, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PersonaError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise PersonaError(f"{where}: expected an object with 'positive' and 'negative', got {type(row).__name__}")
        missing = [k for k in ("positive", "negative") if k not in row]
        if missing:
            raise PersonaError(f"{where}: missing {' and '.join(repr(k) for k in missing)} "
                               f"(keys present: {', '.join(map(repr, row)) or 'none'})")
        pos.append(_text(row["positive"], where, "positive"))
        neg.append(_text(row["negative"], where, "negative"))
    return _finish(pos, neg, str(path))


def load_csv(path: str | os.PathLike, *, delimiter: str | None = None) -> ContrastSet:
    """CSV (or TSV) with a header row naming ``positive`` and ``negative`` columns."""
    path = Path(path)
    delimiter = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    text = _read(path)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter, strict=True)
    pos, neg = [], []
    try:
        header = next(reader, None)
        if header is None:
            raise PersonaError(f"{path}: empty file; expected a header row 'positive,negative'")
        names = [h.strip().lower() for h in header]
        if "positive" not in names or "negative" not in names:
            raise PersonaError(f"{path}:1: header must name 'positive' and 'negative' columns, got {header}")
        ip, ineg = names.index("positive"), names.index("negative")
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise PersonaError(f"{where}: {len(row)} fields, the header has {len(header)} "
                                   "(unquoted comma or delimiter inside a text? quote the field)")
            pos.append(_text(row[ip], where, "positive"))
            neg.append(_text(row[ineg], where, "negative"))
    except csv.Error as exc:
        raise PersonaError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return _finish(pos, neg, str(path))


def load_lines(path: str | os.PathLike) -> list[str]:
    """One text per line; blank lines skipped."""
    path = Path(path)
    out = []
    for n, line in enumerate(_read(path).splitlines(), start=1):
        if line.strip():
            out.append(_text(line, f"{path}:{n}", "text"))
    if not out:
        raise PersonaError(f"{path}: no texts (one text per line expected)")
    return out


def load_text_pair(positive: str | os.PathLike, negative: str | os.PathLike) -> ContrastSet:
    """Two plain-text files, one text per line: positives and negatives."""
    return _finish(load_lines(positive), load_lines(negative), f"{positive} | {negative}")


def load_contrast(path: str | os.PathLike) -> ContrastSet:
    """Load a JSONL or CSV/TSV contrast file, chosen by extension."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return load_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return load_csv(path)
    if suffix == ".txt":
        raise PersonaError(f"{path}: a plain-text file holds one side only; give two with --positive and --negative")
    raise PersonaError(f"{path}: unknown contrast file type {suffix or '(none)'}: use .jsonl, .csv or .tsv "
                       "(or two .txt files with --positive/--negative, or a persona .toml)")
