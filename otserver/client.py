"""A Python client for otserver's ingest API, standard library only: `track()` queues an event
and returns at once; a background thread (`Tracker`) or task (`AsyncTracker`) sends the queue
in JSON batches to `POST /batch` over one keep-alive connection and retries what fails.

Usage::

    from otserver.client import Tracker

    with Tracker("http://127.0.0.1:8080", "example.com") as tracker:
        tracker.track({"page": "/pricing"}, sid="s-42", price=9.5)
    # leaving the block flushes: every event is stored, or given up and counted in `failed`

    from otserver.client import AsyncTracker

    async with AsyncTracker("http://127.0.0.1:8080", "example.com") as tracker:
        tracker.track(page="/pricing")          # sync, never waits
        await tracker.flush()                   # wait until it is sent (optional)

Both take the same options: `batch_size` (1000 events), `flush_interval` (0.5 s: the longest an
event waits before its batch goes out), `max_queue` (100,000 events), `timeout` (10 s per
request), `max_retry_seconds` (60 s per batch), `max_batch_bytes` (1 MiB, the server's
`--max-batch-body-bytes`), `on_error(DeliveryError)` and `on_sent([(key, eid), ...])`; the
callbacks run on the sending thread or task.

Invariants:
- `track()` never waits on the network. It validates the event (raising TypeError or ValueError
  for what the server would refuse), encodes it and appends it to a bounded queue. When
  `max_queue` events wait, the new event is dropped: counted in `dropped`, and `track` returns
  None instead of the event's key. A tracking client must not stall the app it measures.
- Every event gets an `idempotency_key` in `track()` (128 random bits in hex, unless the caller
  gave one), and every resend carries the same keys, so a retry never stores an event twice,
  not even when the first attempt was stored and its answer lost: the server answers a
  repeated key (same site, within its window, 24 h) with the original eid.
- Every accepted event ends in exactly one of `sent` (a 200 named its eid) or `failed` (the
  server refused it, retries ran past `max_retry_seconds`, or `close()`'s timeout ran out);
  `on_error` hears of each failure (a warning is logged when there is no `on_error`).
- One batch is in flight at a time, in queue order: `flush()` returns once every event accepted
  before it has ended, and `close()` is a flush and then the end of the sender.
- Retried: network errors, 408, 429 and 5xx, after an exponential backoff with jitter, never sooner
  than `Retry-After`. A 400 or 422 naming `item N` fails that event alone and resends the rest;
  a 413 splits the batch; any other 4xx fails the batch. A connection that was idle may have
  been closed by the server: its first failure is resent at once, on a new connection.
- The policy (batching, retries, accounting) is `_Pipeline`, which does no I/O: it yields
  `_Send`/`_Sleep` steps, which `Tracker` runs with http.client on a daemon thread and
  `AsyncTracker` with asyncio streams in a task.
"""
from __future__ import annotations

import asyncio
import atexit
import http.client
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from . import __version__

__all__ = ["Tracker", "AsyncTracker", "DeliveryError"]

log = logging.getLogger(__name__)

# The server's default limits (README, Properties and ids; Settings). A server configured
# stricter refuses the event with `item N`, which is reported like any refusal.
MAX_NAME_CHARS = 128
MAX_VALUE_BYTES = 8 * 1024
MAX_PROPERTIES = 256
MAX_ID_CHARS = 255
MAX_KEY_CHARS = 255
MAX_BATCH_EVENTS = 10_000
SERVER_ASSIGNED = frozenset(("eid", "unixtimestamp"))
IDS = ("si", "sid", "uid")

BACKOFF_FIRST_S = 0.05  # the first retry's step; it doubles per attempt
BACKOFF_MAX_S = 5.0
USER_AGENT = f"otserver-client/{__version__} (Python)"

_ITEM = re.compile(r"item (\d+): ")
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"),
                                allow_nan=False).encode


class DeliveryError(Exception):
    """Events that were not stored: `reason` (the server's text, or why the client gave up),
    `status` (the HTTP status, None after network errors or a close), `keys` (their
    idempotency keys) and `events` (their properties, as sent)."""

    def __init__(self, reason: str, status: int | None, items: list):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self._bodies = [body for _, _, body in items]
        self.keys = [key for _, key, _ in items]

    @property
    def events(self) -> list[dict]:
        return [json.loads(body) for body in self._bodies]


# Steps the policy yields, and what it is sent back.
class _Send(NamedTuple):
    body: bytes


