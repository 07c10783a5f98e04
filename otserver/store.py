"""LMDB storage: one environment, named databases, batched writes, reads. No asyncio here.

Databases (keys are bytes; values msgpack unless said):
  events          eid(16, UUIDv7, time-ordered)  -> [ts, si, sid, uid, props, captured, seq]
                  (seq: the event's place in its session, from 0)
  sessions        site(8) + ident(sid)                   -> record (see model.fold)
  users           site(8) + ident(uid)                   -> record
  session_chunks  model.chunk_key(session key, n)        -> event keys seq 64n..64n+63, 16 bytes each
                  (the latest event_count % 64 keys stay in the session record's tail, so most
                  events add no page beyond their session's own)
  user_sessions   user key     (dupsort)                 -> first eid(16) + ident(sid), in time order
  session_users   session key  (dupsort)                 -> user key (every user seen in the session)
  user_pairs      pair_key(user key, session key)(16)    -> first eid(16) of the user in the session
  expiry          hour(4) + b"S"|b"U" + record key       -> b""  (sessions and users by the hour of
                  their last event: the sweeper's range scan; moved only when a record's last
                  event falls in a new hour)
  site_events     site(8) + eid(16)                      -> b""  (a site's events in time order)
  stats           site(8) + minute(4)                    -> [events, new sessions, new users],
                  counted per batch at commit (events sent with increment=false not counted)
  commit_log      commit number(8)                       -> the batch's event keys, 16 bytes each
                  (kept only by workers, `keep_commit_log`: LMDB serialises commits across
                  processes, so this is every worker's commits in one order; live streams
                  follow it; the last COMMIT_LOG_KEEP commits are kept)
  sites           site(8)                                -> [si, first_ts]
  tokens          sha256(token)(32)                      -> [site, created_ms, label]

Invariants:
- One write transaction per batch holds the events, their session and user folds (read-modify-
  write inside the transaction, so several processes may share the environment) and every index
  entry; it commits synced, or nothing of the batch is stored.
- The map grows by itself (doubling) up to `max_store_bytes`; past that a batch raises StoreFull.
  A map grown by a sibling process is adopted (MapResizedError).
- Resizing needs no transaction open in this process: reads and the resize share `_resize_lock`.
- Exactly one thread of a process writes: the writer (or a CLI command, which has no writer).
- Retention (`sweep_step`) deletes, in small transactions, events older than the TTL (oldest
  first: the events database is in time order) and then sessions and users whose last event is
  older than it, with every index entry that names them.
"""
from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager

import lmdb
import msgpack

from .errors import StoreFailed, StoreFull
from .model import (R_COUNT, R_LAST, R_OTHER, R_TAIL, SESSION_CHUNK, Event, chunk_key, fold,
                    ident_key, key_to_eid, pair_key, session_key, site_key, user_key)

_DB_NAMES = ("events", "sessions", "users", "session_chunks", "user_sessions", "session_users",
             "user_pairs", "expiry", "site_events", "stats", "commit_log", "sites", "tokens",
             "meta")
COMMIT_LOG_KEEP = 4096
MINUTE_MS = 60_000
_DUPSORT = {"user_sessions": {"dupsort": True}, "session_users": {"dupsort": True}}
HOUR_MS = 3_600_000
KIND_SESSION, KIND_USER = b"S", b"U"
SCHEMA_VERSION = b"1"

packb = msgpack.Packer(use_bin_type=True).pack  # one Packer: no allocation per call
unpackb = msgpack.unpackb


