"""Group commit: many requests share one synced append to the log, made by a writer process.

The event loop collects the entries (already encoded, see model.Event.encode) that each
request submits during one turn of the loop; at the end of the turn the collected batch goes
over a socketpair to this server's writer process. The writer process takes every batch that
is waiting in its socket, appends them all to the log in one transaction, commits (fsync) and
answers each batch with its first position, in order. While a commit runs, the next batches
gather in the socket, so each commit takes what arrived during the one before (group commit),
and the writer never waits for the loop between commits.

Why a process and not a thread: a commit needs the GIL before and after its fsync, and a thread
beside a busy event loop waited up to the switch interval for it each time (measured: a 0.3 ms
synced commit took 1.2-10 ms). The writer process shares no GIL with the loop.

Invariants:
- Batches are answered in the order they were sent; the writer process owns every write
  transaction of this server on the log.
- A request is answered only after its batch committed (or failed as a whole):
  callback(arg, None, position, replaced) means stored and synced, its first stored entry at
  `position`, and the events in `replaced` (index -> original 16-byte id; None: none) not
  stored because their idempotency keys had stored them before;
  callback(arg, Conflict(unit), 0, None) means a key was used with another body, nothing of
  the request stored; callback(arg, exc, 0, None) means nothing of the batch was stored, or
  (when the writer process died with the batch in flight) that it cannot be known: 503
  either way, as for a crash. A retry with the same keys then finds what was stored.
- The number of entries accepted but not yet answered never exceeds `max_pending`: `submit`
  refuses past it, so overload is answered at once instead of queueing without bound.
- The writer process leaves when its socket closes (the server stopped or died); the server
  starts another one if it dies.
- It appends nothing while the data directory's disk has less than --min-free-disk-bytes
  free: that reserve is the views', so the folder can always fold what the log holds.

The writer process's side, and the wire format between the two: appender.py.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from array import array
from collections import deque

from .appender import ANSWER, BATCH_HEAD, FULL, NO_CONFLICT, OUTCOME, REPLACED, STORED
from .errors import StoreFailed, StoreFull
from .idempotency import Conflict
from .model import key_to_eid

log = logging.getLogger("otserver")
IN_FLIGHT = 2  # batches sent and not yet answered, at most


class Writer:
    """The loop's side: batches, answers, health. Start it with `await writer.start()`."""

    def __init__(self, config, loop, *, max_pending: int, on_commit=None):
        self.config = config
        self.loop = loop
        self.max_pending = max_pending
        self.on_commit = on_commit  # f(entries, seconds, lock_seconds, last_position)
        self.pending_events = 0  # accepted, not yet answered (waiting + in flight)
        self._waiting: list = []  # (values, callback, arg, units) for the next batch
        self._in_flight: deque = deque()  # (batch, sent at), in the order sent
        self._started = time.monotonic()
        self._scheduled = False
        self._idle_waiters: list = []
        self._transport = None
        self._process: subprocess.Popen | None = None
        self._closing = False
        self._restarts = 0
        self.last_commit = 0.0
        self.commits = 0
        self.events_stored = 0
        self.events_replayed = 0  # answered with the eids their idempotency keys had stored
        self.lock_seconds = 0.0  # the log's write lock held by this server's commits

    # ------------------------------------------------------------------ the process

    async def start(self) -> None:
        """Start the writer process and connect to it."""
        from .config import to_env
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "otserver", "writer", "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                env={**os.environ, **to_env(self.config)})
        finally:
            theirs.close()
        self._transport, _ = await self.loop.connect_accepted_socket(
            lambda: _WriterConnection(self), ours)
        if self._waiting:
            self._dispatch()

    def _lost(self, exc) -> None:
        """The writer process is gone: the batches in flight fail; start another."""
        self._transport = None
        in_flight, self._in_flight = self._in_flight, deque()
        for batch, _ in in_flight:
            self._answer(batch, StoreFailed("the log writer stopped during the commit"), 0)
        if self._closing:
            self._wake_idle()
            return
        code = self._process.poll() if self._process is not None else None
        log.error("the log writer process exited (%s); starting another", code)
        self._restarts += 1
        delay = 0.0 if self._restarts < 3 else 1.0
        self.loop.call_later(delay, lambda: self.loop.create_task(self.start()))

    # ------------------------------------------------------------------ health

    def alive(self) -> bool:
        return self._transport is not None and self._process is not None and \
            self._process.poll() is None

    def stalled_for(self) -> float:
        """Seconds the oldest batch in flight has waited for its answer (0: none waits)."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - self._in_flight[0][1]

    # ------------------------------------------------------------------ loop side

    def submit(self, values: list, callback, arg, units: list | None = None) -> bool:
        """Queue one request's entries (and its idempotency units) for the next commit;
        False (nothing queued) when over the bound."""
        count = len(values)
        if self.pending_events + count > self.max_pending:
            return False
        self.pending_events += count
        self._waiting.append((values, callback, arg, units))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)
        return True

    def _dispatch(self) -> None:
        """Send what was submitted (at the end of a turn of the loop), unless two batches
        wait for answers already: one is being committed and one waits for the next commit,
        and a third would only cost a write and a wake-up of the writer (it would join the
        second in the same commit); it is sent when the first is answered."""
        self._scheduled = False
        if not self._waiting or self._transport is None or len(self._in_flight) >= IN_FLIGHT:
            return
        batch, self._waiting = self._waiting, []
        values = [value for group, _, _, _ in batch for value in group]
        sizes = array("I", [len(group) for group, _, _, _ in batch])
        sizes.extend(map(len, values))
        units = [unit.pack(number) for number, (_, _, _, group_units) in enumerate(batch)
                 if group_units for unit in group_units]
        payload = b"".join(values)
        self._in_flight.append((batch, time.monotonic()))
        self._transport.write(b"".join((BATCH_HEAD.pack(len(batch), len(values), len(units),
                                                        len(payload)),
                                        sizes.tobytes(), *units, payload)))

    def _answered(self, status: int, first: int, count: int, lock_seconds: float,
                  body: bytes) -> None:
        if not self._in_flight:
            return
        batch, sent = self._in_flight.popleft()
        seconds = time.monotonic() - sent
        if status == STORED:
            self.commits += 1
            self.events_stored += count
            self.lock_seconds += lock_seconds
            self.last_commit = time.monotonic()
            self._answer(batch, None, first, _outcomes(body) if body else None)
            if self.on_commit is not None:
                self.on_commit(count, seconds, lock_seconds, first + count - 1)
        else:
            error = (StoreFull if status == FULL else StoreFailed)(body.decode(errors="replace"))
            self._answer(batch, error, 0)
        if self._waiting:
            self._dispatch()
        elif not self._in_flight:
            self._wake_idle()

    def _answer(self, batch: list, error, first: int, outcomes: dict | None = None) -> None:
        position = first
        for number, (values, callback, arg, _) in enumerate(batch):
            self.pending_events -= len(values)
            outcome = outcomes.get(number) if outcomes else None
            if error is not None:
                callback(arg, error, 0, None)
            elif outcome is None:
                callback(arg, None, position, None)
                position += len(values)
            elif outcome[0] is not None:
                callback(arg, Conflict(outcome[0]), 0, None)
            else:
                callback(arg, None, position, outcome[1])
                position += len(values) - len(outcome[1])
                self.events_replayed += len(outcome[1])

    def _wake_idle(self) -> None:
        for fut in self._idle_waiters:
            if not fut.done():
                fut.set_result(None)
        self._idle_waiters.clear()

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed and answered."""
        while (self._waiting or self._in_flight or self._scheduled) and \
                (self._transport is not None or self._in_flight):
            fut = self.loop.create_future()
            self._idle_waiters.append(fut)
            if self._waiting and not self._scheduled:
                self._dispatch()
            await fut

    async def close(self) -> None:
        """Stop the writer process (after drain): it leaves when its socket closes."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        process = self._process
        if process is None:
            return
        for _ in range(6000):  # up to 30 s for a commit in progress to end
            if process.poll() is not None:
                return
            await asyncio.sleep(0.005)
        log.error("the log writer process did not stop; killing it")
        process.kill()
        process.wait()


def _outcomes(body: bytes) -> dict:
    """The writer's report of the requests whose keys replayed or refused something:
    request number -> (refused unit or None, {event index: original eid})."""
    outcomes = {}
    at = 0
    while at < len(body):
        number, conflict, count = OUTCOME.unpack_from(body, at)
        at += OUTCOME.size
        replaced = {}
        for _ in range(count):
            index, key = REPLACED.unpack_from(body, at)
            at += REPLACED.size
            replaced[index] = key_to_eid(key)
        outcomes[number] = (None if conflict == NO_CONFLICT else conflict, replaced)
    return outcomes


class _WriterConnection(asyncio.Protocol):
    """The socket to the writer process: answers arrive here."""

    def __init__(self, writer: Writer):
        self.writer = writer
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while len(buffer) >= ANSWER.size:
            status, first, count, lock_seconds, size = ANSWER.unpack_from(buffer)
            end = ANSWER.size + size
            if len(buffer) < end:
                break
            body = buffer[ANSWER.size:end]
            buffer = buffer[end:]
            self.writer._answered(status, first, count, lock_seconds, body)
        self.buffer = buffer

    def connection_lost(self, exc) -> None:
        self.writer._lost(exc)


# ---------------------------------------------------------------------- the writer process
