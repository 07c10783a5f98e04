"""Errors that carry the HTTP answer they deserve.

The status travels with the error (after h11's `error_status_hint`), so the code that detects a
problem decides the answer and the protocol only renders it. `close` says whether the connection
can no longer be trusted (a framing problem) and must be closed after the answer.
"""
from __future__ import annotations


class HttpError(Exception):
    __slots__ = ("status", "reason", "close", "headers")

    def __init__(self, status: int, reason: str, *, close: bool = False, headers: tuple = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.close = close
        self.headers = headers


class BadRequest(HttpError):
    """400: the request (or one property of it) is not acceptable. Nothing is stored."""

    def __init__(self, reason: str, *, close: bool = False):
        super().__init__(400, reason, close=close)


class FramingError(HttpError):
    """The byte stream itself is unusable (smuggling shapes, limits): answer and close."""

    def __init__(self, status: int, reason: str):
        super().__init__(status, reason, close=True)


class Unavailable(HttpError):
    """503: overloaded or the store cannot take writes now. Nothing is stored."""

    def __init__(self, reason: str, retry_after_s: int):
        super().__init__(503, reason, headers=(("Retry-After", str(retry_after_s)),))


class StoreFull(Exception):
    """The store reached its configured cap (or the disk is full)."""


class StoreFailed(Exception):
    """A write transaction failed for a reason other than space."""


class PortInUse(ValueError):
    """The listening port is held by someone else (not by this supervisor's workers)."""

    def __init__(self, host: str, port: int):
        super().__init__(f"port {port} on {host} is already in use (another otserver, or "
                         "another program, listens there): stop it or choose another --port")
