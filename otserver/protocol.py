"""The HTTP/1.1 connection: httptools callbacks, limits, keep-alive, pipelining, flow control.

The only module that parses a transport's bytes. Invariants:
- A connection sees a narrow `Context` (config, handler, writer, loop, metrics, live, the set
  of open connections), never the server.
- Its state and its deadline change in one place, `_to(event)`, driven by `TRANSITIONS` and
  `DEADLINES` (the shape of h11's `_state.py`): a fresh connection waits for a request head
  under the header timeout, a head under the header timeout, a body under the body timeout, an
  idle kept-alive connection under the keep-alive timeout; while answers are owed (WAIT) the
  client waits on us, so there is no deadline. The server's clock tick calls `check_deadline`.
- Answers leave in the order requests arrived, however their commits interleave: each request
  takes a slot in `_slots` and slots are written from the head as they fill.
- Every limit of SPEC 2.6 is enforced here, before bytes are buffered without bound: httptools
  enforces none. A framing error answers, closes, and nothing after it is parsed (so a smuggled
  follow-up request is never run).
- Reading pauses while too many answers are outstanding or the transport's buffer is full.
- A live stream (SSE) is handed over to its own protocol (`live.LiveConnection`) with
  `transport.set_protocol` once the answers before it have left.
- No Task, no future and no await per request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import httptools

from . import http
from .errors import FramingError, HttpError
from .handler import INGEST_PATHS, OVERLOADED, Deferred, IngestJob, LiveStream, Request
from .live import LiveConnection

log = logging.getLogger("otserver")

# Header names otserver reads; the rest are counted and dropped.
KEPT_HEADERS = frozenset((b"content-type", b"user-agent", b"referer", b"x-forwarded-for",
                          b"authorization", b"last-event-id", b"accept-encoding",
                          b"if-none-match", b"idempotency-key", b"origin"))
HTTP_VERSIONS = ("1.1", "1.0")
FEED_PIECE = 2048  # bytes parsed at a time when a read holds many requests
LINGER_S = 2.0  # after an error answer, how long unread request bytes are drained before close
# Chunked framing (sizes, extensions, CRLFs) allowed per byte of body, plus a fixed slack: a
# body sent as 1-byte chunks costs 5 bytes of framing per byte, and is accepted; a trickle of
# chunk extensions carrying no body is not.
FRAMING_PER_BODY_BYTE = 16
FRAMING_SLACK = 4096

# Connection states. FAILED: a framing error is answered after the answers owed before it;
# LINGER: that answer is written and the connection half-closed, unread bytes are drained.
OPEN, IDLE, HEAD, BODY, WAIT, FAILED, LINGER, CLOSED = range(8)
STATE_NAMES = ("OPEN", "IDLE", "HEAD", "BODY", "WAIT", "FAILED", "LINGER", "CLOSED")
# What happens to a connection.
BEGIN, HEADERS, COMPLETE, ANSWERED, RESUMED, FAIL, CLOSE = range(7)

TRANSITIONS = {
    (OPEN, BEGIN): HEAD,
    (IDLE, BEGIN): HEAD,
    (WAIT, BEGIN): HEAD,        # pipelining: the next head arrives while answers are owed
    (HEAD, HEADERS): BODY,
    (BODY, COMPLETE): WAIT,
    (WAIT, ANSWERED): IDLE,     # every answer written: the connection idles, kept alive
    (HEAD, RESUMED): HEAD,      # reading resumed after we paused it: a fresh head deadline
    (FAILED, ANSWERED): LINGER,  # the error's answer is written: drain for a moment
}
for _state in range(8):
    TRANSITIONS[(_state, FAIL)] = FAILED  # whatever happened: answer it, then close
    TRANSITIONS[(_state, CLOSE)] = CLOSED
# The same table as lists, NEXT[state][event] (None: impossible), for the per-request path.
NEXT = [[TRANSITIONS.get((state, event)) for event in range(7)] for state in range(8)]


def deadlines(config) -> tuple:
    """Seconds a connection may stay in each state, by state (None: no deadline)."""
    by_state = {OPEN: config.header_timeout_s, IDLE: config.keepalive_s,
                HEAD: config.header_timeout_s, BODY: config.body_timeout_s, WAIT: None,
                FAILED: None, LINGER: LINGER_S, CLOSED: None}
    return tuple(by_state[state] for state in range(8))


class Context:
    """What a connection may use: nothing else of the server."""

    __slots__ = ("config", "handler", "writer", "loop", "metrics", "live", "connections",
                 "deadlines", "clock")

    def __init__(self, config, handler, writer, loop, metrics, live, connections: set, *,
                 clock=time.perf_counter):
        self.config = config
        self.handler = handler
        self.writer = writer
        self.loop = loop
        self.metrics = metrics
        self.live = live
        self.connections = connections
        self.deadlines = deadlines(config)
        self.clock = clock  # precise time for the access log (the loop's time is per turn)


class _StopParsing(Exception):
    """Raised in a callback to stop the parser after a request that closes the connection."""


class Slot:
    """One request's place in the answer order, and what its access log line needs."""

    __slots__ = ("data", "close", "method", "path", "headers", "started", "live")

    def __init__(self, method: bytes, path: bytes, headers: dict, started: float,
                 close: bool) -> None:
        self.data: bytes | None = None
        self.close = close
        self.method = method
        self.path = path
        self.headers = headers
        self.started = started
        self.live: LiveStream | None = None


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "ctx", "config", "handler", "writer", "loop", "transport", "parser", "peer",
        "_state", "_deadline", "_slots", "_closing", "_paused_reading", "_paused_writing",
        "_url", "_url_bytes", "_wire_bytes", "_header_bytes", "_header_count", "_headers",
        "_hosts", "_content_length", "_chunked", "_upgrade", "_body", "_body_bytes",
        "_body_limit", "_method", "_path", "_keep_alive", "_messages", "_head_limit",
        "_backlog", "_eof", "_started", "_access_log", "_deadlines",
    )

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.handler = ctx.handler
        self.writer = ctx.writer
        self.loop = ctx.loop
        self.transport = None
        self._slots: deque[Slot] = deque()
        self._closing = False
        self._paused_reading = False
        self._paused_writing = False
        self._state = OPEN
        self._deadline: float | None = None
        self._messages = 0
        self._path = None
        self._method = b""
        self._started = 0.0
        self._backlog = b""  # input held back while max_pipelined answers are outstanding
        self._eof = False
        self._head_limit = self.config.max_url_bytes + self.config.max_header_bytes
        self._access_log = self.config.access_log
        self._deadlines = ctx.deadlines

    # ------------------------------------------------------------------ state and deadline

    def _to(self, event: int) -> None:
        """The one place a connection's state and deadline change."""
        state = NEXT[self._state][event]
        if state is None:
            raise RuntimeError(f"no transition from {STATE_NAMES[self._state]} on event {event}")
        self._state = state
        timeout = self._deadlines[state]
        self._deadline = None if timeout is None else self.loop.time() + timeout

    def check_deadline(self, now: float) -> None:
        """Called by the server's tick: close a connection whose deadline has passed."""
        deadline = self._deadline
        if deadline is not None and now >= deadline and self.transport is not None:
            state = self._state
            if state in (HEAD, BODY):
                if self._slots:
                    return  # answers are outstanding: the client is waiting on us
                self.ctx.metrics.timed_out()
            self._closing = True
            self._to(CLOSE)
            self.transport.close()

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.parser = httptools.HttpRequestParser(self)
        self.ctx.connections.add(self)
        self._deadline = self.loop.time() + self._deadlines[OPEN]  # the state it starts in
        self._reset_message()

    def connection_lost(self, exc) -> None:
        self._closing = True
        self.ctx.connections.discard(self)
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
            if state == FAILED or state == LINGER:
                self._wire_bytes += len(data)
                if self._wire_bytes > self.config.max_batch_body_bytes:
                    self.transport.close()
            return
        # httptools buffers a header line (or a trailer) whole before calling back, so bytes
        # are bounded here too: a read that began and ended inside one request's head (or
        # body) was all head (body) bytes. A read in which the part starts is not counted, so
        # the bound is a limit plus at most one read, and never a false refusal of pipelining.
        # The body's own size is bounded in on_body; here only its framing, on its own terms.
        if state == HEAD or state == BODY:
            if state == HEAD and self._wire_bytes > self._head_limit:
                self._fail(FramingError(431, "request header fields too large"))
                return
            if state == BODY and self._wire_bytes - self._body_bytes > (
                    FRAMING_PER_BODY_BYTE * self._body_bytes + FRAMING_SLACK):
                self._fail(FramingError(400, "too much chunked framing for the body it carries "
                                             f"(more than {FRAMING_PER_BODY_BYTE} bytes of "
                                             "chunk sizes and extensions per body byte)"))
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
                log.error("request handling failed: %r", cause, exc_info=cause)
            return
        except httptools.HttpParserUpgrade:
            self._fail(FramingError(400, "protocol upgrade and CONNECT are not supported"))
            return
        except httptools.HttpParserInvalidURLError as exc:
            self._fail(FramingError(400, _bad_target_reason(exc, data)))
            return
        except httptools.HttpParserError as exc:
            self._fail(FramingError(400, f"malformed HTTP request: {_parser_reason(exc)}"))
            return
        if (state == HEAD or state == BODY) and self._state == state and self._messages == message:
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

    # ------------------------------------------------------------------ httptools callbacks

    def _reset_message(self) -> None:
        self._url = []
        self._url_bytes = 0
        self._wire_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._headers = {}
        self._hosts = 0
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
        self._to(BEGIN)
        if self._access_log:
            self._started = self.ctx.clock()

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
        if self._state == BODY:
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
        elif name == b"host":
            self._hosts += 1
            if self._hosts > 1:
                raise FramingError(400, "more than one Host header")
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
        if version == "1.1" and not self._hosts:
            raise FramingError(400, "an HTTP/1.1 request needs a Host header")
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
        self._to(HEADERS)
        self._wire_bytes = 0

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._body_limit:
            raise FramingError(413, f"body larger than {self._body_limit} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        path, _, query = self._url.partition(b"?")
        body = b"".join(self._body) if self._body else b""
        close = not self._keep_alive
        method, headers = self._method, self._headers
        request = Request(method, path, query, headers, body, self.peer, close)
        self._reset_message()
        self._to(COMPLETE)
        result = self.handler.handle(request)
        kind = type(result)
        if kind is bytes:
            if self._access_log or self._slots:
                slot = Slot(method, path, headers, self._started, close)
                slot.data = result
                self._queue(slot)
            else:  # the hot path of an answer ready at once: no slot
                self.ctx.metrics.answered(path, result[9:12])
                self._write(result, close)
        else:
            slot = Slot(method, path, headers, self._started, close)
            if kind is IngestJob:
                self._submit(slot, result)
            elif kind is Deferred:
                self._defer(slot, result)
            elif kind is LiveStream:
                self._live(slot, result)
                return
            else:
                raise TypeError(f"the handler answered with a {kind.__name__}")
        if close:
            self._closing = True  # parse nothing after a request that ends the connection

    # ------------------------------------------------------------------ answers

    def _queue(self, slot: Slot) -> None:
        """A slot whose answer is ready: written now if nothing is owed before it."""
        self._slots.append(slot)
        if len(self._slots) == 1:
            self._flush()

    def _submit(self, slot: Slot, job: IngestJob) -> None:
        if not self.writer.submit(job.values, self._committed, (slot, job), job.units):
            slot.data = self.handler.answer(job, OVERLOADED, slot.close)
            self._queue(slot)
            return
        self._slots.append(slot)
        if len(self._slots) >= self.config.max_pipelined:
            self._pause_reading()

    def _committed(self, arg, error, position: int, replaced: dict | None) -> None:
        slot, job = arg
        slot.data = self.handler.answer(job, error, slot.close, replaced)
        if self.transport is not None:
            self._flush()

    def _defer(self, slot: Slot, job: Deferred) -> None:
        self._slots.append(slot)

        def done(data: bytes) -> None:
            slot.data = data
            if self.transport is not None:
                # An answer ready at once is written after the parser returns, never from
                # inside its callback (flushing may feed the parser held-back input).
                self.loop.call_soon(self._flush_if_open)

        job.start(done)

    def _flush_if_open(self) -> None:
        if self.transport is not None:
            self._flush()

    def _live(self, slot: Slot, stream: LiveStream) -> None:
        """Answer with an event stream once the answers before it have left."""
        self._closing = True  # no further requests on this connection
        slot.live = stream
        slot.data = http.SSE_HEAD + http.date_line() + b"\r\n: live\n\n"
        self._queue(slot)

    def _flush(self) -> None:
        slots = self._slots
        out = []
        close = False
        live = None
        while slots and slots[0].data is not None:
            slot = slots.popleft()
            out.append(slot.data)
            self._answered(slot)
            if slot.live is not None:
                live = slot.live
                break
            if slot.close:
                close = True
                break
        if out:
            self._write(b"".join(out) if len(out) > 1 else out[0], close)
        if live is not None:
            self._hand_over(live)
            return
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
            if self._state == HEAD and self._paused_reading:
                self._to(RESUMED)  # the client waited on us, not we on it
            self._maybe_resume_reading()

    def _answered(self, slot: Slot) -> None:
        data = slot.data
        status = data[9:12]
        self.ctx.metrics.answered(slot.path, status)
        if self._access_log:
            client = self.handler.client_address(self.peer, slot.headers) or "-"
            log.info("access %s %s %s %s %d %.2fms", client, escape(slot.method, 16),
                     escape(slot.path), status.decode(), len(data),
                     (self.ctx.clock() - slot.started) * 1000)

    def _write(self, data: bytes, close: bool) -> None:
        transport = self.transport
        transport.write(data)
        if close:
            self._closing = True
            if self._state == FAILED and transport.can_write_eof():
                # Unread request bytes would make the kernel reset the connection and the
                # client could lose this answer: half-close, drain for a moment, then close.
                transport.write_eof()
                self._to(ANSWERED)
                self._paused_writing = False
                self._maybe_resume_reading(force=True)
            else:
                self._to(CLOSE)
                transport.close()
        elif not self._slots and self._state == WAIT:
            self._to(ANSWERED)

    def _hand_over(self, stream: LiveStream) -> None:
        """This connection becomes a Server-Sent Events stream of one site's events."""
        transport = self.transport
        self._to(CLOSE)
        self.ctx.connections.discard(self)
        self.transport = None
        self._slots.clear()
        live = LiveConnection(self.ctx.live, self.config.live_buffer_bytes)
        transport.set_protocol(live)
        live.connection_made(transport)
        self.ctx.connections.add(live)
        live.on_lost = self.ctx.connections.discard
        if self._paused_reading:
            transport.resume_reading()  # the stream reads nothing, but must see the client go
        live.subscribe(stream.si, stream.last_id, stream.since)

    def _fail(self, error: HttpError) -> None:
        """Answer a request that cannot be parsed further, after those before it, and close."""
        self._closing = True
        path = self._path
        if path is None and self._url:  # refused before the head was complete
            url = b"".join(self._url) if type(self._url) is list else self._url
            path = url.partition(b"?")[0]
        started = self._started if self._state in (HEAD, BODY) else self.ctx.clock()
        self._to(FAIL)
        self._wire_bytes = 0
        cors = not path or path in INGEST_PATHS or not path.startswith(b"/api/")
        slot = Slot(self._method or b"-", path or b"?", self._headers, started, True)
        slot.data = http.error(error.status, error.reason, cors=cors, headers=error.headers,
                               close=True)
        self._queue(slot)

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
        if not self._slots and self._state in (OPEN, IDLE, HEAD):
            self._closing = True
            self._to(CLOSE)
            self.transport.close()
        elif self._slots:
            self._slots[-1].close = True
            self._closing = True


def escape(raw: bytes, limit: int = 200) -> str:
    """Request bytes made safe for a log line: printable ASCII only, the rest as \\xNN."""
    text = "".join(c if " " < c <= "~" and c != "\\" else f"\\x{ord(c):02x}"
                   for c in raw[:limit].decode("latin-1"))
    return text + ("..." if len(raw) > limit else "")


def _parser_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.encode("ascii", "backslashreplace").decode("ascii")[:100]


# Bytes a request target may hold as they are (RFC 3986 unreserved, reserved and '%').
_TARGET_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                          b"-._~:/?#[]@!$&'()*+,;=%")


def _bad_target_reason(exc: Exception, data: bytes) -> str:
    """Why a request target was refused, naming the byte and where it is, when this read
    holds the request line (a raw UTF-8 property name is the usual cause)."""
    part = "query" if "query" in str(exc) else "path"
    advice = ("percent-encode property names and values as UTF-8 (ä is %C3%A4, a space %20)")
    for line in data.split(b"\r\n"):
        method, space, rest = line.partition(b" ")
        if not space or not rest.startswith(b"/"):
            continue
        target = rest.rsplit(b" HTTP/", 1)[0] if b" HTTP/" in rest else rest
        for offset, byte in enumerate(target):
            if byte not in _TARGET_BYTES:
                shown = target[max(0, offset - 20):offset].decode("ascii", "replace")
                return (f"the request target holds byte 0x{byte:02X} at offset {offset} "
                        f"(in the {part}, after {shown!r}), which must be percent-encoded: "
                        f"{advice}")
        break
    return f"the request target holds a byte that must be percent-encoded (in the {part}): {advice}"
