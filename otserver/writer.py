"""Group commit: many requests share one synced append to the log.

The event loop collects the entries (already encoded, see model.Event.encode) that each
request submits during one turn of the loop; at the end of the turn the collected batch goes to
the writer thread, which appends it to the log in one transaction and commits (fsync). While
that commit runs, the loop keeps reading and the next batch grows; when it ends, every request
of the batch is answered on the loop and the next batch starts at once.

Invariants:
- One commit in flight at a time; the writer thread owns every write transaction of this
  process on the log. It holds the GIL only to build the batch's keys: encoding is the loop's,
  the B-tree work is LMDB's, and the fsync releases the GIL.
- A request is answered only after its batch committed (or failed as a whole):
  callback(arg, None, position) means stored and synced, its first entry at `position`;
  callback(arg, exc, 0) means nothing of the batch was stored.
- The number of entries accepted but not yet answered never exceeds `max_pending`: `submit`
  refuses past it, so overload is answered at once instead of queueing without bound.
"""
from __future__ import annotations

import queue
import threading
import time

from .errors import StoreFailed, StoreFull


class Writer:
    def __init__(self, event_log, loop, *, max_pending: int, on_commit=None):
        self.log = event_log
        self.loop = loop
        self.max_pending = max_pending
        self.on_commit = on_commit  # f(entries, seconds, lock_seconds, last_position)
        self.pending_events = 0  # accepted, not yet answered (waiting + in flight)
        self._waiting: list = []  # (values, callback, arg) for the next batch
        self._in_flight = False
        self._started = time.monotonic()
        self._scheduled = False
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self._idle_waiters: list = []
        self.last_commit = 0.0
        self.commits = 0
        self.events_stored = 0
        self.lock_seconds = 0.0  # the log's write lock held by this process's commits
        self._thread = threading.Thread(target=self._run, name="otserver-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ health

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the commit in flight has been running (0 when none is)."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - self._started

    # ------------------------------------------------------------------ loop side

    def submit(self, values: list, callback, arg) -> bool:
        """Queue entries for the next commit; False (nothing queued) when over the bound."""
        count = len(values)
        if self.pending_events + count > self.max_pending:
            return False
        self.pending_events += count
        self._waiting.append((values, callback, arg))
        if not self._in_flight and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)
        return True

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._in_flight or not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._in_flight = True
        self._started = time.monotonic()
        self._batches.put(batch)

    def _done(self, batch: list, error, first: int, count: int, seconds: float,
              lock_seconds: float) -> None:
        self._in_flight = False
        position = first
        for values, callback, arg in batch:
            self.pending_events -= len(values)
            callback(arg, error, position)
            position += len(values)
        if error is None:
            self.commits += 1
            self.events_stored += count
            self.lock_seconds += lock_seconds
            self.last_commit = time.monotonic()
            if self.on_commit is not None:
                self.on_commit(count, seconds, lock_seconds, first + count - 1)
        if self._waiting:
            self._dispatch()
        elif self._idle_waiters:
            for fut in self._idle_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._idle_waiters.clear()

    async def drain(self) -> None:
        """Wait until everything submitted so far is committed and answered."""
        while self._waiting or self._in_flight or self._scheduled:
            fut = self.loop.create_future()
            self._idle_waiters.append(fut)
            if self._waiting and not self._in_flight and not self._scheduled:
                self._dispatch()
            await fut

    def close(self) -> None:
        """Stop the thread (after drain)."""
        self._batches.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        event_log = self.log
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            values = [value for group, _, _ in batch for value in group]
            started = time.perf_counter()
            error = None
            first = 0
            try:
                first = event_log.append(values)
            except (StoreFull, StoreFailed) as exc:
                error = exc
            except Exception as exc:  # never lose the loop's answer to a bug in a batch
                error = StoreFailed(f"{type(exc).__name__}: {exc}")
            seconds = time.perf_counter() - started
            try:
                self.loop.call_soon_threadsafe(self._done, batch, error, first, len(values),
                                               seconds, event_log.store.last_write_seconds)
            except RuntimeError:  # the loop is closed: the process is going away
                return