class _Sleep(NamedTuple):
    seconds: float


class _Reply(NamedTuple):
    status: int
    retry_after: str | None
    body: bytes


class _NetError(NamedTuple):
    error: BaseException
    reused: bool  # the connection had carried an earlier request


class _Pipeline:
    """The queue, the validation and the delivery policy shared by both trackers; no I/O.

    A queued item is `(time queued, idempotency key, JSON body)`. `_accepted`, `_taken` and
    `_settled` count events into the queue, out of it into batches, and out of delivery (sent
    or failed, a whole batch at a time, so a flush target is passed only at batch ends).
    """

    clock = staticmethod(time.monotonic)
    jitter = staticmethod(random.random)

    def __init__(self, url: str, site: str, *, batch_size: int = 1000,
                 flush_interval: float = 0.5, max_queue: int = 100_000, timeout: float = 10.0,
                 max_retry_seconds: float = 60.0, max_batch_bytes: int = 1024 * 1024,
                 on_error=None, on_sent=None, ssl_context: ssl.SSLContext | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(f"url: the server's base URL, http(s)://host[:port], not {url!r}")
        if not 1 <= batch_size <= MAX_BATCH_EVENTS:
            raise ValueError(f"batch_size: 1 to {MAX_BATCH_EVENTS}, not {batch_size!r}")
        if max_queue < 1 or flush_interval < 0 or timeout <= 0 or max_retry_seconds < 0 \
                or max_batch_bytes < 1024:
            raise ValueError("max_queue >= 1, flush_interval >= 0, timeout > 0, "
                             "max_retry_seconds >= 0, max_batch_bytes >= 1024")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self.netloc = parts.netloc.rpartition("@")[2]
        self.path = parts.path.rstrip("/") + "/batch"
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.https else None)
        self.site = site
        _check_id("si", site)
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self.timeout = timeout
        self.max_retry_seconds = max_retry_seconds
        self.max_batch_bytes = max_batch_bytes
        self.on_error = on_error
        self.on_sent = on_sent
        self.sent = self.dropped = self.failed = self.retries = self.requests = 0
        self._queue: deque = deque()
        self._wake_at = min(batch_size, max_queue)  # a queue this long is a batch due now
        self._accepted = self._taken = self._settled = self._flush_upto = 0
        self._closing = False  # no more track(); send what is queued now
        self._aborted = False  # close() ran out of time: fail what is left
        self._names: set[str] = set()  # property names already checked
        self._setup_io()

    def _setup_io(self) -> None:
        """The subclass's connection and sender; called last by __init__."""
        raise NotImplementedError

    @property
    def pending(self) -> int:
        """Events accepted and not yet sent or failed (queued or in flight)."""
        return self._accepted - self._settled

    # ------------------------------------------------------------------ track

    def _encode(self, props, kw) -> tuple[str, bytes]:
        """The event as its JSON object, with its key; raises what the server would refuse."""
        event = {"si": self.site}
        if props is not None:
            if not isinstance(props, Mapping):
                raise TypeError(f"track(props): a dict of properties, not {type(props).__name__}")
            event.update(props)
        event.update(kw)
        key = event.pop("idempotency_key", None)
        if key is None:
            key = os.urandom(16).hex()  # a uuid4's randomness at a quarter of its cost; fork-safe
        elif not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS and key.isascii()
                  and key.isprintable()):
            raise ValueError(f"idempotency_key: 1 to {MAX_KEY_CHARS} printable ASCII characters")
        if len(event) >= MAX_PROPERTIES:  # the server counts the key too
            raise ValueError(f"too many properties: at most {MAX_PROPERTIES - 1} per event "
                             "(with si; the idempotency_key is the last)")
        names = self._names
        for name, value in event.items():
            if name not in names:
                _check_name(name)
                if len(names) < 4096:
                    names.add(name)
            kind = type(value)
            if kind is str:
                if len(value) > MAX_VALUE_BYTES or not value.isascii():
                    _check_text(name, value)
            elif kind is float:
                if not math.isfinite(value):
                    raise ValueError(f"property {name}: {value} is not a JSON number")
            elif kind is not int and kind is not bool:
                _check_other(name, value)
        for name in IDS:
            if name in event:
                _check_id(name, event[name])
        event["idempotency_key"] = key
        body = _encode_json(event).encode()
        if len(body) + 2 > self.max_batch_bytes:
            raise ValueError(f"the event is {len(body)} bytes of JSON: more than a batch holds "
                             f"(max_batch_bytes={self.max_batch_bytes})")
        return key, body

    def _offer(self, key: str, body: bytes) -> bool:
        """Queue an encoded event, or count it dropped when the queue is full. The caller
        holds whatever serialises access to the queue."""
        if self._closing:
            raise RuntimeError("track() after close()")
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            return False
        self._queue.append((self.clock(), key, body))
        self._accepted += 1
        return True

    # ------------------------------------------------------------------ batching

    def _due_in(self, now: float) -> float | None:
        """Seconds until the next batch is due (0: now), or None while the queue is empty."""
        queue = self._queue
        if not queue:
            return None
        if (len(queue) >= self._wake_at or self._closing or self._aborted
                or self._flush_upto > self._taken):
            return 0.0
        return max(0.0, queue[0][0] + self.flush_interval - now)

    def _take(self) -> list:
        """The next batch: up to batch_size events, in order, within max_batch_bytes."""
        queue, batch = self._queue, []
        room = self.max_batch_bytes - 2  # the array's brackets
        while queue and len(batch) < self.batch_size and len(queue[0][2]) <= room:
            item = queue.popleft()
            room -= len(item[2]) + 1  # and a comma
            batch.append(item)
        self._taken += len(batch)
        return batch

    # ------------------------------------------------------------------ delivery

    def _deliver(self, batch: list):
        """Deliver one batch by the retry policy: a generator yielding `_Send(body)`, to be
        sent back a `_Reply` or a `_NetError`, and `_Sleep(seconds)` (a close that runs out of
        time cuts it short). Every event of the batch ends sent or failed before it returns."""
        deadline = self.clock() + self.max_retry_seconds
        attempt = 0
        resend_at_once = True
        todo = [batch]  # chunks still to send, the next one last
        while todo:
            if self._aborted:
                self._fail([item for chunk in todo for item in chunk], None,
                           "the tracker was closed before these events were sent")
                break
            chunk = todo.pop()
            self.requests += 1
            reply = yield _Send(b"[" + b",".join([item[2] for item in chunk]) + b"]")
            status, retry_after = None, 0.0
            if type(reply) is _NetError:
                if reply.reused and resend_at_once:
                    resend_at_once = False
                    todo.append(chunk)
                    continue
                problem = f"{type(reply.error).__name__}: {reply.error}"
            else:
                status = reply.status
                if status == 200:
                    eids = reply.body.decode("ascii", "replace").split()
                    if len(eids) == len(chunk):
                        self._succeed(chunk, eids)
                        continue
                    problem = f"a 200 naming {len(eids)} eids for {len(chunk)} events"
                elif status in (408, 429) or status >= 500:
                    problem = f"{status}: {_text(reply.body)}"
                    retry_after = _seconds(reply.retry_after)
                else:
                    self._refused(chunk, reply, todo)
                    continue
            delay = max(retry_after * (1 + 0.1 * self.jitter()), self._backoff(attempt))
            attempt += 1
            if self.clock() + delay > deadline:
                self._fail(chunk + [item for rest in todo for item in rest], status,
                           f"gave up after {attempt} attempts in {self.max_retry_seconds} s "
                           f"(max_retry_seconds), the last: {problem}")
                break
            self.retries += 1
            todo.append(chunk)
            yield _Sleep(delay)  # then _aborted is seen at the top of the loop
        self._settled += len(batch)

    def _backoff(self, attempt: int) -> float:
        """Exponential steps with "equal jitter": at least half the step, so retries of many
        clients spread out yet each still backs off."""
        step = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** attempt)
        return step * (0.5 + 0.5 * self.jitter())

    def _refused(self, chunk: list, reply: _Reply, todo: list) -> None:
        """A 4xx not retried: fail the item it names and resend the rest, split a batch
        that is too large, or fail the whole chunk."""
        text = _text(reply.body)
        match = _ITEM.match(text)
        number = int(match.group(1)) if match else 0
        if reply.status in (400, 422) and 1 <= number <= len(chunk):
            self._fail([chunk[number - 1]], reply.status, text)
            rest = chunk[:number - 1] + chunk[number:]
            if rest:
                todo.append(rest)
        elif len(chunk) > 1 and (reply.status == 413 or text.startswith("too many events")):
            half = len(chunk) // 2  # the server's limits are lower than ours
            todo += [chunk[half:], chunk[:half]]
        else:
            self._fail(chunk, reply.status, text or f"HTTP {reply.status}")

    def _succeed(self, chunk: list, eids: list[str]) -> None:
        self.sent += len(chunk)
        if self.on_sent is not None:
            _call(self.on_sent, [(item[1], eid) for item, eid in zip(chunk, eids)])

    def _fail(self, items: list, status: int | None, reason: str) -> None:
        if not items:
            return
        self.failed += len(items)
        error = DeliveryError(reason, status, items)
        if self.on_error is None:
            log.warning("otserver.client: %d events not stored: %s", len(items), reason)
        else:
            _call(self.on_error, error)