class Store:
    def __init__(self, path: str, *, initial_bytes: int = 64 << 20, max_bytes: int = 64 << 30,
                 readonly: bool = False, sync: bool = True):
        self.path = path
        self.max_bytes = max_bytes
        if not readonly:
            os.makedirs(path, exist_ok=True)
        existing = _file_size(os.path.join(path, "data.mdb"))
        self.env = lmdb.open(
            path, map_size=max(initial_bytes, existing), max_dbs=len(_DB_NAMES) + 2,
            readonly=readonly, sync=sync, metasync=sync, readahead=False, meminit=False,
            max_readers=1024, max_spare_txns=4, create=not readonly)
        self._resize_lock = threading.Lock()
        if not readonly:
            self.env.reader_check()  # clear slots left by killed processes
        if readonly:  # handles opened in a read transaction die with it: open them bare
            self.db = {name: self.env.open_db(name.encode(), create=False,
                                              **_DUPSORT.get(name, {}))
                       for name in _DB_NAMES}
        else:
            with self.env.begin(write=True) as txn:
                self.db = {name: self.env.open_db(name.encode(), txn=txn,
                                                  **_DUPSORT.get(name, {}))
                           for name in _DB_NAMES}
                if txn.get(b"schema", db=self.db["meta"]) is None:
                    txn.put(b"schema", SCHEMA_VERSION, db=self.db["meta"])
        self._known_sites: set[bytes] = set()
        self.page_size = self.env.stat()["psize"]
        self.keep_commit_log = False

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ map size

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def _grow(self) -> None:
        """Double the map, up to the cap. Called with no transaction open in this process."""
        current = self.map_size()
        if current >= self.max_bytes:
            raise StoreFull(f"store is at its size cap ({self.max_bytes} bytes)")
        with self._resize_lock:
            self.env.set_mapsize(min(self.max_bytes, current * 2))

    def _adopt_size(self) -> None:
        """A sibling process grew the map: take its size."""
        with self._resize_lock:
            self.env.set_mapsize(0)

    @contextmanager
    def read(self):
        """A read transaction; the map is not resized while it is open."""
        with self._resize_lock:
            while True:
                try:
                    txn = self.env.begin(buffers=False)
                    break
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)
            try:
                yield txn
            finally:
                txn.abort()

    def write(self, apply, *args):
        """Run apply(txn, *args) in one write transaction and commit it, growing the map as needed.

        Raises StoreFull (cap or disk) or StoreFailed; in either case nothing was stored.
        """
        while True:
            txn = None
            try:
                txn = self.env.begin(write=True)
                result = apply(txn, *args)
                txn.commit()
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
                if _is_disk_full(exc):
                    raise StoreFull(f"disk full: {exc}") from exc
                raise StoreFailed(str(exc)) from exc

    # ------------------------------------------------------------------ ingest

    def write_batch(self, events: list[Event]) -> None:
        self.write(self._apply_batch, events)

    def _apply_batch(self, txn, events: list[Event]) -> None:
        db = self.db
        events_cur = txn.cursor(db=db["events"])
        sessions_db, users_db = db["sessions"], db["users"]
        sessions: dict[bytes, list] = {}
        users: dict[bytes, list] = {}
        loaded_last: dict[bytes, int | None] = {}  # record key -> its last_ts as stored before
        site_events = db["site_events"]
        counters: dict[bytes, list] = {}  # site + minute -> [events, new sessions, new users]
        get = txn.get
        put = txn.put
        chunk_bytes = SESSION_CHUNK * 16
        for ev in events:
            site = site_key(ev.si)
            if site not in self._known_sites:
                self._note_site(txn, site, ev)
            put(site + ev.key, b"", db=site_events)
            counted = ev.props.get("increment") != "false"
            if counted:
                minute = site + (ev.ts // MINUTE_MS).to_bytes(4, "big")
                counter = counters.get(minute)
                if counter is None:
                    counter = counters[minute] = [0, 0, 0]
                counter[0] += 1

            skey = site + ident_key(ev.sid)
            session = sessions.get(skey) or _load(get, skey, sessions_db, KIND_SESSION, loaded_last)
            previous_uid = session[R_OTHER] if session is not None else None
            seq = session[R_COUNT] if session is not None else 0
            if session is None and counted:
                counter[1] += 1
            session = sessions[skey] = fold(session, ev, ev.sid, ev.uid)
            tail = session[R_TAIL] = session[R_TAIL] + ev.key
            if len(tail) == chunk_bytes:
                put(chunk_key(skey, seq // SESSION_CHUNK), tail, db=db["session_chunks"])
                session[R_TAIL] = b""

            value = packb([ev.ts, ev.si, ev.sid, ev.uid, ev.props, ev.captured, seq])
            if not events_cur.put(ev.key, value, append=True):
                if not events_cur.put(ev.key, value, overwrite=False):
                    raise StoreFailed(f"duplicate eid {ev.eid}")

            ukey = site + ident_key(ev.uid)
            user = users.get(ukey) or _load(get, ukey, users_db, KIND_USER, loaded_last)
            if user is None and counted:
                counter[2] += 1
            users[ukey] = fold(user, ev, ev.uid, ev.sid)

            # The user's list of sessions gains this session the first time the user is in it.
            if previous_uid != ev.uid:
                pair = pair_key(ukey, skey)
                if previous_uid is None or get(pair, db=db["user_pairs"]) is None:
                    put(pair, ev.key, db=db["user_pairs"])
                    put(ukey, ev.key + skey[8:], db=db["user_sessions"])
                    put(skey, ukey, db=db["session_users"])

        for kind, records, target in ((KIND_SESSION, sessions, sessions_db),
                                      (KIND_USER, users, users_db)):
            for key, record in records.items():
                put(key, packb(record), db=target)
                self._move_expiry(txn, kind, key, loaded_last[kind + key], record[R_LAST])
        if self.keep_commit_log:
            self._log_commit(txn, events)
        for key, counter in counters.items():
            raw = get(key, db=db["stats"])
            if raw is not None:
                counter = [a + b for a, b in zip(unpackb(raw), counter)]
            put(key, packb(counter), db=db["stats"])

    def _log_commit(self, txn, events: list[Event]) -> None:
        meta, log = self.db["meta"], self.db["commit_log"]
        raw = txn.get(b"commit_seq", db=meta)
        number = int.from_bytes(raw, "big") + 1 if raw is not None else 1
        txn.put(b"commit_seq", number.to_bytes(8, "big"), db=meta)
        txn.put(number.to_bytes(8, "big"), b"".join(ev.key for ev in events), db=log)
        if number % 256 == 0:  # trim now and then: the oldest entries past the kept window
            cur = txn.cursor(db=log)
            cur.first()
            while cur.key() and int.from_bytes(cur.key(), "big") <= number - COMMIT_LOG_KEEP:
                cur.delete()

    def commits_after(self, txn, number: int | None) -> tuple[int, list[bytes]]:
        """(the last commit number, event keys of the logged commits after `number`)."""
        raw = txn.get(b"commit_seq", db=self.db["meta"])
        last = int.from_bytes(raw, "big") if raw is not None else 0
        if number is None or number >= last:
            return last, []
        keys: list[bytes] = []
        cur = txn.cursor(db=self.db["commit_log"])
        if cur.set_range((number + 1).to_bytes(8, "big")):
            for _, value in cur:
                keys += [value[i:i + 16] for i in range(0, len(value), 16)]
        return last, keys

    def _move_expiry(self, txn, kind: bytes, key: bytes, old_ts: int | None, new_ts: int) -> None:
        if old_ts is not None:
            if old_ts // HOUR_MS == new_ts // HOUR_MS:
                return
            txn.delete(_expiry_key(kind, key, old_ts), db=self.db["expiry"])
        txn.put(_expiry_key(kind, key, new_ts), b"", db=self.db["expiry"])

    # ------------------------------------------------------------------ erasure

    def erase_user(self, si: str, uid: str) -> dict | None:
        """Erase a user: its events, its record, and every trace in sessions it shared (they are
        folded again from the other users' events; a session left empty goes). None: no user."""
        return self.write(self._apply_erase, si, uid)

    def _apply_erase(self, txn, si: str, uid: str) -> dict | None:
        db = self.db
        site = site_key(si)
        ukey = site + ident_key(uid)
        raw = txn.get(ukey, db=db["users"])
        if raw is None:
            return None
        done = {"events": 0, "sessions_removed": 0, "sessions_refolded": 0}
        cur = txn.cursor(db=db["user_sessions"])
        entries = list(cur.iternext_dup()) if cur.set_key(ukey) else []
        for entry in entries:
            skey = site + entry[16:]
            session_raw = txn.get(skey, db=db["sessions"])
            if session_raw is None:
                continue
            session = unpackb(session_raw)
            kept = []
            for key in self.session_event_keys(txn, session, skey, 0, session[R_COUNT]):
                event_raw = txn.get(key, db=db["events"])
                if event_raw is None:
                    continue
                value = unpackb(event_raw)
                if value[3] == uid:
                    txn.delete(key, db=db["events"])
                    txn.delete(site + key, db=db["site_events"])
                    done["events"] += 1
                else:
                    kept.append((key, value))
            if not kept:
                self._delete_session(txn, skey)
                txn.delete(_expiry_key(KIND_SESSION, skey, session[R_LAST]), db=db["expiry"])
                done["sessions_removed"] += 1
                continue
            self._refold_session(txn, skey, session, kept)
            txn.delete(pair_key(ukey, skey), db=db["user_pairs"])
            txn.delete(skey, ukey, db=db["session_users"])
            done["sessions_refolded"] += 1
        self._delete_user(txn, ukey)
        txn.delete(_expiry_key(KIND_USER, ukey, unpackb(raw)[R_LAST]), db=db["expiry"])
        return done

    def _refold_session(self, txn, skey: bytes, old: list, kept: list) -> None:
        """Rebuild a session record, its chunks and its events' places from `kept` events."""
        db = self.db
        self._delete_chunks(txn, skey)
        record = None
        for seq, (key, value) in enumerate(kept):
            ts, si, sid, uid, props, captured, old_seq = value
            record = fold(record, Event(key_to_eid(key), key, ts, si, sid, uid, props, captured),
                          sid, uid)
            tail = record[R_TAIL] = record[R_TAIL] + key
            if len(tail) == SESSION_CHUNK * 16:
                txn.put(chunk_key(skey, seq // SESSION_CHUNK), tail, db=db["session_chunks"])
                record[R_TAIL] = b""
            if old_seq != seq:
                value[6] = seq
                txn.put(key, packb(value), db=db["events"])
        txn.put(skey, packb(record), db=db["sessions"])
        self._move_expiry(txn, KIND_SESSION, skey, old[R_LAST], record[R_LAST])

    # ------------------------------------------------------------------ retention

    def sweep_step(self, now_ms: int, ttl_ms: int, limit: int = 1000) -> dict:
        """Delete up to `limit` expired things in one transaction.

        -> {"events": n, "sessions": n, "users": n, "more": bool}; `more` says a further step
        would find more to delete.
        """
        return self.write(self._apply_sweep, now_ms - ttl_ms, limit)

    def _apply_sweep(self, txn, cutoff_ms: int, limit: int) -> dict:
        db = self.db
        done = {"events": 0, "sessions": 0, "users": 0, "more": False}
        budget = limit
        # Events: the database is in time order, so expired ones are a prefix of it.
        cutoff_key = (max(cutoff_ms, 0) << 80).to_bytes(16, "big")
        # (Cursor.delete() moves to the next entry, but says only that it deleted: the cursor
        # is past the end when key() is empty.)
        cur = txn.cursor(db=db["events"])
        cur.first()
        while cur.key() and cur.key() < cutoff_key:
            if budget == 0:
                done["more"] = True
                return done
            ts, si, sid, uid, props, captured, seq = unpackb(cur.value())
            if seq % SESSION_CHUNK == SESSION_CHUNK - 1:  # the last of its chunk: the chunk goes
                txn.delete(chunk_key(session_key(si, sid), seq // SESSION_CHUNK),
                           db=db["session_chunks"])
            txn.delete(site_key(si) + cur.key(), db=db["site_events"])
            cur.delete()
            done["events"] += 1
            budget -= 1
        # Counters of minutes before the cutoff, site by site.
        cutoff_minute = (max(cutoff_ms, 0) // MINUTE_MS).to_bytes(4, "big")
        stats = txn.cursor(db=db["stats"])
        for site in txn.cursor(db=db["sites"]).iternext(values=False):
            stats.set_range(site)
            while stats.key() and stats.key()[:8] == site and stats.key()[8:] < cutoff_minute:
                if budget == 0:
                    done["more"] = True
                    return done
                stats.delete()
                budget -= 1
        # Sessions and users whose last event is older than the cutoff, hour by hour.
        cutoff_hour = cutoff_ms // HOUR_MS
        cur = txn.cursor(db=db["expiry"])
        cur.first()
        young = 0  # skipped in the cutoff's own hour; bounded so a step stays small
        while young < 20 * limit:
            entry = cur.key()
            if not entry or int.from_bytes(entry[:4], "big") > cutoff_hour:
                break
            if budget == 0:
                done["more"] = True
                return done
            kind, key = entry[4:5], entry[5:]
            target = db["sessions"] if kind == KIND_SESSION else db["users"]
            raw = txn.get(key, db=target)
            if raw is not None and unpackb(raw)[R_LAST] >= cutoff_ms:
                cur.next()  # the cutoff's own hour: this one is still young
                young += 1
                continue
            if raw is not None:
                if kind == KIND_SESSION:
                    self._delete_session(txn, key)
                    done["sessions"] += 1
                else:
                    self._delete_user(txn, key)
                    done["users"] += 1
            cur.delete()
            budget -= 1
        return done

    def _delete_chunks(self, txn, skey: bytes) -> None:
        """Every chunk of a session's event keys."""
        prefix = chunk_key(skey, 0)[:-4]
        cur = txn.cursor(db=self.db["session_chunks"])
        cur.set_range(prefix)
        while cur.key()[:-4] == prefix:
            cur.delete()

    def _delete_session(self, txn, skey: bytes) -> None:
        db = self.db
        self._delete_chunks(txn, skey)
        cur = txn.cursor(db=db["session_users"])
        if cur.set_key(skey):
            for ukey in list(cur.iternext_dup()):
                pair = pair_key(ukey, skey)
                first = txn.get(pair, db=db["user_pairs"])
                if first is not None:
                    txn.delete(ukey, first + skey[8:], db=db["user_sessions"])
                    txn.delete(pair, db=db["user_pairs"])
            txn.delete(skey, db=db["session_users"])
        txn.delete(skey, db=db["sessions"])

    def _delete_user(self, txn, ukey: bytes) -> None:
        db = self.db
        cur = txn.cursor(db=db["user_sessions"])
        if cur.set_key(ukey):
            for entry in list(cur.iternext_dup()):
                skey = ukey[:8] + entry[16:]
                txn.delete(pair_key(ukey, skey), db=db["user_pairs"])
                txn.delete(skey, ukey, db=db["session_users"])
            txn.delete(ukey, db=db["user_sessions"])
        txn.delete(ukey, db=db["users"])

    def _note_site(self, txn, site: bytes, ev: Event) -> None:
        if txn.get(site, db=self.db["sites"]) is None:
            txn.put(site, packb([ev.si, ev.ts]), db=self.db["sites"])
        # Remembered only once the batch commits would be exact; remembering now is harmless:
        # at worst a failed batch makes a later batch skip one idempotent put of the site.
        self._known_sites.add(site)

    # ------------------------------------------------------------------ reads

    def get_event(self, txn, key: bytes) -> tuple | None:
        """-> (ts, si, sid, uid, props, captured) or None."""
        raw = txn.get(key, db=self.db["events"])
        return unpackb(raw) if raw is not None else None

    def get_session(self, txn, si: str, sid: str) -> list | None:
        return self.get_session_by_key(txn, session_key(si, sid))

    def get_user(self, txn, si: str, uid: str) -> list | None:
        raw = txn.get(user_key(si, uid), db=self.db["users"])
        return unpackb(raw) if raw is not None else None

    def session_event_keys(self, txn, record: list, skey: bytes, start: int,
                           limit: int) -> list[bytes]:
        """Keys of a session's events number start.. (at most limit), in arrival order."""
        count = record[R_COUNT]
        end = min(count, start + limit)
        keys: list[bytes] = []
        spilled = count - len(record[R_TAIL]) // 16
        position = start
        while position < min(end, spilled):
            number, offset = divmod(position, SESSION_CHUNK)
            chunk = txn.get(chunk_key(skey, number), db=self.db["session_chunks"]) or b""
            take = min(SESSION_CHUNK - offset, end - position)
            keys += [chunk[i:i + 16] for i in range(offset * 16, (offset + take) * 16, 16)]
            position += take
        tail = record[R_TAIL]
        for i in range(max(position, spilled), end):
            at = (i - spilled) * 16
            keys.append(tail[at:at + 16])
        return keys

    def user_session_entries(self, txn, si: str, uid: str, after: bytes | None,
                             limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (entry, session key) of a user, in order of first event, after `after`."""
        ukey = user_key(si, uid)
        site = ukey[:8]
        cur = txn.cursor(db=self.db["user_sessions"])
        if after is None:
            found = cur.set_key(ukey)
        else:
            found = cur.set_range_dup(ukey, after)
            if found and cur.value() == after:
                found = cur.next_dup()
        entries = []
        while found and len(entries) < limit:
            entry = cur.value()
            entries.append((entry, site + entry[16:]))
            found = cur.next_dup()
        return entries

    def site_event_keys(self, txn, si: str, start: bytes, end: bytes, limit: int) -> list[bytes]:
        """Keys of a site's events with start <= key < end, in time order, at most limit."""
        site = site_key(si)
        cur = txn.cursor(db=self.db["site_events"])
        keys: list[bytes] = []
        if not cur.set_range(site + start):
            return keys
        stop = site + end
        for key in cur.iternext(values=False):
            if key >= stop or len(keys) >= limit:
                break
            keys.append(key[8:])
        return keys

    def minute_counters(self, txn, si: str, first_minute: int, end_minute: int):
        """(minute, [events, new sessions, new users]) of a site, first <= minute < end."""
        site = site_key(si)
        cur = txn.cursor(db=self.db["stats"])
        first_minute = max(0, min(first_minute, 0xFFFFFFFF))
        if not cur.set_range(site + first_minute.to_bytes(4, "big")):
            return
        stop = site + max(0, min(end_minute, 0xFFFFFFFF)).to_bytes(4, "big")
        for key, value in cur:
            if key >= stop:
                break
            yield int.from_bytes(key[8:], "big"), unpackb(value)

    def get_session_by_key(self, txn, skey: bytes) -> list | None:
        raw = txn.get(skey, db=self.db["sessions"])
        return unpackb(raw) if raw is not None else None

    def counts(self) -> dict:
        with self.read() as txn:
            return {name: txn.stat(self.db[name])["entries"] for name in
                    ("events", "sessions", "users", "sites", "tokens")}

    def event_keys(self) -> list[str]:
        """Every stored eid (for tests and small stores)."""
        with self.read() as txn:
            return [key_to_eid(k) for k in txn.cursor(db=self.db["events"]).iternext(values=False)]

    # ------------------------------------------------------------------ tokens

    def put_token(self, digest: bytes, site: str, created_ms: int, label: str) -> None:
        self.write(lambda txn: txn.put(digest, packb([site, created_ms, label]), db=self.db["tokens"]))

    def find_token(self, digest: bytes) -> list | None:
        with self.read() as txn:
            raw = txn.get(digest, db=self.db["tokens"])
        return unpackb(raw) if raw is not None else None

    def list_tokens(self) -> list[tuple[bytes, list]]:
        with self.read() as txn:
            return [(k, unpackb(v)) for k, v in txn.cursor(db=self.db["tokens"])]

    def delete_tokens(self, digests: list[bytes]) -> int:
        def apply(txn):
            return sum(1 for d in digests if txn.delete(d, db=self.db["tokens"]))
        return self.write(apply)


def _load(get, key: bytes, db, kind: bytes, loaded_last: dict) -> list | None:
    """A session or user record as stored before this batch (None: new), noting its last time
    so the batch can move its expiry entry."""
    raw = get(key, db=db)
    record = unpackb(raw) if raw is not None else None
    loaded_last[kind + key] = record[R_LAST] if record is not None else None
    return record


def _expiry_key(kind: bytes, key: bytes, last_ts: int) -> bytes:
    return (last_ts // HOUR_MS).to_bytes(4, "big") + kind + key


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_disk_full(exc: lmdb.Error) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
