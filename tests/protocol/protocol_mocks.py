"""A fake transport, loop and writer to drive `HttpProtocol` byte by byte with a clock the test
moves (the shape of uvicorn's MockTransport/MockLoop): no sockets, no sleeping."""
from __future__ import annotations

import logging
from collections import Counter

import pytest

from otserver import http
from otserver.config import Config
from otserver.handler import Handler
from otserver.live import LiveHub
from otserver.metrics import Metrics
from otserver.protocol import Context, HttpProtocol

DATE = b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"


class MockTransport:
    def __init__(self, peer: str = "203.0.113.7"):
        self.peer = peer
        self.buffer = bytearray()
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading = True
        self.protocol = None

    def get_extra_info(self, name, default=None):
        return {"peername": (self.peer, 40000)}.get(name, default)

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        assert not self.eof_written, "written after write_eof"
        self.buffer += data

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0


class MockLoop:
    """time() is what the test says; call_soon runs when the test says."""

    def __init__(self):
        self.now = 1000.0
        self.soon: list = []

    def time(self) -> float:
        return self.now

    def call_soon(self, fn, *args):
        self.soon.append((fn, args))

    def call_later(self, delay, fn, *args):
        return None  # the hub's poll timer: not started in these tests

    def run_soon(self) -> None:
        while self.soon:
            fn, args = self.soon.pop(0)
            fn(*args)


class MockWriter:
    """Holds submitted jobs until the test commits them (or refuses them when full)."""

    def __init__(self):
        self.jobs: list = []
        self.full = False
        self.position = 0

    def submit(self, values, callback, arg, units=None) -> bool:
        if self.full:
            return False
        self.jobs.append((values, callback, arg))
        return True

    def commit(self, error: str | None = None) -> None:
        jobs, self.jobs = self.jobs, []
        for values, callback, arg in jobs:
            self.position += len(values)
            callback(arg, error, self.position, None)


class CountingEids:
    """Eids 00000000-0000-7000-8000-000000000001, ...2, ...: answers are exact bytes."""

    def __init__(self):
        self.n = 0

    def next(self, now_ms: int):
        self.n += 1
        text = f"00000000-0000-7000-8000-{self.n:012x}"
        return text, bytes.fromhex(text.replace("-", "")), now_ms


class NoLog:
    def last_position(self) -> int:
        return 0

    def read(self):
        raise AssertionError("the live hub reads no log in these tests")


class Harness:
    """One connection of a protocol over a MockTransport, with its context."""

    def __init__(self, config: Config | None = None, api=None, peer: str = "203.0.113.7"):
        self.config = config or Config()
        self.loop = MockLoop()
        self.writer = MockWriter()
        self.metrics = Metrics()
        self.live = LiveHub(NoLog(), self.loop, self.config.live_buffer_bytes)
        self.handler = Handler(self.config, api, CountingEids())
        self.connections: set = set()
        self.context = Context(self.config, self.handler, self.writer, self.loop, self.metrics,
                               self.live, self.connections, clock=self.loop.time)
        self.protocol = HttpProtocol(self.context)
        self.transport = MockTransport(peer)
        self.protocol.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)
        self.loop.run_soon()

    def tick(self, seconds: float) -> None:
        """Let `seconds` pass and run the server's deadline check."""
        self.loop.now += seconds
        for connection in list(self.connections):
            connection.check_deadline(self.loop.now)

    def statuses(self) -> Counter:
        return self.metrics.requests


def ok_eid(n: int, close: bool = False) -> bytes:
    """The exact bytes of the n-th ingest answer."""
    return (b"HTTP/1.1 200 OK\r\n" + DATE + b"X-Content-Type-Options: nosniff\r\n"
            b"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: X-Eid, Retry-After\r\n"
            b"Cache-Control: no-store\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 36\r\n"
            + (http.CLOSE if close else b"") + b"\r\n"
            + f"00000000-0000-7000-8000-{n:012x}".encode())


def error(status: int, reason: str, *, cors: bool = True, close: bool = True,
          headers: bytes = b"") -> bytes:
    body = (reason + "\n").encode()
    return (http.STATUS_LINES[status] + DATE + b"X-Content-Type-Options: nosniff\r\n"
            + (b"Access-Control-Allow-Origin: *\r\nAccess-Control-Expose-Headers: X-Eid, Retry-After\r\n"
            b"Cache-Control: no-store\r\n" if cors else b"")
            + headers + b"Content-Type: text/plain; charset=utf-8\r\n"
            + b"Content-Length: %d\r\n" % len(body) + (http.CLOSE if close else b"")
            + b"\r\n" + body)


logging.getLogger("otserver").setLevel(logging.INFO)


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    """Every answer's Date line is DATE, so answers compare as exact bytes (a test module
    imports this fixture to use it)."""
    monkeypatch.setattr(http, "date_line", lambda: DATE)
