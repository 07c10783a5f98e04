"""A site's events as CSV (RFC 4180): the columns of a set of events, a header, rows. Pure: no
I/O; the caller hands in payloads as `api.event_payload` makes them, `{"event": {...record},
"captured": {...}}`, and writes the bytes it gets back.

- Columns: FIXED first (every record has them), then the other property names in the order
  they first appear, then the captured fields as `captured.NAME`, in first-appearance order.
  A column `captured.NAME` always reads the captured field, never a property of that name (a
  tracking client cannot forge the `captured.ip` of an event stored without one); a property
  whose name starts with `captured.` is therefore not in the CSV (NDJSON keeps it).
- Bytes: UTF-8 without a BOM, records ending in CRLF, a cell quoted (by the csv module) when it
  holds a comma, a quote, CR or LF; a missing value is an empty cell; a boolean is `true` or
  `false`, as in the JSON.
- Formula injection (OWASP "CSV Injection"): a cell whose text starts with `=`, `+`, `-`, `@`,
  a tab or CR gets a leading `'`, so a spreadsheet shows it as text instead of running it.
  This holds for every cell, header names too, and for numbers as well (`-5` becomes `'-5`):
  OWASP's recommendation, since a cell cannot tell a number from the start of a formula.
"""
from __future__ import annotations

import csv
import io

FIXED = ("unixtimestamp", "eid", "si", "sid", "uid")
CAPTURED = "captured."
MAX_COLUMNS = 256
MAX_NAME_CHARS = 128
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def check_columns(names) -> list[str]:
    """The column names a user asked for, as a list; ValueError naming the first bad one. A
    name is 1..128 printable ASCII characters (0x21-0x7E, as a property name), given once;
    at most 256 columns."""
    names = list(names)
    if not names:
        raise ValueError("no columns given")
    if len(names) > MAX_COLUMNS:
        raise ValueError(f"too many columns: {len(names)} (at most {MAX_COLUMNS})")
    seen = set()
    for number, name in enumerate(names, 1):
        if not isinstance(name, str) or not name:
            raise ValueError(f"column {number} is empty")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(f"column {name[:40]!r}...: longer than {MAX_NAME_CHARS} characters")
        if not all("!" <= c <= "~" for c in name):
            raise ValueError(f"column {name!r}: printable ASCII characters, no spaces")
        if name == CAPTURED:
            raise ValueError(f"column {name!r}: name the captured field (captured.ip)")
        if name in seen:
            raise ValueError(f"column {name!r} is given twice")
        seen.add(name)
    return names


def parse_columns(text: str | None) -> list[str] | None:
    """The `columns=` parameter (`--columns` flag): comma-separated names, checked; None when
    absent or empty (every column)."""
    if not text:
        return None
    return check_columns(text.split(","))


def columns_for(payloads, wanted: list[str] | None = None) -> list[str]:
    """The columns of a CSV of these payloads (any iterable, read once): with `wanted`, those
    names, checked (ValueError names a bad one); else FIXED, the other properties, the
    captured fields, each in order of first appearance."""
    if wanted is not None:
        return check_columns(wanted)
    props = dict.fromkeys(FIXED)
    captured: dict = {}
    for payload in payloads:
        for name in payload["event"]:
            if name not in props and not name.startswith(CAPTURED):
                props[name] = None
        for name in payload.get("captured") or ():
            if name not in captured:
                captured[name] = None
    return [*props, *(CAPTURED + name for name in captured)]


def _cell(value) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"  # as in the JSON (captured "bot": true)
    text = value if isinstance(value, str) else str(value)
    if text.startswith(FORMULA_LEADS):
        return "'" + text
    return text


def _writer():
    buffer = io.StringIO()
    return buffer, csv.writer(buffer, lineterminator="\r\n")


def csv_header(columns) -> bytes:
    """The header record of these columns."""
    buffer, writer = _writer()
    writer.writerow([_cell(name) for name in columns])
    return buffer.getvalue().encode("utf-8")


def csv_rows(payloads, columns) -> bytes:
    """One record per payload, its cells in the order of `columns`."""
    lookups = [(True, name[len(CAPTURED):]) if name.startswith(CAPTURED) else (False, name)
               for name in columns]
    buffer, writer = _writer()
    for payload in payloads:
        record = payload["event"]
        captured = payload.get("captured") or {}
        writer.writerow([_cell((captured if from_captured else record).get(name))
                         for from_captured, name in lookups])
    return buffer.getvalue().encode("utf-8")
