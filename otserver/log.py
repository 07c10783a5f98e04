"""The event log: every accepted event (and erasure request), in one order. No asyncio here.

Environment `<data dir>/log` (keys are bytes):
  log       position(8)            -> entry: ts(8) kind(1) id(16) msgpack(body)  (model.LogEntry)
  eids      id(16)                 -> position(8)
  erasures  position(8)            -> msgpack([result]) of the erasure entry at that position
  tokens    sha256(token)(32)      -> msgpack([site, created_ms, label])
  sites     si (utf-8)             -> msgpack([created_ms, [origin, ...]]): registered sites
  keys      key digest(16)         -> ts(8) body digest(16) id(16) * events: an idempotency key
                                      (idempotency.py) and the ids it answered with
  key_times ts(8) key digest(16)   -> b"": the keys in the order they were stored, for expiry
  meta      b"schema"              -> SCHEMA
            b"next"                -> position(8): the next position, once the last entry
                                      has been deleted (by the sweeper)
            b"sites_generation"    -> counter(8), bumped by every change of `sites`
            b"outbox"              -> position(8) sequence(8): the last position whose entry
                                      the NATS stream acknowledged, and its stream sequence
                                      (relay.py; absent: nothing published yet)

The same layout holds a node's copy of a cluster's stream (`<data dir>/stream`, relay.py):
there a position is the entry's stream sequence, and the views of a `--cluster` node are
folded from that copy instead of the node's own log.

Invariants:
- Positions start at 1 and are assigned inside the write transaction that appends: the last
  position + 1 (or meta `next`, when the sweeper has deleted the last entry). LMDB serialises
  write transactions across processes, so positions are one strictly increasing order for
  every process sharing the directory, never reused, and an append always lands at the right
  edge of the B-tree (MDB_APPEND).
- Times never decrease along the log: an appended entry whose time is below the last entry's
  takes the last entry's (the few milliseconds between workers' commits, a clock stepped back).
  So the entries of any time range are one run of positions (`position_at_time`).
- Whoever deletes the last entry records `next` in the same transaction (the sweeper; an
  erasure's purge never does: its own entry follows what it erases).
- A commit is synced (data and meta) before `append` returns: an acknowledged event is on disk.
- Exactly one thread of a process appends: the writer (or a CLI command, which has no writer).
- Idempotency keys are checked and stored in the transaction that appends their events, so a
  key answered once is known to every later transaction of any process: a retry after a
  commit whose answer was lost (kill -9), or sent to another worker, finds it. A key older
  than the window counts as absent; the sweeper deletes it (`expire_keys`).
"""
from __future__ import annotations

import os

from .errors import StoreFailed
from .idempotency import REQUEST
from .lmdbenv import Environment
from .model import ID_END, KIND_END, LogEntry, packb, position_bytes, unpackb

SCHEMA = b"2"
NAMES = ("log", "eids", "erasures", "tokens", "keys", "key_times", "sites")
ZERO_TS = bytes(8)


class DuplicateId(StoreFailed):
    """An appended id is in the log already (nothing of the batch was stored)."""


