"""Files otserver serves from the package: `GET /ot.js`, and the dashboard (`GET /dashboard`
is `static/dashboard/index.html`, `GET /dashboard/NAME` the other files of that folder). Read
once at import, with their ETag and a gzip copy, so an answer costs no disk read and no
compression. Pure: no I/O after import.
"""
from __future__ import annotations

import gzip
import hashlib
from importlib import resources

from . import http

JAVASCRIPT = b"application/javascript; charset=utf-8"
TYPES = {".js": JAVASCRIPT, ".html": b"text/html; charset=utf-8", ".css": b"text/css; charset=utf-8",
         ".svg": b"image/svg+xml", ".png": b"image/png", ".txt": b"text/plain; charset=utf-8"}
MAX_AGE_S = 3600  # a site's pages pick up a new ot.js within the hour


class Asset:
    __slots__ = ("body", "gzipped", "etag", "content_type")

    def __init__(self, body: bytes, content_type: bytes):
        self.body = body
        self.gzipped = gzip.compress(body, compresslevel=9, mtime=0)
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        self.content_type = content_type

    def answer(self, headers: dict, head: bool, close: bool) -> bytes:
        """200 (gzip when the client accepts it), or 304 when If-None-Match holds our ETag."""
        common = (("ETag", self.etag), ("Cache-Control", f"public, max-age={MAX_AGE_S}"),
                  ("Vary", "Accept-Encoding"), ("Access-Control-Allow-Origin", "*"))
        match = headers.get(b"if-none-match", b"").decode("latin-1")
        if match and (match.strip() == "*" or self.etag in (t.strip().removeprefix("W/")
                                                            for t in match.split(","))):
            return http.render(304, headers=common, close=close)
        if _accepts_gzip(headers.get(b"accept-encoding", b"")):
            return http.render(200, self.gzipped, content_type=self.content_type,
                               headers=common + (("Content-Encoding", "gzip"),),
                               close=close, head=head)
        return http.render(200, self.body, content_type=self.content_type, headers=common,
                           close=close, head=head)


def _accepts_gzip(value: bytes) -> bool:
    for part in value.lower().split(b","):
        coding, _, params = part.strip().partition(b";")
        if coding.strip() in (b"gzip", b"*"):
            q = params.strip()
            return not q.startswith(b"q=") or q[2:].strip() not in (b"0", b"0.0", b"0.00", b"0.000")
    return False


def _load(path) -> Asset:
    return Asset(path.read_bytes(), TYPES.get("." + path.name.rpartition(".")[2],
                                              b"application/octet-stream"))


def _assets() -> dict[bytes, Asset]:
    static = resources.files(__package__).joinpath("static")
    assets = {b"/ot.js": _load(static.joinpath("ot.js"))}
    dashboard = static.joinpath("dashboard")
    if dashboard.is_dir():
        for path in dashboard.iterdir():
            if path.is_file():
                name = "" if path.name == "index.html" else "/" + path.name
                assets[("/dashboard" + name).encode()] = _load(path)
    return assets


ASSETS = _assets()
