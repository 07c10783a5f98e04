"""Every status the code answers with has a status line: an answer type without one raised a
KeyError inside a callback and left its request unanswered (a slow erasure's 202 did)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from otserver import http

PACKAGE = Path(http.__file__).resolve().parent
# _json(202, ...), http.error(503, ...), render(200, ...), HttpError(403, ...), FramingError(431, ...)
ANSWERED = re.compile(r"\b(?:_json|error|render|HttpError|FramingError)\((\d{3})\b")


def statuses_in_the_code() -> set[int]:
    found = set()
    for path in PACKAGE.glob("*.py"):
        found |= {int(code) for code in ANSWERED.findall(path.read_text())}
    return found


def test_the_scan_finds_the_statuses_otserver_answers_with():
    assert {200, 202, 204, 400, 401, 403, 404, 405, 413, 431, 500, 503} <= statuses_in_the_code()


@pytest.mark.parametrize("status", sorted(statuses_in_the_code()))
def test_every_answered_status_renders_with_its_reason(status):
    answer = http.render(status, b"x")
    assert answer.startswith(f"HTTP/1.1 {status} {http.REASONS[status]}\r\n".encode())
