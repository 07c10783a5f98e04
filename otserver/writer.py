"""Group commit: many requests share one synced LMDB write transaction.

The event loop collects what each request submits during one turn of the loop; at the end of
the turn the collected batch goes to the writer thread, which stores it in one transaction and
commits (fsync). While that commit runs, the loop keeps reading and the next batch grows; when
it ends, every request of the batch is answered on the loop and the next batch starts at once.

Invariants:
- One commit in flight at a time; the writer thread owns every write transaction.
- A request is answered only after its batch committed (or failed as a whole): callback(arg,
  None) means stored and synced; callback(arg, exc) means nothing of the batch was stored.
- The number of events accepted but not yet answered never exceeds `max_pending`: `submit`
  refuses past it, so overload is answered at once instead of queueing without bound.
"""
from __future__ import annotations

import queue
import threading
import time

from .errors import StoreFailed, StoreFull


class Writer:
    def __init__(self, store, loop, *, max_pending: int, on_commit=None):
        self.store = store
        self.loop = loop
        self.max_pending = max_pending
        self.on_commit = on_commit  # f(events, seconds) after each successful commit
        self.pending_events = 0  # accepted, not yet answered (waiting + in flight)
        self._waiting: list = []  # (events, callback, arg) for the next batch
        self._jobs: list = []  # (function, args, callback): other work for the writer thread
        self._last_was_job = False
        self._in_flight = False
        self._started = time.monotonic()
        self._scheduled = False
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self._idle_waiters: list = []
        self.last_progress = time.monotonic()
        self.last_commit = 0.0
        self.commits = 0
        self.events_stored = 0
        self._thread = threading.Thread(target=self._run, name="otserver-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ health

    def alive(self) -> bool:
        return self._thread.is_alive()

    def busy_recently(self) -> bool:
        """Ingest is waiting now or committed within the last second."""
        return bool(self._waiting) or time.monotonic() - self.last_commit < 1.0

    def stalled_for(self) -> float:
        """Seconds the work in flight has been running (0 when nothing is in flight)."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - self._started

    # ------------------------------------------------------------------ loop side

    def submit(self, events: list, callback, arg) -> bool:
        """Queue events for the next commit; False (nothing queued) when over the bound."""
        count = len(events)
        if self.pending_events + count > self.max_pending:
            return False
        self.pending_events += count
        self._waiting.append((events, callback, arg))
        if not self._in_flight and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)
        return True

    def run_job(self, function, args: tuple, callback) -> None:
        """Run function(*args) on the writer thread between batches (never two at once);
        then callback(result, error) on the loop. Jobs and batches take turns under load."""
        self._jobs.append((function, args, callback))
        if not self._in_flight and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._in_flight:
            return
        if self._jobs and (not self._waiting or not self._last_was_job):
            self._in_flight = True
            self._started = time.monotonic()
            self._last_was_job = True
            self._batches.put(self._jobs.pop(0))
            return
        if not self._waiting:
            return
        batch, self._waiting = self._waiting, []
        self._in_flight = True
        self._started = time.monotonic()
        self._last_was_job = False
        self._batches.put(batch)

    def _job_done(self, callback, result, error) -> None:
        self._in_flight = False
        self.last_progress = time.monotonic()
        try:
            callback(result, error)
        finally:
            self._after_work()

    def _done(self, batch: list, error: BaseException | None, events: list, seconds: float) -> None:
        self._in_flight = False
        self.last_progress = time.monotonic()
        if error is None:
            self.commits += 1
            self.events_stored += len(events)
            self.last_commit = self.last_progress
        for evs, callback, arg in batch:
            self.pending_events -= len(evs)
            callback(arg, error)
        if error is None and self.on_commit is not None:
            self.on_commit(events, seconds)
        self._after_work()

    def _after_work(self) -> None:
        if self._waiting or self._jobs:
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
        store = self.store
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            if type(batch) is tuple:
                self._run_job(*batch)
                continue
            events = [ev for evs, _, _ in batch for ev in evs]
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                store.write_batch(events)
            except (StoreFull, StoreFailed) as exc:
                error = exc
            except Exception as exc:  # never lose the loop's answer to a bug in a batch
                error = StoreFailed(f"{type(exc).__name__}: {exc}")
            seconds = time.perf_counter() - started
            try:
                self.loop.call_soon_threadsafe(self._done, batch, error, events, seconds)
            except RuntimeError:  # the loop is closed: the process is going away
                return

    def _run_job(self, function, args, callback) -> None:
        result = error = None
        try:
            result = function(*args)
        except Exception as exc:
            error = exc
        try:
            self.loop.call_soon_threadsafe(self._job_done, callback, result, error)
        except RuntimeError:
            pass