class Tracker(_Pipeline):
    """Send events to an otserver from a daemon thread; see the module's docstring.

    `track(props=None, **properties)` queues one event (the keywords join the dict, `si` is the
    tracker's site unless given) and returns its idempotency key, or None when the queue was
    full and the event dropped; it is safe to call from any thread. `flush(timeout=None)` waits
    until every event queued before it is sent or failed (False: the timeout came first).
    `close(timeout=None)` flushes and stops the thread; past the timeout what is left fails.
    It is idempotent, and runs at interpreter exit (bounded by `timeout`) if not called.
    Counters: `sent`, `dropped`, `failed` (events), `retries` (waits before a resend),
    `requests` (attempted), `pending` (events queued or in flight).
    """

    def _setup_io(self) -> None:
        if self.https:
            self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                     context=self.ssl_context)
        else:
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self._headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        self._cond = threading.Condition()
        self._stop = threading.Event()  # set with _aborted: cuts a retry's sleep short
        self._thread = threading.Thread(target=self._run, name="otserver-tracker", daemon=True)
        self._thread.start()
        atexit.register(self._close_at_exit)

    def track(self, props: Mapping | None = None, /, **properties) -> str | None:
        """Queue one event; -> its idempotency key, or None when the queue was full."""
        key, body = self._encode(props, properties)
        with self._cond:
            if not self._offer(key, body):
                return None
            if len(self._queue) in (1, self._wake_at):  # a timer to start, or a batch due
                self._cond.notify_all()
        return key

    def flush(self, timeout: float | None = None) -> bool:
        """Send what is queued now; True once all of it is sent or failed."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("flush() from a callback would wait for itself")
        with self._cond:
            target = self._accepted
            self._flush_upto = max(self._flush_upto, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._settled >= target, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread; True when nothing was left to fail."""
        with self._cond:
            self._closing = True
        done = self.flush(timeout)
        if not done:
            with self._cond:
                self._aborted = True
                self._cond.notify_all()
            self._stop.set()
        self._thread.join(self.timeout + 1)  # a request in flight ends within its timeout
        if not self._thread.is_alive():
            self._conn.close()
        atexit.unregister(self._close_at_exit)
        return done

    def _close_at_exit(self) -> None:
        self.close(self.timeout)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while (wait := self._due_in(self.clock())) != 0:
                    if wait is None and self._closing:
                        return
                    cond.wait(wait)
                batch = self._take()
            steps, reply = self._deliver(batch), None
            try:
                while True:
                    step = steps.send(reply)
                    reply = (self._post(step.body) if type(step) is _Send
                             else self._stop.wait(step.seconds))
            except StopIteration:
                pass
            with cond:
                cond.notify_all()

    def _post(self, body: bytes) -> _Reply | _NetError:
        conn = self._conn
        reused = conn.sock is not None  # http.client connects (again) by itself when not
        try:
            conn.request("POST", self.path, body, self._headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            return _NetError(exc, reused)
        return _Reply(resp.status, resp.getheader("Retry-After"), data)


class AsyncTracker(_Pipeline):
    """The asyncio twin of `Tracker`: the same options and policy, sent by a task over
    asyncio streams, no threads. `track()` is synchronous (and must run on the loop's thread);
    `await flush(timeout=None)`, `await aclose(timeout=None)`, `async with`. The task starts
    at the first `track()` or at `async with`; call `aclose()` before the loop ends.
    """

    def _setup_io(self) -> None:
        self._head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.netloc}\r\n"
                      f"User-Agent: {USER_AGENT}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: ").encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._cond = asyncio.Condition()

    def track(self, props: Mapping | None = None, /, **properties) -> str | None:
        """Queue one event; -> its idempotency key, or None when the queue was full."""
        key, body = self._encode(props, properties)
        if not self._offer(key, body):
            return None
        if self._task is None:
            self._start()
        if len(self._queue) in (1, self._wake_at):
            self._wake.set()
        return key

    async def flush(self, timeout: float | None = None) -> bool:
        """Send what is queued now; True once all of it is sent or failed."""
        target = self._accepted
        self._flush_upto = max(self._flush_upto, target)
        self._wake.set()
        try:
            async with asyncio.timeout(timeout), self._cond:
                await self._cond.wait_for(lambda: self._settled >= target)
            return True
        except TimeoutError:
            return False

    async def aclose(self, timeout: float | None = None) -> bool:
        """Flush, then end the task; True when nothing was left to fail."""
        self._closing = True
        done = await self.flush(timeout)
        if not done:
            self._aborted = True
            self._stop.set()
        if self._task is not None:
            self._wake.set()
            await self._task
        await self._disconnect()
        return done

    async def __aenter__(self) -> "AsyncTracker":
        if self._task is None:
            self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def _start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="otserver-tracker")

    async def _run(self) -> None:
        while True:
            while (wait := self._due_in(self.clock())) != 0:
                if wait is None and self._closing:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
            steps, reply = self._deliver(self._take()), None
            try:
                while True:
                    step = steps.send(reply)
                    reply = await (self._post(step.body) if type(step) is _Send
                                   else self._pause(step.seconds))
            except StopIteration:
                pass
            async with self._cond:
                self._cond.notify_all()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _post(self, body: bytes) -> _Reply | _NetError:
        reused = self._writer is not None
        try:
            async with asyncio.timeout(self.timeout):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.ssl_context)
                self._writer.write(self._head + b"%d\r\n\r\n" % len(body) + body)
                await self._writer.drain()
                status, headers = _parse_head(await self._reader.readuntil(b"\r\n\r\n"))
                length = headers.get("content-length")
                data = await (self._reader.read() if length is None
                              else self._reader.readexactly(int(length)))
        except (OSError, EOFError, ValueError, asyncio.LimitOverrunError) as exc:
            await self._disconnect()  # TimeoutError is an OSError, IncompleteReadError EOF
            return _NetError(exc, reused)
        if length is None or headers.get("connection", "").lower() == "close":
            await self._disconnect()
        return _Reply(status, headers.get("retry-after"), data)

    async def _disconnect(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


# --------------------------------------------------------------------------- helpers

def _check_name(name) -> None:
    if not isinstance(name, str):
        raise TypeError(f"property names are strings, not {type(name).__name__}")
    if not (0 < len(name) <= MAX_NAME_CHARS and name.isascii() and name.isprintable()
            and " " not in name):
        raise ValueError(f"bad property name {name!r}: 1 to {MAX_NAME_CHARS} printable ASCII "
                         "characters, no spaces")
    if name in SERVER_ASSIGNED:
        raise ValueError(f"property {name}: assigned by the server, not sent")


def _check_text(name: str, value: str) -> None:
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"property {name}: not valid UTF-8 (a lone surrogate)") from None
    if size > MAX_VALUE_BYTES:
        raise ValueError(f"property {name}: value of {size} bytes, more than {MAX_VALUE_BYTES}")


