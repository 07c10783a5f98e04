"""The folder: builds the views from the log, off the ingest path.

Three parts:
- `Folder`, the loop of the folder process (`otserver fold`): read the log past the views'
  watermark, fold a batch (thousands of entries, or what arrived since the last one) in one
  views transaction that also moves the watermark, finish erasures, run the sweeper's steps
  between batches. One folder per data directory: it holds `folder.lock` (flock) while it runs;
  a second one waits for the lock (a standby).
- `FolderProcess`, how `serve` and the supervisor start it: a child process of their own,
  restarted when it dies, stopped after the server has drained.
- `ViewWatch`, the event loop's view of the folder: the watermark, the lag, read-your-writes
  waits (a read waits until the views reach the log position committed when it arrived) and
  whether a folder is running (`/readyz`).

When to fold: a batch rewrites (and syncs) the page of every record it touches, so many small
batches cost far more CPU and disk per event than fewer larger ones. With no read waiting, the
folder lets entries gather until the oldest is `--fold-delay` old (or a full batch is there);
a read that waits writes the position it wants into `<data dir>/views.wanted`, which the folder
reads at every poll, and then it folds at once.

Invariants:
- An erasure finishes in three steps: the fold transaction that erases the user from the views
  also records the log positions to purge (views meta `purge`); then one log transaction
  deletes those entries and stores the erasure's result; then the record is cleared. A crash
  between steps repeats the purge at the next start (deletes are idempotent), so the log never
  keeps an erased event and the views always equal a fold of the log.
- The folder process leaves when its parent does (it checks the parent's pid every second).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections import deque

from .child import ChildProcess
from .errors import StoreFailed, StoreFull
from .metrics import Histogram, LAG_SECONDS_BUCKETS, FOLD_SIZE_BUCKETS, write_snapshot
from .model import ID_END, KIND_END, LogEntry, entry_ts, now_ms
from .sweeper import Sweeper

log = logging.getLogger("otserver")
POLL_S = 0.001  # the folder looks at the log tail (and views.wanted) this often
IDLE_POLL_S = 0.005  # ... and this often after a second with nothing to fold
LOCK_NAME = "folder.lock"
WANTED_NAME = "views.wanted"  # position(8): the furthest a waiting read wants the views
SNAPSHOT_NAME = "folder.json"


class Wanted:
    """`<data dir>/views.wanted`: an 8-byte position that readers raise and the folder reads.
    (Every worker writes its own wants; the file only has to say "someone waits up to here".)"""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.fd = os.open(os.path.join(data_dir, WANTED_NAME), os.O_RDWR | os.O_CREAT, 0o644)

    def read(self) -> int:
        raw = os.pread(self.fd, 8, 0)
        return int.from_bytes(raw, "big") if len(raw) == 8 else 0

    def want(self, position: int) -> None:
        if position > self.read():
            os.pwrite(self.fd, position.to_bytes(8, "big"), 0)

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- the lock

class FolderLock:
    """`<data dir>/folder.lock`, held (flock) by the one folder of a data directory."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, LOCK_NAME)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, blocking: bool = True) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


def folder_running(data_dir: str) -> bool:
    """Whether some process holds the folder lock of this data directory."""
    lock = FolderLock(data_dir)
    try:
        if lock.acquire(blocking=False):
            lock.release()
            return False
        return True
    finally:
        lock.close()


# --------------------------------------------------------------------------- folding