class EventLog:
    def __init__(self, path: str, *, initial_bytes: int = 64 << 20, max_bytes: int = 64 << 30,
                 readonly: bool = False, environment: Environment | None = None):
        self.store = environment or Environment(
            path, NAMES, schema=SCHEMA, initial_bytes=initial_bytes, max_bytes=max_bytes,
            readonly=readonly, what="event log")
        self.path = path
        db = self.store.db
        (self._log, self._eids, self._erasures, self._tokens, self._keys, self._key_times,
         self._sites) = (db[n] for n in NAMES)  # _sites: None read-only in a store before it
        self._meta = db["meta"]
        self.read = self.store.read
        self.write = self.store.write

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ append

    def append(self, values: list[bytes]) -> int:
        """Append encoded entries in one synced transaction; -> the first one's position."""
        return self.store.write(self.append_in, values)

    def append_in(self, txn, values: list[bytes]) -> int:
        cur = txn.cursor(db=self._log)
        if cur.last():
            position = int.from_bytes(cur.key(), "big") + 1
            last_ts = cur.value()[:8]
        else:
            position, last_ts = 1, ZERO_TS
        floor = txn.get(b"next", db=self._meta)
        if floor is not None and int.from_bytes(floor, "big") > position:
            position = int.from_bytes(floor, "big")
        first = position
        items = []
        ids = []
        for value in values:
            ts = value[:8]
            if ts < last_ts:
                value = last_ts + value[8:]
            else:
                last_ts = ts
            key = position.to_bytes(8, "big")
            items.append((key, value))
            ids.append((value[KIND_END:ID_END], key))
            position += 1
        cur.putmulti(items, append=True)
        _, added = txn.cursor(db=self._eids).putmulti(ids, overwrite=False)
        if added != len(ids):
            raise DuplicateId("an appended id is already in the log")
        return first

    def copy_in(self, txn, items) -> tuple[int, int]:
        """Append entries of the cluster's stream at their stream sequences [(sequence, raw)]
        (a copy: the stream's gaps are kept, times are as published). An entry at or below
        the tail (delivered again) or whose id is here already (published twice beyond the
        stream's duplicate window) is skipped. -> (copied, skipped)."""
        tail = self.tail(txn)
        cur = txn.cursor(db=self._log)
        copied = 0
        for position, value in items:
            if position <= tail or not txn.put(value[KIND_END:ID_END], position_bytes(position),
                                               db=self._eids, overwrite=False):
                continue
            cur.put(position_bytes(position), value, append=True)
            tail = position
            copied += 1
        return copied, len(items) - copied

    def delete_ids_in(self, txn, keys) -> int:
        """Delete the entries with these ids, where present (an erasure carried out on a
        cluster node: its own log's copies of the erased events)."""
        positions = [self.find(txn, key) for key in keys]
        return self.delete_in(txn, [p for p in positions if p is not None])

    def append_groups(self, groups: list, units: list, now_ms: int, window_ms: int):
        """Append the entries of many requests in one synced transaction, checking their
        idempotency units (tuples of idempotency.UNIT) first.
        -> (the first appended entry's position, {request: (refused unit or None,
            {event index: original id})}) for each request that had a unit."""
        return self.store.write(self._append_groups_in, groups, units, now_ms, window_ms)

    def _append_groups_in(self, txn, groups, units, now_ms, window_ms):
        outcomes = {}
        if units:
            by_group: dict = {}
            for unit in units:
                by_group.setdefault(unit[2], []).append(unit)
            for number, group_units in by_group.items():
                outcomes[number] = self._check_keys(txn, groups[number], group_units, now_ms,
                                                    now_ms - window_ms)
        values = []
        for number, group in enumerate(groups):
            outcome = outcomes.get(number)
            if outcome is None:
                values += group
            elif outcome[0] is None:
                replaced = outcome[1]
                values += [value for index, value in enumerate(group) if index not in replaced]
        if not values:
            return self.tail(txn) + 1, outcomes
        return self.append_in(txn, values), outcomes

    def _check_keys(self, txn, group, units, now_ms, cutoff_ms):
        """One request's units: (None, replaced) to store what is not replaced (and its keys),
        or (refused unit, {}) to store nothing of it. A request unit (first, when there is
        one) replays the whole request; item units replay single events."""
        replaced: dict = {}
        fresh = {}  # key -> record, stored when the request is accepted
        for number, (key, body, _, first, count, kind) in enumerate(units):
            record = fresh.get(key)
            if record is None:
                record = txn.get(key, db=self._keys)
                if record is not None and int.from_bytes(record[:8], "big") < cutoff_ms:
                    record = None  # past the window: a new key
            if record is not None:
                if record[8:24] != body:
                    return number, {}
                ids = record[24:]
                if kind == REQUEST:
                    return None, {index: ids[16 * index:16 * index + 16] for index in range(count)}
                replaced[first] = ids[:16]
                continue
            if kind == REQUEST:
                fresh[key] = None  # its ids are known once the item units are checked
            else:
                fresh[key] = now_ms.to_bytes(8, "big") + body + group[first][KIND_END:ID_END]
        stamp = now_ms.to_bytes(8, "big")
        for number, (key, body, _, first, count, kind) in enumerate(units):
            if kind == REQUEST and fresh.get(key, b"") is None:
                fresh[key] = stamp + body + b"".join(
                    replaced.get(index) or group[index][KIND_END:ID_END] for index in range(count))
        for key, record in fresh.items():
            txn.put(key, record, db=self._keys)
            txn.put(stamp + key, b"", db=self._key_times)
        return None, replaced

    def expire_keys(self, now_ms: int, window_ms: int, limit: int) -> tuple[int, bool]:
        """Delete up to `limit` idempotency keys stored before the window.
        -> (deleted, more left)."""
        cutoff = max(now_ms - window_ms, 0).to_bytes(8, "big")

        def apply(txn):
            cur = txn.cursor(db=self._key_times)
            done = 0
            while cur.first() and cur.key()[:8] < cutoff:
                if done >= limit:
                    return done, True
                stamp, key = cur.key()[:8], cur.key()[8:]
                record = txn.get(key, db=self._keys)
                if record is not None and record[:8] == stamp:  # not stored again since
                    txn.delete(key, db=self._keys)
                cur.delete()
                done += 1
            return done, False
        return self.write(apply)

    def key_count(self) -> int:
        return self.store.entries("keys")

    # ------------------------------------------------------------------ reads

    def tail(self, txn) -> int:
        """The last position given to an entry (0: none yet), whether or not it is kept."""
        cur = txn.cursor(db=self._log)
        if cur.last():
            return int.from_bytes(cur.key(), "big")
        floor = txn.get(b"next", db=self._meta)
        return int.from_bytes(floor, "big") - 1 if floor is not None else 0

    def last_position(self) -> int:
        with self.read() as txn:
            return self.tail(txn)

    def first_position(self, txn) -> int:
        cur = txn.cursor(db=self._log)
        return int.from_bytes(cur.key(), "big") if cur.first() else 0

    def get(self, txn, position: int) -> LogEntry | None:
        raw = txn.get(position_bytes(position), db=self._log)
        return LogEntry(position, raw) if raw is not None else None

    def raw(self, txn, position: int) -> bytes | None:
        return txn.get(position_bytes(position), db=self._log)

    def find(self, txn, key: bytes) -> int | None:
        """The position of the entry with this 16-byte id."""
        raw = txn.get(key, db=self._eids)
        return int.from_bytes(raw, "big") if raw is not None else None

    def entries_after(self, txn, after: int, limit: int, until: int | None = None):
        """Up to `limit` (position, raw entry) with after < position (<= until), in order."""
        cur = txn.cursor(db=self._log)
        out = []
        if not cur.set_range(position_bytes(after + 1)):
            return out
        stop = position_bytes(until) if until is not None else None
        for key, value in cur:
            if stop is not None and key > stop:
                break
            out.append((int.from_bytes(key, "big"), value))
            if len(out) >= limit:
                break
        return out

    def scan(self, txn, position: int, reverse: bool = False):
        """(position, raw entry) from `position` on (or back, with `reverse`), skipping gaps."""
        cur = txn.cursor(db=self._log)
        if reverse:
            if not cur.set_range(position_bytes(position)):
                if not cur.last():
                    return
            elif int.from_bytes(cur.key(), "big") > position and not cur.prev():
                return
            iterator = cur.iterprev()
        else:
            if not cur.set_range(position_bytes(position)):
                return
            iterator = cur.iternext()
        for key, value in iterator:
            yield int.from_bytes(key, "big"), value

    def position_at_time(self, txn, ts_ms: int) -> int:
        """The first position whose time is >= ts_ms (tail + 1 when none).

        Times never decrease along the log, so f(p) = the time of the first entry at or
        after position p is non-decreasing too (deleted positions are gaps), and the answer
        is a lower-bound binary search over positions.
        """
        cur = txn.cursor(db=self._log)
        if not cur.last():
            return 1
        last = int.from_bytes(cur.key(), "big")
        cur.first()
        lo, hi = int.from_bytes(cur.key(), "big"), last + 1
        while lo < hi:
            mid = (lo + hi) // 2
            cur.set_range(position_bytes(mid))  # finds an entry: mid <= last exists
            if int.from_bytes(cur.value()[:8], "big") >= ts_ms:
                hi = mid
            else:
                lo = mid + 1
        if lo > last:
            return last + 1
        cur.set_range(position_bytes(lo))
        return int.from_bytes(cur.key(), "big")

    def event_count(self) -> int:
        """Entries that are events: every erasure entry has its result stored (once purged)."""
        with self.read() as txn:
            return txn.stat(self._log)["entries"] - txn.stat(self._erasures)["entries"]

    # ------------------------------------------------------------------ deletions

    def delete_in(self, txn, positions) -> int:
        """Delete entries and their id index entries (an erasure's purge, the sweeper); when
        the last entry goes, record the next position (positions are never reused)."""
        deleted = 0
        tail = self.tail(txn)
        for position in positions:
            key = position_bytes(position)
            raw = txn.get(key, db=self._log)
            if raw is None:
                continue
            txn.delete(raw[KIND_END:ID_END], db=self._eids)
            txn.delete(key, db=self._log)
            deleted += 1
        if deleted and self.tail(txn) < tail:
            txn.put(b"next", position_bytes(tail + 1), db=self._meta)
        return deleted

    # ------------------------------------------------------------------ erasure results

    def put_erasure_result(self, txn, position: int, result) -> None:
        txn.put(position_bytes(position), packb([result]), db=self._erasures, overwrite=False)

    def erasure_result(self, position: int) -> tuple[bool, object]:
        """(done, result) of the erasure entry at `position`; result None: no such user."""
        with self.read() as txn:
            raw = txn.get(position_bytes(position), db=self._erasures)
        return (True, unpackb(raw)[0]) if raw is not None else (False, None)

    def delete_erasure_results_before(self, txn, position: int, limit: int) -> int:
        cur = txn.cursor(db=self._erasures)
        done = 0
        cur.first()
        while done < limit and cur.key() and cur.key() < position_bytes(position):
            cur.delete()
            done += 1
        return done

    # ------------------------------------------------------------------ the outbox cursor

    def outbox_cursor(self, txn=None) -> tuple[int, int]:
        """(last position the stream acknowledged, its stream sequence); (0, 0) at first."""
        if txn is None:
            with self.read() as txn:
                return self.outbox_cursor(txn)
        raw = txn.get(b"outbox", db=self._meta)
        if raw is None:
            return 0, 0
        return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")

    def put_outbox_cursor(self, position: int, sequence: int) -> None:
        value = position_bytes(position) + sequence.to_bytes(8, "big")
        self.write(lambda txn: txn.put(b"outbox", value, db=self._meta))

    # ------------------------------------------------------------------ tokens

    def put_token(self, digest: bytes, site: str, created_ms: int, label: str) -> None:
        self.write(lambda txn: txn.put(digest, packb([site, created_ms, label]), db=self._tokens))

    def find_token(self, digest: bytes) -> list | None:
        with self.read() as txn:
            raw = txn.get(digest, db=self._tokens)
        return unpackb(raw) if raw is not None else None

    def list_tokens(self) -> list[tuple[bytes, list]]:
        with self.read() as txn:
            return [(k, unpackb(v)) for k, v in txn.cursor(db=self._tokens)]

    def delete_tokens(self, digests: list[bytes]) -> int:
        def apply(txn):
            return sum(1 for d in digests if txn.delete(d, db=self._tokens))
        return self.write(apply)

    def count_tokens(self) -> int:
        return self.store.entries("tokens")

    # ------------------------------------------------------------------ registered sites
    # Every change bumps meta `sites_generation` in its transaction, so a running server
    # learns of it by reading one key (guards.Registry.refresh).

    def put_site(self, si: str, created_ms: int, origins: list[str]) -> bool:
        """Register `si` (or replace its origins); -> True when it was new."""
        def apply(txn):
            key = si.encode()
            old = txn.get(key, db=self._sites)
            created = unpackb(old)[0] if old is not None else created_ms
            txn.put(key, packb([created, origins]), db=self._sites)
            self._bump_sites(txn)
            return old is None
        return self.write(apply)

    def delete_site(self, si: str) -> bool:
        def apply(txn):
            removed = txn.delete(si.encode(), db=self._sites)
            if removed:
                self._bump_sites(txn)
            return removed
        return self.write(apply)

    def list_sites(self) -> list[tuple[str, int, list]]:
        """[(si, created_ms, origins)] in si order."""
        if self._sites is None:
            return []
        with self.read() as txn:
            return [(k.decode(), *unpackb(v)) for k, v in txn.cursor(db=self._sites)]

    def sites_generation(self) -> int:
        with self.read() as txn:
            raw = txn.get(b"sites_generation", db=self._meta)
        return int.from_bytes(raw, "big") if raw is not None else 0

    def _bump_sites(self, txn) -> None:
        raw = txn.get(b"sites_generation", db=self._meta)
        current = int.from_bytes(raw, "big") if raw is not None else 0
        txn.put(b"sites_generation", (current + 1).to_bytes(8, "big"), db=self._meta)


def log_path(data_dir: str) -> str:
    return os.path.join(data_dir, "log")


def copy_path(data_dir: str) -> str:
    """A cluster node's copy of the stream (relay.py)."""
    return os.path.join(data_dir, "stream")
