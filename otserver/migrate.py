"""Migration of a data directory written by otserver 0.1 (schema 1: one LMDB environment,
`data.mdb` at the top of the data directory) to the log and its views (schema 2).

The old events become the log in time order (by unixtimestamp, then eid: 0.1's `import` could
store an event whose eid is newer than its time, and the log keeps times non-decreasing); the
old records and indexes are converted as they are, not refolded, so nothing is lost: a session
that kept the history of events the sweeper had deleted keeps it, and so do the counters. Event
keys in the old indexes become log positions. A key whose event had been swept gets a position
of its own too, in the same order (by the time its UUIDv7 carries), with no entry behind it: so a
user's sessions stay listed in the order of their first events.

Crash-safe: both environments are built beside the old one (`log.migrating`, `views.migrating`)
and renamed into place, the log last; the old files are deleted only once `log/` exists. An
interrupted migration starts again from the old store at the next open.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import lmdb

from .lmdbenv import SchemaError
from .log import EventLog, log_path
from .model import KIND_EVENT, eid_to_key, packb, position_bytes, unpackb
from .views import Views, views_path

log = logging.getLogger("otserver")
V1_SCHEMA = b"1"
V1_NAMES = ("events", "sessions", "users", "session_chunks", "user_sessions", "session_users",
            "user_pairs", "expiry", "site_events", "stats", "commit_log", "sites", "tokens",
            "meta")
V1_DUPSORT = ("user_sessions", "session_users")
R_EID, R_TAIL = 5, 9
BATCH = 20_000


def has_v1_store(data_dir: str) -> bool:
    return os.path.exists(os.path.join(data_dir, "data.mdb"))


def migrate_v1(data_dir: str, *, initial_bytes: int, max_bytes: int, reporting=None) -> None:
    if os.path.isdir(log_path(data_dir)):  # done before; the old files were not yet removed
        _remove_v1(data_dir)
        return
    old = lmdb.open(data_dir, readonly=True, lock=False, max_dbs=len(V1_NAMES) + 2)
    try:
        db = {name: old.open_db(name.encode(), create=False,
                                dupsort=name in V1_DUPSORT) for name in V1_NAMES}
        with old.begin() as txn:
            schema = txn.get(b"schema", db=db["meta"])
        if schema != V1_SCHEMA:
            raise SchemaError(f"{data_dir}/data.mdb has schema version "
                              f"{(schema or b'?').decode(errors='replace')}; this otserver "
                              f"migrates version 1 only")
        started = time.monotonic()
        log.info("migrating %s from the 0.1 layout to the event log and its views", data_dir)
        new_log_dir, new_views_dir = log_path(data_dir) + ".migrating", views_path(data_dir) + ".migrating"
        for path in (new_log_dir, new_views_dir, views_path(data_dir)):
            shutil.rmtree(path, ignore_errors=True)
        event_log = EventLog(new_log_dir, initial_bytes=initial_bytes, max_bytes=max_bytes)
        views = Views(new_views_dir, initial_bytes=initial_bytes, max_bytes=max_bytes,
                      reporting=reporting)
        try:
            events, swept = _copy_events(old, db, event_log)
            _copy_tokens(old, db, event_log)
            _convert_views(old, db, event_log, views, swept)
            views.count_reports(event_log)  # 0.1 had no distinct counts nor breakdowns
        finally:
            event_log.close()
            views.close()
    finally:
        old.close()
    os.rename(new_views_dir, views_path(data_dir))
    os.rename(new_log_dir, log_path(data_dir))
    _remove_v1(data_dir)
    log.info("migrated %s: %d events in %.1f s", data_dir, events, time.monotonic() - started)


def _remove_v1(data_dir: str) -> None:
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.unlink(os.path.join(data_dir, name))
        except FileNotFoundError:
            pass


def _batches(txn, dbi, size: int = BATCH):
    batch = []
    for item in txn.cursor(db=dbi):
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _referenced_keys(txn, db) -> set[bytes]:
    """Every event key the old views name."""
    keys: set[bytes] = set()

    def add_run(raw: bytes) -> None:
        keys.update(raw[i:i + 16] for i in range(0, len(raw), 16))
    for _, raw in txn.cursor(db=db["sessions"]):
        add_run(unpackb(raw)[R_TAIL])
    for _, raw in txn.cursor(db=db["session_chunks"]):
        add_run(raw)
    for _, raw in txn.cursor(db=db["user_sessions"]):
        keys.add(raw[:16])
    for _, raw in txn.cursor(db=db["user_pairs"]):
        keys.add(raw)
    for key in txn.cursor(db=db["site_events"]).iternext(values=False):
        keys.add(key[8:])
    return keys


def _copy_events(old, db, event_log) -> tuple[int, dict]:
    """The old events appended to the log in time order; positions also for the keys the old
    views name whose events had been swept. -> (events copied, {swept key: position})."""
    order = event_log.store.env.open_db(b"migrate-order")  # ts(8) + key(16) -> present?
    with old.begin() as txn:
        for batch in _batches(txn, db["events"]):
            items = [(raw_ts(raw) + key, b"\x01") for key, raw in batch]
            event_log.write(lambda t, items=items: t.cursor(db=order).putmulti(items))
        swept = [key for key in _referenced_keys(txn, db)
                 if txn.get(key, db=db["events"]) is None]
        items = [(int.from_bytes(key[:6], "big").to_bytes(8, "big") + key, b"\x00")
                 for key in swept]  # a UUIDv7 starts with its millisecond
        event_log.write(lambda t: t.cursor(db=order).putmulti(items))
        positions: dict[bytes, int] = {}
        copied = position = 0
        after = b""
        while True:
            with event_log.read() as otxn:  # the next BATCH sort keys, in order
                cur = otxn.cursor(db=order)
                found = cur.set_range(after) if after else cur.first()
                if found and cur.key() == after:
                    found = cur.next()
                chunk = []
                while found and len(chunk) < BATCH:
                    chunk.append((cur.key(), cur.value()))
                    found = cur.next()
            if not chunk:
                break
            after = chunk[-1][0]
            entries, ids = [], []
            for sort_key, present in chunk:
                position += 1
                key = sort_key[8:]
                if present == b"\x00":
                    positions[key] = position
                    continue
                ts, si, sid, uid, props, captured, _seq = unpackb(txn.get(key, db=db["events"]))
                value = b"".join((ts.to_bytes(8, "big"), KIND_EVENT, key,
                                  packb([si, sid, uid, props, captured])))
                entries.append((position_bytes(position), value))
                ids.append((key, position_bytes(position)))

            def put(t, entries=entries, ids=ids) -> None:
                t.cursor(db=event_log._log).putmulti(entries, append=True)
                t.cursor(db=event_log._eids).putmulti(ids)
            event_log.write(put)
            copied += len(entries)
    last = position

    def finish(t) -> None:
        t.drop(order, delete=True)
        if last and event_log.tail(t) < last:  # the last position names a swept event
            t.put(b"next", position_bytes(last + 1), db=event_log._meta)
    event_log.write(finish)
    return copied, positions


def raw_ts(raw: bytes) -> bytes:
    return unpackb(raw)[0].to_bytes(8, "big")


def _copy_tokens(old, db, event_log) -> None:
    with old.begin() as txn:
        tokens = list(txn.cursor(db=db["tokens"]))
    if tokens:
        event_log.write(lambda t: [t.put(k, v, db=event_log._tokens) for k, v in tokens])


def _convert_views(old, db, event_log, views, swept: dict) -> None:
    vdb = views.db
    with event_log.read() as ltxn:
        def position(key: bytes) -> bytes:
            found = event_log.find(ltxn, key)
            return position_bytes(found if found is not None else swept[key])

        def positions(keys: bytes) -> bytes:
            return b"".join(position(keys[i:i + 16]) for i in range(0, len(keys), 16))

        conversions = {
            "sessions": lambda k, v: (k, _record(v, positions)),
            "users": lambda k, v: (k, _record(v, positions)),
            "session_chunks": lambda k, v: (k, positions(v)),
            "user_sessions": lambda k, v: (k, position(v[:16]) + v[16:]),
            "session_users": lambda k, v: (k, v),
            "user_pairs": lambda k, v: (k, position(v)),
            "expiry": lambda k, v: (k, v),
            "site_events": lambda k, v: (k[:8] + position(k[8:]), v),
            "stats": lambda k, v: (k, v),
            "sites": lambda k, v: (k, v),
        }
        with old.begin() as txn:
            for name, convert in conversions.items():
                for batch in _batches(txn, db[name]):
                    items = [convert(k, v) for k, v in batch]

                    def put(vtxn, items=items, dbi=vdb[name]):
                        vtxn.cursor(db=dbi).putmulti(items)
                    views.write(put)
    views.write(lambda vtxn: views.set_watermark(vtxn, event_log.last_position()))


def _record(raw: bytes, positions) -> bytes:
    """A session or user record: its last eid as 16 bytes, its tail's keys as positions."""
    record = unpackb(raw)
    record[R_EID] = eid_to_key(record[R_EID])
    record[R_TAIL] = positions(record[R_TAIL])
    return packb(record)