def _check_other(name: str, value) -> None:
    """A value not exactly str, int, bool or float: a subclass of one passes as its base."""
    if isinstance(value, str):
        _check_text(name, value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"property {name}: {value} is not a JSON number")
    elif not isinstance(value, int):
        raise TypeError(f"property {name}: {type(value).__name__} is not a property value "
                        "(send a string, a number or a boolean)")


def _check_id(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name}: a string, not {type(value).__name__}")
    size = len(str(value))
    if size > MAX_ID_CHARS or (name == "si" and size == 0):
        raise ValueError(f"{name}: 1 to {MAX_ID_CHARS} characters")


def _seconds(header: str | None) -> float:
    """Retry-After as seconds (0 when absent, or an HTTP date, which otserver never sends)."""
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:
        return 0.0


def _text(body: bytes) -> str:
    return body.decode("utf-8", "replace").strip()[:500]


def _parse_head(head: bytes) -> tuple[int, dict]:
    """A response's status line and headers -> (status, {lower-case name: value})."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if version == "HTTP/1.0":
        headers.setdefault("connection", "close")
    return int(rest[:3]), headers


def _call(callback, argument) -> None:
    """A user's callback must not kill the sender: its exception is logged."""
    try:
        callback(argument)
    except Exception:
        log.exception("otserver.client: callback %r raised", callback)
