"""The HTTP/1.1 connection: httptools callbacks, limits, keep-alive, pipelining, flow control.

The only module that touches a transport. Invariants:
- Answers leave in the order requests arrived, however their commits interleave: each request
  takes a slot in `_slots` and slots are written from the head as they fill.
- Every limit of SPEC 2.6 is enforced here, before bytes are buffered without bound: httptools
  enforces none. A framing error answers, closes, and nothing after it is parsed (so a smuggled
  follow-up request is never run).
- No timer per connection: `_deadline` moves with the connection's state (header deadline while
  a request's head arrives, body deadline, idle keep-alive deadline, none while an answer is
  being prepared) and the server's clock tick calls `check_deadline` on every connection.
- Reading pauses while too many answers are outstanding or the transport's buffer is full.
- No Task, no future and no await per request.
"""
from __future__ import annotations

import asyncio
import socket
from collections import deque

import httptools

from . import http
from .errors import FramingError, HttpError, Unavailable
from .handler import INGEST_PATHS, Deferred, IngestJob, Request

# Header names otserver reads; the rest are counted and dropped.
KEPT_HEADERS = frozenset((b"content-type", b"user-agent", b"referer", b"x-forwarded-for",
                          b"authorization", b"last-event-id"))
HTTP_VERSIONS = ("1.1", "1.0")
FEED_PIECE = 2048  # bytes parsed at a time when a read holds many requests
LINGER_S = 2.0  # after an error answer, how long unread request bytes are drained before close

_IDLE, _HEAD, _BODY, _WAIT, _LINGER, _LIVE = range(6)


class _StopParsing(Exception):
    """Raised in a callback to stop the parser after a request that closes the connection."""


