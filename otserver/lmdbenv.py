"""One LMDB environment: opened with its named databases, grown on demand, read and written
safely from several threads of one process and from several processes. No asyncio here.

Invariants:
- The map grows by itself (doubling) up to `max_bytes`; past that a write raises StoreFull.
  A map grown by a sibling process is adopted (MapResizedError).
- Resizing needs no transaction open in this process: read transactions share a `_Gate`
  (any number at once, on any thread) and a resize waits until none is open. (A plain lock
  around every read serialised the reader threads with the event loop's own reads.)
- A write either commits whole or raises StoreFull / StoreFailed with nothing stored.
- `schema` is checked at open: a writable open of an empty environment records it; any other
  value is refused with SchemaError.
"""
from __future__ import annotations

import errno
import os
import threading
import time
from contextlib import contextmanager

import lmdb

from .errors import StoreFailed, StoreFull

META = "meta"


class SchemaError(Exception):
    """The environment was written by a release this one does not know."""


class Environment:
    def __init__(self, path: str, names: tuple[str, ...], *, schema: bytes,
                 dupsort: frozenset = frozenset(), initial_bytes: int = 64 << 20,
                 max_bytes: int = 64 << 30, readonly: bool = False, sync: bool = True,
                 metasync: bool = True, what: str = "store"):
        self.path = path
        self.max_bytes = max_bytes
        if not readonly:
            os.makedirs(path, exist_ok=True)
        existing = file_size(os.path.join(path, "data.mdb"))
        names = names + (META,)
        self.env = lmdb.open(
            path, map_size=max(initial_bytes, existing), max_dbs=len(names) + 2,
            readonly=readonly, sync=sync, metasync=metasync, readahead=False, meminit=False,
            max_readers=1024, max_spare_txns=8, create=not readonly)
        self._gate = _Gate()
        options = {name: {"dupsort": True} if name in dupsort else {} for name in names}
        if readonly:  # handles opened in a read transaction die with it: open them bare
            self.db = {name: self._open_existing(name, options[name]) for name in names}
        else:
            self.env.reader_check()  # clear slots left by killed processes
            txn = self._begin(write=True)  # a sibling may have grown the map since we sized it
            with txn:
                self.db = {name: self.env.open_db(name.encode(), txn=txn, **options[name])
                           for name in names}
                if txn.get(b"schema", db=self.db[META]) is None:
                    txn.put(b"schema", schema, db=self.db[META])
        with self._begin() as txn:
            found = txn.get(b"schema", db=self.db[META])
        if found is not None and found != schema:
            self.env.close()
            raise SchemaError(f"{what} at {path} has schema version {found.decode(errors='replace')}"
                              f"; this otserver reads version {schema.decode()}")
        self.page_size = self.env.stat()["psize"]
        self.last_write_seconds = 0.0  # how long the last write held the write lock

    def close(self) -> None:
        self.env.close()

    def _open_existing(self, name: str, options: dict):
        """A database of a read-only open; None when the store predates it (a database added
        by a later release is created by the first writable open)."""
        try:
            return self.env.open_db(name.encode(), create=False, **options)
        except lmdb.NotFoundError:
            return None

    def _begin(self, write: bool = False):
        """A transaction at open time (no other is open in this process yet)."""
        while True:
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

    # ------------------------------------------------------------------ map size

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def used_bytes(self) -> int:
        return (self.env.info()["last_pgno"] + 1) * self.page_size

    def file_bytes(self) -> int:
        return file_size(os.path.join(self.path, "data.mdb"))

    def _grow(self) -> None:
        """Double the map, up to the cap. Called with no transaction open in this thread."""
        current = self.map_size()
        if current >= self.max_bytes:
            raise StoreFull(f"store is at its size cap ({self.max_bytes} bytes)")
        with self._gate.resizing():
            self.env.set_mapsize(min(self.max_bytes, current * 2))

    def _adopt_size(self) -> None:
        """A sibling process grew the map: take its size."""
        with self._gate.resizing():
            self.env.set_mapsize(0)

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def read(self):
        """A read transaction; the map is not resized while it is open."""
        while True:
            with self._gate.reading():
                try:
                    txn = self.env.begin(buffers=False)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            self._adopt_size()  # a sibling grew the map: take its size, then begin again

    def write(self, apply, *args):
        """Run apply(txn, *args) in one write transaction and commit it, growing the map as
        needed. Raises StoreFull (cap or disk) or StoreFailed; then nothing was stored."""
        while True:
            txn = None
            try:
                txn = self.env.begin(write=True)
                held = time.perf_counter()
                result = apply(txn, *args)
                txn.commit()
                self.last_write_seconds = time.perf_counter() - held
                return result
            except lmdb.MapFullError:
                txn.abort()
                self._grow()
            except lmdb.MapResizedError:
                if txn is not None:
                    txn.abort()
                self._adopt_size()
            except lmdb.Error as exc:
                if txn is not None:
                    txn.abort()
                if _is_disk_full(exc, self.path):
                    raise StoreFull(f"disk full: {exc}") from exc
                raise StoreFailed(str(exc)) from exc
            except BaseException:
                if txn is not None:
                    txn.abort()
                raise

    def entries(self, name: str) -> int:
        with self.read() as txn:
            return txn.stat(self.db[name])["entries"]


class _Gate:
    """Shared for read transactions, exclusive for a resize: `reading()` may be held by any
    number of threads at once; `resizing()` waits until none holds it, and holds new readers
    off meanwhile."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False

    @contextmanager
    def reading(self):
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def resizing(self):
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# Free bytes under which an I/O error is taken for a full disk: LMDB reports a short write
# (the filesystem filled up inside a commit's write) as EIO, not ENOSPC.
NEARLY_FULL_BYTES = 1 << 20


def _is_disk_full(exc: lmdb.Error, path: str) -> bool:
    code = getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in str(exc):
        return True
    if code == errno.EIO or "Input/output error" in str(exc):
        try:
            stat = os.statvfs(path)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < NEARLY_FULL_BYTES
    return False