class Folder:
    """Folds `event_log` (the node's log, or on a cluster node its copy of the stream) into
    the views. `node_log`: on a cluster node, the node's own log, which erasures purge too."""

    def __init__(self, event_log, views, config, *, clock=now_ms, sweeper: bool = True,
                 node_log=None):
        self.log = event_log
        self.node_log = node_log
        self.views = views
        self.config = config
        self.batch_limit = config.fold_batch_events
        self.delay_ms = config.fold_delay_s * 1000
        self.sweeper = Sweeper(event_log, views, config, clock=clock,
                               node_log=node_log) if sweeper else None
        self.watermark = views.watermark()
        self.folded = 0
        self.batches = 0
        self.fold_seconds = 0.0
        self.fold_sizes = Histogram(FOLD_SIZE_BUCKETS)
        self.lag_seconds = Histogram(LAG_SECONDS_BUCKETS)
        self.erasures = 0
        self._stop = False

    def due(self, wanted: int) -> bool:
        """Whether to fold now: a read waits for what is logged, a full batch is there, or the
        oldest entry not yet folded has waited --fold-delay."""
        with self.log.read() as txn:
            tail = self.log.tail(txn)
            if tail <= self.watermark:
                return False
            if wanted > self.watermark or tail - self.watermark >= self.batch_limit:
                return True
            for _, raw in self.log.scan(txn, self.watermark + 1):
                return now_ms() - entry_ts(raw) >= self.delay_ms
        return True  # entries past the watermark were deleted: fold to move past them

    def fold_once(self) -> int:
        """Fold what the log holds past the watermark (at most one batch). -> entries folded."""
        with self.log.read() as ltxn:
            if self.log.tail(ltxn) <= self.watermark:
                return 0
            started = time.perf_counter()

            def apply(txn):
                watermark = self.views.watermark_in(txn)
                entries = [LogEntry(position, raw) for position, raw in
                           self.log.entries_after(ltxn, watermark, self.batch_limit)]
                return entries, self.views.fold(txn, entries, self.log, ltxn)

            entries, erasures = self.views.write(apply)
        if not entries:
            self.watermark = self.views.watermark()
            return 0
        took = time.perf_counter() - started
        self.watermark = entries[-1].position
        self.folded += len(entries)
        self.batches += 1
        self.fold_seconds += took
        self.fold_sizes.observe(len(entries))
        self.lag_seconds.observe(max(0.0, now_ms() - entries[0].ts) / 1000)
        if erasures:
            self.erasures += len(erasures)
            self.purge_pending()
        return len(entries)

    def purge_pending(self) -> None:
        """Delete erased events from the log, store each erasure's result, clear the record."""
        with self.views.read() as txn:
            pending = self.views.pending_purges(txn)
        if not pending:
            return

        def purge(txn) -> list[bytes]:
            ids = []
            for position, result, positions in pending:
                if self.node_log is not None:
                    ids += [raw[KIND_END:ID_END] for raw in
                            (self.log.raw(txn, p) for p in positions) if raw is not None]
                self.log.delete_in(txn, positions)
                self.log.put_erasure_result(txn, position, result)
            return ids
        ids = self.log.write(purge)
        if ids:  # a cluster node: the copies of the erased events its own log received
            self.node_log.write(self.node_log.delete_ids_in, ids)
        done = {position for position, _, _ in pending}

        def clear(txn) -> None:
            self.views.put_pending_purges(
                txn, [p for p in self.views.pending_purges(txn) if p[0] not in done])
        self.views.write(clear)
        for position, result, positions in pending:
            log.info("erasure at log position %d: %s", position,
                     result if result is not None else "no such user")

    def catch_up(self, deadline: float | None = None) -> None:
        """Fold until the watermark reaches the tail (as it is when this starts)."""
        self.purge_pending()
        with self.log.read() as txn:
            target = self.log.tail(txn)
        while self.watermark < target:
            if deadline is not None and time.monotonic() > deadline:
                return
            if not self.fold_once():
                break

    def stop(self) -> None:
        self._stop = True

    def run(self, parent: int | None = None, snapshot_dir: str | None = None) -> None:
        """Fold and sweep until stopped (or the parent process is gone)."""
        self.purge_pending()
        wanted = Wanted(self.config.data_dir)
        next_check = 0.0
        failing_since = None
        idle = 0  # polls in a row with nothing to do: an idle folder looks less often
        while not self._stop:
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 1.0
                if parent is not None and os.getppid() != parent:
                    log.warning("folder: the server process is gone; stopping")
                    break
                if snapshot_dir is not None:
                    write_snapshot(snapshot_dir, self.snapshot(), SNAPSHOT_NAME)
            try:
                folded = self.fold_once() if self.due(wanted.read()) else 0
            except (StoreFull, StoreFailed) as exc:  # a full disk or map: retry, smaller
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.error("folder: cannot write the views (%s); retrying", exc)
                # A smaller batch needs fewer new pages at once: at the size cap it may fit
                # where the whole backlog does not (and the sweeper frees room between them).
                self.batch_limit = max(1, self.batch_limit // 2)
                time.sleep(0.2)
                continue
            if folded:
                idle = 0
                if self.batch_limit < self.config.fold_batch_events:
                    self.batch_limit = min(self.config.fold_batch_events, self.batch_limit * 2)
                if failing_since is not None:
                    log.info("folder: writing the views again after %.1f s",
                             time.monotonic() - failing_since)
                    failing_since = None
            if self.sweeper is not None and self.sweeper.due():
                try:
                    self.sweeper.step(busy=folded > 0)
                except Exception as exc:  # a failed step is retried at the next pass
                    log.error("sweeper step failed: %s", exc)
                    self.sweeper.next_at = time.monotonic() + self.config.sweep_interval_s
            if not folded:
                idle += 1
                time.sleep(POLL_S if idle < 1000 else IDLE_POLL_S)
        wanted.close()
        try:  # a clean stop leaves the views caught up, within a bound
            self.catch_up(deadline=time.monotonic() + 5.0)
        except (StoreFull, StoreFailed) as exc:
            log.error("folder: stopping behind the log: %s", exc)
        if snapshot_dir is not None:
            write_snapshot(snapshot_dir, self.snapshot(), SNAPSHOT_NAME)

    def snapshot(self) -> dict:
        with self.log.read() as txn:
            tail = self.log.tail(txn)
            raw = self.log.raw(txn, self.watermark + 1) if tail > self.watermark else None
        return {
            "pid": os.getpid(), "at": time.time(), "tail": tail, "watermark": self.watermark,
            "lag_events": max(0, tail - self.watermark),
            "lag_seconds": max(0.0, now_ms() - entry_ts(raw)) / 1000 if raw else 0.0,
            "folded": self.folded, "batches": self.batches, "fold_seconds": self.fold_seconds,
            "fold_sizes": self.fold_sizes.snapshot(), "lag_histogram": self.lag_seconds.snapshot(),
            "erasures": self.erasures,
            "swept": dict(self.sweeper.totals) if self.sweeper is not None else {},
        }


def run_folder(store, config, *, parent: int | None = None) -> int:
    """The body of `otserver fold`: take the lock (waiting for another folder to end), then
    fold and sweep until SIGTERM."""
    lock = FolderLock(config.data_dir)
    if not lock.acquire(blocking=False):
        log.info("folder: another folder runs on %s; waiting to take over", config.data_dir)
        while not lock.acquire(blocking=False):
            if parent is not None and os.getppid() != parent:
                return 0
            time.sleep(0.1)
    from .agents import warm
    folder = Folder(store.events, store.views, config,
                    node_log=store.log if store.cluster else None)
    signal.signal(signal.SIGTERM, lambda *_: folder.stop())
    signal.signal(signal.SIGINT, lambda *_: folder.stop())
    warm()  # before the first fold (a read waits for that one), after the handlers
    log.info("folder: folding %s from position %d", config.data_dir, folder.watermark)
    try:
        folder.run(parent=parent, snapshot_dir=os.path.join(config.data_dir, "metrics"))
    finally:
        lock.release()
        lock.close()
    log.info("folder: stopped at position %d (%d entries folded)", folder.watermark, folder.folded)
    return 0


def catch_up(event_log, views, config, timeout_s: float = 60.0) -> bool:
    """For a command that needs the views current: fold inline when no folder runs, or wait
    for the running one to reach today's tail. -> whether the views reached it."""
    lock = FolderLock(config.data_dir)
    try:
        target = event_log.last_position()
        deadline = time.monotonic() + timeout_s
        if lock.acquire(blocking=False):
            try:
                Folder(event_log, views, config, sweeper=False).catch_up()
            finally:
                lock.release()
        while views.watermark() < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True
    finally:
        lock.close()


def rebuild(event_log, views, config, *, out=sys.stderr) -> int:
    """`otserver rebuild-views`: empty the views and fold the whole log again."""
    lock = FolderLock(config.data_dir)
    if not lock.acquire(blocking=False):
        print(f"otserver: a folder is running on {config.data_dir} (a server?); stop it first",
              file=out)
        lock.close()
        return 1
    try:
        views.write(views.drop_all)
        folder = Folder(event_log, views, config, sweeper=False)
        started = time.monotonic()
        target = event_log.last_position()
        while folder.watermark < target and folder.fold_once():
            if out.isatty():
                out.write(f"\rrefolded {folder.folded:,} entries")
                out.flush()
        folder.purge_pending()
        if out.isatty():
            out.write("\n")
        print(f"rebuilt the views from {folder.folded} log entries in "
              f"{time.monotonic() - started:.1f} s", file=out)
        return 0
    finally:
        lock.release()
        lock.close()


# --------------------------------------------------------------------------- the process

class FolderProcess(ChildProcess):
    """The folder as a child process of `serve` (or of the supervisor)."""

    def __init__(self, config):
        super().__init__(config, "fold", "folder")

    def wait_running(self, timeout_s: float = 30.0) -> bool:
        """Until some folder holds the lock (ours, or another server's on this directory)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if folder_running(self.config.data_dir):
                return True
            if self.proc is not None and self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return False


# --------------------------------------------------------------------------- the loop's view

class ViewWatch:
    """The event loop's view of the folder's progress. No LMDB write happens here.

    `event_log` is the log the views are folded from; on a cluster node (`node_log` given,
    its own log) that is the copy of the stream, and a read waits for its writes through the
    stream: until the outbox has published the node's log as it was when the read arrived
    and the views have folded the stream up to there."""

    def __init__(self, event_log, views, loop, config, node_log=None):
        self.log = event_log
        self.node_log = node_log
        self._acked = None
        if node_log is not None:
            from .relay import Acked
            self._acked = Acked(config.data_dir)
        self.views = views
        self.loop = loop
        self.config = config
        self.data_dir = config.data_dir
        self.watermark = 0
        self.tail = 0
        self._refreshed = 0.0
        self._moved = time.monotonic()  # when the watermark last moved
        self._waiters: deque = deque()  # [ready(), deadline, callback(ok)]
        self._handle = None
        self._wanted = Wanted(config.data_dir)
        self.refresh()

    def refresh(self) -> None:
        with self.views.read() as txn:
            watermark = self.views.watermark_in(txn)
        with self.log.read() as txn:
            self.tail = max(self.tail, self.log.tail(txn))
        if watermark != self.watermark:
            self._moved = time.monotonic()
        self.watermark = watermark
        self._refreshed = time.monotonic()

    def note_tail(self, position: int) -> None:
        """This process committed up to `position` (of its own log: on a cluster node those
        are not the positions of the copy the views are folded from, and count nothing)."""
        if self.node_log is None and position > self.tail:
            self.tail = position

    def lag(self) -> int:
        return max(0, self.tail - self.watermark)

    def over_lag(self) -> bool:
        """Past --max-view-lag: ingest answers 503 until the folder catches up."""
        if self.tail - self.watermark <= self.config.max_view_lag:
            return False
        if time.monotonic() - self._refreshed > 0.005:
            self.refresh()
        return self.tail - self.watermark > self.config.max_view_lag

    def log_tail(self) -> int:
        with self.log.read() as txn:
            tail = self.log.tail(txn)
        self.note_tail(tail)
        return tail

    def problem(self) -> str | None:
        """Why the views cannot keep up now, or None (for /readyz)."""
        if not folder_running(self.data_dir):
            return "the folder is not running"
        stuck = time.monotonic() - self._moved
        if self.lag() and stuck > self.config.writer_stall_s:
            return f"the folder has made no progress for {stuck:.0f} s ({self.lag()} events behind)"
        return None

    # ------------------------------------------------------------------ read waits

    def wait(self, callback, target: int | None = None, deadline_s: float | None = None) -> None:
        """callback(True) once the views reach `target` (default: the log's tail now), or
        callback(False) after --max-read-wait."""
        if target is None:
            if self.node_log is not None:
                self._wait_published(callback, deadline_s)
                return
            target = self.log_tail()
        if self.watermark < target:
            self.refresh()
        if self.watermark >= target:
            callback(True)
            return
        self.want(target)  # the folder folds at once instead of gathering a batch
        self.wait_for(lambda: self.watermark >= target, callback, deadline_s)

    def _wait_published(self, callback, deadline_s: float | None) -> None:
        with self.node_log.read() as txn:
            mine = self.node_log.tail(txn)
        folded_to: list[int] = []  # the stream sequence to wait for, once the outbox is there

        def ready() -> bool:
            if not folded_to:
                position, sequence = self._acked.read()
                if position < mine:
                    return False
                folded_to.append(sequence)
                self.want(sequence)
            return self.watermark >= folded_to[0]
        self.refresh()
        if ready():
            callback(True)
        else:
            self.wait_for(ready, callback, deadline_s)

    def want(self, position: int) -> None:
        """Ask the folder to fold up to `position` now."""
        self._wanted.want(position)

    def wait_for(self, ready, callback, deadline_s: float | None = None) -> None:
        """callback(True) once ready() holds (checked every millisecond, after a refresh)."""
        wait = self.config.max_read_wait_s if deadline_s is None else deadline_s
        self._waiters.append((ready, self.loop.time() + wait, callback))
        if self._handle is None:
            self._handle = self.loop.call_later(POLL_S, self._poll)

    def _poll(self) -> None:
        self._handle = None
        self.refresh()
        now = self.loop.time()
        waiting = self._waiters
        self._waiters = deque()
        for ready, deadline, callback in waiting:
            if ready():
                callback(True)
            elif now >= deadline:
                callback(False)
            else:
                self._waiters.append((ready, deadline, callback))
        if self._waiters and self._handle is None:
            self._handle = self.loop.call_later(POLL_S, self._poll)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for _, _, callback in self._waiters:
            callback(False)
        self._waiters.clear()
        self._wanted.close()
        if self._acked is not None:
            self._acked.close()


def read_folder_snapshot(metrics_dir: str) -> dict | None:
    try:
        with open(os.path.join(metrics_dir, SNAPSHOT_NAME)) as data:
            return json.load(data)
    except (OSError, ValueError):
        return None