class Slot:
    """One request's place in the answer order."""

    __slots__ = ("data", "close")

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.close = False


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "server", "config", "handler", "writer", "loop", "transport", "parser", "peer",
        "_state", "_deadline", "_slots", "_closing", "_paused_reading", "_paused_writing",
        "_url", "_url_bytes", "_wire_bytes", "_header_bytes", "_header_count", "_headers",
        "_content_length", "_chunked", "_upgrade", "_body", "_body_bytes", "_body_limit",
        "_method", "_path", "_keep_alive", "_messages", "_head_limit", "_live_si",
        "_backlog", "_eof",
    )

    def __init__(self, server) -> None:
        self.server = server
        self.config = server.config
        self.handler = server.handler
        self.writer = server.writer
        self.loop = server.loop
        self.transport = None
        self._slots: deque[Slot] = deque()
        self._closing = False
        self._paused_reading = False
        self._paused_writing = False
        self._deadline: float | None = None
        self._state = _IDLE
        self._messages = 0
        self._path = None
        self._live_si = None
        self._backlog = b""  # input held back while max_pipelined answers are outstanding
        self._eof = False
        self._head_limit = self.config.max_url_bytes + self.config.max_header_bytes

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.parser = httptools.HttpRequestParser(self)
        self.server.connections.add(self)
        self._deadline = self.loop.time() + self.config.header_timeout_s
        self._reset_message()

    def connection_lost(self, exc) -> None:
        self._closing = True
        self.server.connections.discard(self)
        if self._live_si is not None:
            self.server.live.unsubscribe(self._live_si, self)
        self._slots.clear()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._backlog:  # reading is paused; a read already under way still arrives
            self._backlog += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse `data` a piece at a time, and stop (keeping the rest) once max_pipelined
        answers are outstanding: a flood in one read cannot queue more than its share."""
        if len(data) <= FEED_PIECE:
            self._receive(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), FEED_PIECE):
            self._receive(bytes(view[start:start + FEED_PIECE]))
            if self._closing:
                return
            if len(self._slots) >= self.config.max_pipelined and start + FEED_PIECE < len(data):
                self._backlog = bytes(view[start + FEED_PIECE:])
                self._pause_reading()
                return

    def _receive(self, data: bytes) -> None:
        state = self._state
        if self._closing:
            if state == _LINGER:
                self._wire_bytes += len(data)
                if self._wire_bytes > self.config.max_batch_body_bytes:
                    self.transport.close()
            return
        # httptools buffers a header line (or a trailer) whole before calling back, so bytes
        # are bounded here too: a read that began and ended inside one request's head (or
        # body) was all head (body) bytes. A read in which the part starts is not counted, so
        # the bound is a limit plus at most one read, and never a false refusal of pipelining.
        if state == _HEAD or state == _BODY:
            if state == _HEAD and self._wire_bytes > self._head_limit:
                self._fail(FramingError(431, "request header fields too large"))
                return
            if state == _BODY and self._wire_bytes > 2 * self._body_limit + self._head_limit:
                self._fail(FramingError(413, f"body larger than {self._body_limit} bytes"))
                return
            message = self._messages
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, HttpError):
                self._fail(cause)
            elif not isinstance(cause, _StopParsing):
                self._fail(FramingError(500, "internal error"))
                self.server.log_exception("request handling failed", cause)
            return
        except httptools.HttpParserUpgrade:
            self._fail(FramingError(400, "protocol upgrade and CONNECT are not supported"))
            return
        except httptools.HttpParserError as exc:
            self._fail(FramingError(400, f"malformed HTTP request: {_parser_reason(exc)}"))
            return
        if (state == _HEAD or state == _BODY) and self._state == state and self._messages == message:
            self._wire_bytes += len(data)

    def eof_received(self):
        # The client finished sending; answer what was received, then close.
        if self._backlog:
            self._eof = True  # after the held-back requests are parsed and answered
            return True
        if not self._slots:
            return False
        self._slots[-1].close = True  # after the last answer (an error's answer among them)
        return True

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._maybe_resume_reading()

    def check_deadline(self, now: float) -> None:
        """Called by the server's tick: close a connection whose deadline has passed."""
        deadline = self._deadline
        if deadline is not None and now >= deadline and self.transport is not None:
            if self._slots and self._state in (_HEAD, _BODY):
                return  # answers are outstanding: the client is waiting on us, not we on it
            if self._state in (_HEAD, _BODY):
                self.server.count_timeout()
            self._closing = True
            self._deadline = None
            self.transport.close()

    # ------------------------------------------------------------------ httptools callbacks

    def _reset_message(self) -> None:
        self._url = []
        self._url_bytes = 0
        self._wire_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._headers = {}
        self._content_length = None
        self._chunked = False
        self._upgrade = False
        self._body = []
        self._body_bytes = 0
        self._path = None

    def on_message_begin(self) -> None:
        if self._closing:
            raise _StopParsing
        self._messages += 1
        self._state = _HEAD
        self._deadline = self.loop.time() + self.config.header_timeout_s

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self.config.max_url_bytes:
            raise FramingError(414, "request line too long")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.config.max_header_count:
            raise FramingError(431, "too many header fields")
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.config.max_header_bytes:
            raise FramingError(431, "request header fields too large")
        if self._state == _BODY:
            return  # a chunked trailer: counted, never used
        name = name.lower()
        if name == b"content-length":
            if self._content_length is not None:
                raise FramingError(400, "more than one Content-Length")
            if not value.isdigit():
                raise FramingError(400, "bad Content-Length")
            self._content_length = int(value)
        elif name == b"transfer-encoding":
            if self._chunked or value.strip().lower() != b"chunked":
                raise FramingError(400, "unsupported Transfer-Encoding (only chunked)")
            self._chunked = True
        elif name == b"upgrade":
            self._upgrade = True
        elif name in KEPT_HEADERS:
            self._headers[name] = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = b"".join(self._url)
        self._url = url
        path = self._path = url.partition(b"?")[0]
        method = self._method = parser.get_method()
        version = parser.get_http_version()
        if version not in HTTP_VERSIONS:
            raise FramingError(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        if self._upgrade or method == b"CONNECT":
            raise FramingError(400, "protocol upgrade and CONNECT are not supported")
        if self._chunked and self._content_length is not None:
            raise FramingError(400, "Content-Length together with Transfer-Encoding")
        if self._chunked and version == "1.0":
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        self._keep_alive = version == "1.1" and parser.should_keep_alive()
        limit = self._body_limit = (self.config.max_batch_body_bytes if path == b"/batch"
                                    else self.config.max_body_bytes)
        if self._content_length is not None and self._content_length > limit:
            raise FramingError(413, f"body larger than {limit} bytes")
        self._state = _BODY
        self._wire_bytes = 0
        self._deadline = self.loop.time() + self.config.body_timeout_s

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._body_limit:
            raise FramingError(413, f"body larger than {self._body_limit} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        path, _, query = self._url.partition(b"?")
        body = b"".join(self._body) if self._body else b""
        close = not self._keep_alive
        request = Request(self._method, path, query, self._headers, body, self.peer, close)
        self._reset_message()
        self._state = _WAIT
        self._deadline = None
        result = self.handler.handle(request)
        kind = type(result)
        if kind is bytes:
            self.server.count(path, result[9:12], self.peer)
            self._answer(result, close)
        elif kind is IngestJob:
            self._submit(result, close)
        elif kind is Deferred:
            self._defer(result, close, path)
        else:
            self._start_live(result)
            return
        if close:
            self._closing = True  # parse nothing after a request that ends the connection

    # ------------------------------------------------------------------ answers

    def _answer(self, data: bytes, close: bool) -> None:
        if not self._slots:
            self._write(data, close)
            return
        slot = Slot()
        slot.data = data
        slot.close = close
        self._slots.append(slot)

    def _submit(self, job: IngestJob, close: bool) -> None:
        slot = Slot()
        slot.close = close
        if not self.writer.submit(job.values, self._committed, (slot, job)):
            error = Unavailable("overloaded: too many events waiting for a commit",
                                self.config.retry_after_s)
            self.server.count(job.path, b"503", self.peer)
            self._answer(http.error(503, error.reason, cors=True, headers=error.headers,
                                    close=close), close)
            return
        self._slots.append(slot)
        if len(self._slots) >= self.config.max_pipelined:
            self._pause_reading()

    def _defer(self, job: Deferred, close: bool, path: bytes) -> None:
        slot = Slot()
        slot.close = close
        self._slots.append(slot)

        def done(data: bytes) -> None:
            if slot.close:
                data = data.replace(b"\r\n\r\n", b"\r\n" + http.CLOSE + b"\r\n", 1)
            slot.data = data
            self.server.count(path, data[9:12], self.peer)
            if self.transport is not None:
                # An answer ready at once is written after the parser returns, never from
                # inside its callback (flushing may feed the parser held-back input).
                self.loop.call_soon(self._flush_if_open)

        job.start(done)

    def _flush_if_open(self) -> None:
        if self.transport is not None:
            self._flush()

    def _committed(self, arg, error, position: int) -> None:
        slot, job = arg
        if error is None:
            slot.data = job.answer(slot.close)
            self.server.count(job.path, b"200", self.peer)
        else:
            self.server.count(job.path, b"503", self.peer)
            retry = self.config.retry_after_s
            slot.data = http.error(503, f"storage unavailable: {error}", cors=True,
                                   headers=(("Retry-After", str(retry)),), close=slot.close)
        if self.transport is not None:
            self._flush()

    def _flush(self) -> None:
        slots = self._slots
        out = []
        close = False
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            out.append(slot.data)
            if slot.close:
                close = True
                break
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0], close)
        if close:
            slots.clear()
            self._backlog = b""
        elif len(slots) < self.config.max_pipelined:
            if self._backlog:
                backlog, self._backlog = self._backlog, b""
                self._feed(backlog)
                if self._backlog or self._closing:
                    return
                if self._eof:
                    self._eof = False
                    if self._slots:
                        self._slots[-1].close = True
                    else:
                        self._closing = True
                        self.transport.close()
                    return
            if self._state == _HEAD and self._paused_reading:
                # The client waited on us, not we on it: its head gets a fresh deadline.
                self._deadline = self.loop.time() + self.config.header_timeout_s
            self._maybe_resume_reading()

    def _write(self, data: bytes, close: bool) -> None:
        transport = self.transport
        transport.write(data)
        if close:
            self._closing = True
            if self._state == _LINGER and transport.can_write_eof():
                # Unread request bytes would make the kernel reset the connection and the
                # client could lose this answer: half-close, drain for a moment, then close.
                transport.write_eof()
                self._deadline = self.loop.time() + LINGER_S
                self._paused_writing = False
                self._maybe_resume_reading(force=True)
            else:
                transport.close()
        elif not self._slots and self._state == _WAIT:
            self._state = _IDLE
            self._deadline = self.loop.time() + self.config.keepalive_s

    # ------------------------------------------------------------------ live streams

    def _start_live(self, stream) -> None:
        """Turn this connection into a Server-Sent Events stream of one site's events."""
        self._closing = True  # no further requests on this connection
        self._state = _LIVE
        # Bound the kernel's send buffer too, so a stalled reader's backlog shows up in the
        # transport's buffer (which live_backlog measures) instead of hiding in the kernel.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                max(4096, min(self.config.live_buffer_bytes // 4, 1 << 20)))
            except OSError:
                pass
        self._deadline = None
        self._live_si = stream.si
        self._answer(http.SSE_HEAD + http.date_line() + b"\r\n: live\n\n", False)
        self.server.live.subscribe(stream.si, self, stream.last_id)

    def live_backlog(self) -> int:
        """Bytes owed to this subscriber and not yet sent."""
        if self.transport is None:
            return 0
        return self.transport.get_write_buffer_size() + sum(
            len(slot.data) for slot in self._slots if slot.data is not None)

    def push_live(self, data: bytes) -> None:
        if self.transport is not None:
            self._answer(data, False)

    def close_live(self) -> None:
        if self._live_si is not None:
            self.server.live.unsubscribe(self._live_si, self)
        if self.transport is not None:
            self.transport.abort()  # its buffer is what overflowed: drop it, do not drain it

    def _fail(self, error: HttpError) -> None:
        """Answer a request that cannot be parsed further, after those before it, and close."""
        self._closing = True
        self._state = _LINGER
        self._wire_bytes = 0
        self._deadline = None
        self.server.count(self._path or b"?", str(error.status).encode(), self.peer)
        path = self._path
        if path is None and self._url:  # refused before the head was complete
            url = b"".join(self._url) if type(self._url) is list else self._url
            path = url.partition(b"?")[0]
        cors = not path or path in INGEST_PATHS or not path.startswith(b"/api/")
        self._answer(http.error(error.status, error.reason, cors=cors, headers=error.headers,
                                close=True), True)

    # ------------------------------------------------------------------ flow control

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self, force: bool = False) -> None:
        if self._paused_reading and not self._paused_writing and (force or not self._closing):
            self._paused_reading = False
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """Drain: answer what is in flight, then close; close idle connections now."""
        if self.transport is None:
            return
        if self._state == _LIVE:
            self.transport.close()
        elif not self._slots and self._state in (_IDLE, _HEAD):
            self._closing = True
            self.transport.close()
        elif self._slots:
            self._slots[-1].close = True
            self._closing = True


def _parser_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.encode("ascii", "backslashreplace").decode("ascii")[:100]
