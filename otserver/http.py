"""HTTP answers as bytes, built from parts prepared at import. Pure: no I/O.

Every answer carries a Date header (cached, rebuilt once a second), Content-Length and
`X-Content-Type-Options: nosniff`; ingest answers add CORS and `Cache-Control: no-store`.
"""
from __future__ import annotations

import time
from email.utils import formatdate

REASONS = {
    200: "OK", 202: "Accepted", 204: "No Content", 304: "Not Modified", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    422: "Unprocessable Content", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in REASONS.items()}

TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"
NDJSON = b"application/x-ndjson"
GIF = b"image/gif"
# A 1x1 transparent GIF (43 bytes).
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00"
         b"\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")

CORS_HEADERS = (b"Access-Control-Allow-Origin: *\r\n"
                b"Access-Control-Expose-Headers: X-Eid, Retry-After\r\n"
                b"Cache-Control: no-store\r\n")
PREFLIGHT_HEADERS = (("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                     ("Access-Control-Allow-Headers", "Content-Type, Idempotency-Key"),
                     ("Access-Control-Max-Age", "86400"))
COMMON_HEADERS = b"X-Content-Type-Options: nosniff\r\n"
CLOSE = b"Connection: close\r\n"

# The head of a Server-Sent Events answer, up to its Date line (close-delimited body).
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n"
            b"X-Accel-Buffering: no\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n")

_date_second = -1
_date_line = b""


def date_line() -> bytes:
    """`Date: ...\\r\\n` for the current second, built once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


def render(status: int, body: bytes = b"", *, content_type: bytes = TEXT,
           cors: bool | bytes = False, headers: tuple = (), close: bool = False,
           head: bool = False) -> bytes:
    """One whole answer. `headers` are (name, value) text pairs; values must be clean.
    `cors`: True for the usual CORS block (any origin), or a block of its own (one origin)."""
    parts = [STATUS_LINES[status], date_line(), COMMON_HEADERS]
    if cors:
        parts.append(CORS_HEADERS if cors is True else cors)
    for name, value in headers:
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    bodiless = status in (204, 304)
    if not bodiless:
        parts.append(b"Content-Type: " + content_type + b"\r\nContent-Length: %d\r\n" % len(body))
    if close:
        parts.append(CLOSE)
    parts.append(b"\r\n")
    if not head and not bodiless:
        parts.append(body)
    return b"".join(parts)


_OK_TEXT_LENGTH = b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 36\r\n"
_OK_TEXT_HEAD = (b"HTTP/1.1 200 OK\r\n", COMMON_HEADERS + CORS_HEADERS + _OK_TEXT_LENGTH)


def ok_eid(eid: str, close: bool, cors: bytes | None = None) -> bytes:
    """The ingest answer on the hot path: 200, the eid as the body (`cors`: the CORS block
    for one allowed origin instead of the usual one)."""
    if cors is not None:
        return b"".join((_OK_TEXT_HEAD[0], date_line(), COMMON_HEADERS, cors, _OK_TEXT_LENGTH,
                         CLOSE if close else b"", b"\r\n", eid.encode()))
    return b"".join((_OK_TEXT_HEAD[0], date_line(), _OK_TEXT_HEAD[1],
                     CLOSE if close else b"", b"\r\n", eid.encode()))


def ok_pixel(eid: str, close: bool, cors: bytes | None = None) -> bytes:
    return render(200, PIXEL, content_type=GIF, cors=cors or True, headers=(("X-Eid", eid),),
                  close=close)


def ok_batch(eids: list[str], close: bool, cors: bytes | None = None) -> bytes:
    return render(200, ("\n".join(eids) + "\n").encode(), cors=cors or True, close=close)


def preflight(close: bool, cors: bytes | None = None) -> bytes:
    return render(204, cors=cors or True, headers=PREFLIGHT_HEADERS, close=close)


def error(status: int, reason: str, *, cors: bool = False, headers: tuple = (),
          close: bool = False, head: bool = False) -> bytes:
    return render(status, (reason + "\n").encode(), cors=cors, headers=headers, close=close,
                  head=head)
