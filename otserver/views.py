"""The views: sessions, users, their indexes, the site listing, the counters and the expiry
index, every one of them folded from the log. No asyncio here.

Environment `<data dir>/views` (keys are bytes; values msgpack unless said):
  sessions        site(8) + ident(sid)                -> record (model.fold; tail of positions)
  users           site(8) + ident(uid)                -> record
  session_chunks  model.chunk_key(session key, n)     -> positions of the session's events
                  number 64n..64n+63, 8 bytes each (the latest event_count % 64 stay in the
                  record's tail, so most events add no page beyond their session's own)
  user_sessions   user key     (dupsort)              -> first position(8) + ident(sid)
  session_users   session key  (dupsort)              -> user key
  user_pairs      pair_key(user key, session key)(16) -> first position(8) of the user there
  expiry          hour(4) + b"S"|b"U" + record key    -> b""  (records by the hour of their
                  last event: the sweeper's range scan; moved only when that hour changes)
  site_events     site(8) + position(8)               -> b""  (a site's events in log order)
  stats           site(8) + minute(4)                 -> [events, new sessions, new users,
                  the same three for bots] (events sent with increment=false are not
                  counted; no entry is all zeros; one of 0.2 holds the first three only)
  stats_hours     site(8) + hour(4)                   -> the same six, added up per hour (what a
                  report of hours or days reads: 720 records for 30 days, not 43,200)
  sites           site(8)                             -> [si, first_ts, last_ts]
  uniques, breakdowns, site_days: the report counters (tallies.py)
  meta            b"schema" -> SCHEMA, b"watermark" -> position(8),
                  b"purge" -> [[position, result, [positions]], ...] (erasures whose purge of
                  the log is still to do: see folder.py)

Invariants:
- `fold` applies the log entries after the watermark in position order and writes the new
  watermark in the same transaction: after any crash the views resume exactly where they
  were (no entry folded twice, none missed), and a reader never sees half a batch.
- The views equal a fold of the whole log from scratch (`rebuild`): an erasure undoes what its
  user's events added, counters included. Retention is the one exception: a record keeps the
  history of events the sweeper has since deleted from the log.
- Each index has one write helper and one delete helper below; folding, erasure and the
  sweeper (sweeper.py) go through them.
"""
from __future__ import annotations

import os

from .agents import classify
from .lmdbenv import Environment
from .model import (POSITION_BYTES, R_COUNT, R_FIRST, R_LAST, R_OTHER, R_TAIL, SESSION_CHUNK,
                    LogEntry, chunk_key, fold, ident_key, packb, pair_key, position_bytes, site_key,
                    split_positions, unpackb)
from .tallies import DAY_MS, NAMES as TALLY_NAMES, Reporting, Tally, open_day, period_bytes

SCHEMA = b"2"
NAMES = ("sessions", "users", "session_chunks", "user_sessions", "session_users", "user_pairs",
         "expiry", "site_events", "stats", "stats_hours", "sites") + TALLY_NAMES
DUPSORT = frozenset(("user_sessions", "session_users"))
KIND_SESSION, KIND_USER = b"S", b"U"
MINUTE_MS = 60_000
HOUR_MS = 3_600_000
CHUNK_BYTES = SESSION_CHUNK * POSITION_BYTES
NO_POSITION = 0  # a position no entry has (positions start at 1)


def minute_key(site: bytes, ts: int) -> bytes:
    return site + (ts // MINUTE_MS).to_bytes(4, "big")


def expiry_key(kind: bytes, key: bytes, last_ts: int) -> bytes:
    return (last_ts // HOUR_MS).to_bytes(4, "big") + kind + key


class Views:
    def __init__(self, path: str, *, initial_bytes: int = 64 << 20, max_bytes: int = 64 << 30,
                 readonly: bool = False, environment: Environment | None = None,
                 reporting: Reporting | None = None):
        # Data pages are synced at each commit and the meta page is not (MDB_NOMETASYNC): a
        # machine crash may undo the last fold, which resumes from the watermark it restores;
        # the database itself stays whole. (`environment`: share one, as bench/envs.py does.)
        self.store = environment or Environment(
            path, NAMES, schema=SCHEMA, dupsort=DUPSORT, initial_bytes=initial_bytes,
            max_bytes=max_bytes, readonly=readonly, metasync=False, what="views")
        self.path = path
        self.reporting = reporting or Reporting()
        self.db = self.store.db
        self.read = self.store.read
        self.write = self.store.write
        if not readonly and self.store.db["stats_hours"] is not None:
            self.write(self._hours_once)

    def _hours_once(self, txn) -> None:
        """Views of 0.2 had minute counters only: add theirs up into hours, once."""
        if txn.get(b"stats_hours", db=self.db["meta"]) is None:
            self.count_hours(txn)
            txn.put(b"stats_hours", b"1", db=self.db["meta"])

    def count_hours(self, txn) -> None:
        """stats_hours from the minute counters, from scratch."""
        txn.drop(self.db["stats_hours"], delete=False)
        hours: dict[bytes, list] = {}
        for key, raw in txn.cursor(db=self.db["stats"]):
            counter = unpackb(raw)
            hour = hours.setdefault(_hour_key(key), [0] * 6)
            for i, n in enumerate(counter):
                hour[i] += n
        put = txn.cursor(db=self.db["stats_hours"]).put
        for key, counter in hours.items():
            put(key, packb(counter))

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------ the watermark

    def watermark_in(self, txn) -> int:
        raw = txn.get(b"watermark", db=self.db["meta"])
        return int.from_bytes(raw, "big") if raw is not None else 0

    def watermark(self) -> int:
        with self.read() as txn:
            return self.watermark_in(txn)

    def set_watermark(self, txn, position: int) -> None:
        txn.put(b"watermark", position_bytes(position), db=self.db["meta"])

    # ------------------------------------------------------------------ folding

    def fold(self, txn, entries, log, log_txn) -> list:
        """Apply decoded log entries (in position order, all after the watermark) and move
        the watermark past the last one. -> the erasures done: [position, result, purge]."""
        batch = _Batch(self, txn)
        erasures = []
        run = []  # the events since the last erasure
        for entry in entries:
            if entry.is_event:
                run.append(entry)
                continue
            batch.add(run)
            batch.flush()
            run = []
            result, purge = self.erase_user(txn, log, log_txn, entry.si, entry.uid)
            erasures.append([entry.position, result, purge])
            batch = _Batch(self, txn)
        batch.add(run)
        batch.flush()
        if entries:
            self.set_watermark(txn, entries[-1].position)
        if erasures:
            self.put_pending_purges(txn, self.pending_purges(txn) + erasures)
        return erasures

    def count_reports(self, log, chunk: int = 20_000) -> None:
        """Fill the report counters (tallies.py) from the log's events up to the watermark,
        leaving the records alone: for views converted from a store that had none (migrate.py).
        The sites' last event times are set from the log too."""
        last: dict[bytes, int] = {}
        after, end = 0, self.watermark()
        while after < end:
            with log.read() as log_txn:
                entries = [LogEntry(p, raw) for p, raw in
                           log.entries_after(log_txn, after, chunk, until=end)]
            if not entries:
                break
            after = entries[-1].position

            def count(txn, entries=entries):
                tally = Tally(txn, self.db, self.reporting)
                for entry in entries:
                    if entry.is_event:
                        site = site_key(entry.si)
                        tally.add(site, entry, entry.counted())
                        last[site] = entry.ts
                tally.flush()
            self.write(count)

        def finish(txn):
            tally = Tally(txn, self.db, self.reporting)
            for site, ts in last.items():
                raw = txn.get(site, db=self.db["sites"])
                if raw is None:
                    continue
                record = unpackb(raw)
                txn.put(site, packb([record[0], record[1], ts]), db=self.db["sites"])
                cur = txn.cursor(db=self.db["site_days"])
                days = set()
                if cur.set_range(site):
                    for key in cur.iternext(values=False):
                        if key[:8] != site:
                            break
                        days.add(int.from_bytes(key[8:], "big"))
                tally.derive_days_again(site, sorted(d for d in days if d < ts // DAY_MS))
        self.write(finish)
        self.write(self.count_hours)

    def pending_purges(self, txn) -> list:
        raw = txn.get(b"purge", db=self.db["meta"])
        return unpackb(raw) if raw is not None else []

    def put_pending_purges(self, txn, purges: list) -> None:
        if purges:
            txn.put(b"purge", packb(purges), db=self.db["meta"])
        else:
            txn.delete(b"purge", db=self.db["meta"])

    def drop_all(self, txn) -> None:
        """Empty every view and reset the watermark: the start of a rebuild."""
        for name in NAMES:
            txn.drop(self.db[name], delete=False)
        self.set_watermark(txn, 0)
        self.put_pending_purges(txn, [])

    # ------------------------------------------------------------------ erasure

    def erase_user(self, txn, log, log_txn, si: str, uid: str):
        """Erase a user as of now: its events (from every view; the caller purges them from
        the log), its record, its links, and what its events added to the counters. A session
        it shared is folded again from the other users' events; one left empty goes.
        -> (result or None when there is no such user, positions to purge from the log)."""
        db = self.db
        site = site_key(si)
        ukey = site + ident_key(uid)
        raw = txn.get(ukey, db=db["users"])
        if raw is None:
            return None, []
        user = unpackb(raw)
        done = {"events": 0, "sessions_removed": 0, "sessions_refolded": 0}
        purge: list[int] = []
        deltas: dict[bytes, list] = {}
        user_first = None
        erased_hours: set[int] = set()
        erased_days: dict[int, int] = {}  # day -> events erased
        cur = txn.cursor(db=db["user_sessions"])
        links = list(cur.iternext_dup()) if cur.set_key(ukey) else []
        for link in links:
            skey = site + link[POSITION_BYTES:]
            session_raw = txn.get(skey, db=db["sessions"])
            if session_raw is None:
                continue
            session = unpackb(session_raw)
            positions = self.session_positions(txn, session, skey, 0, session[R_COUNT])
            first = log.get(log_txn, positions[0]) if positions else None
            kept, erased = [], []
            for position in positions:
                entry = first if first is not None and position == first.position \
                    else log.get(log_txn, position)
                if entry is not None:  # None: swept since (or lost before a migration)
                    (erased if entry.uid == uid else kept).append(entry)
            for entry in erased:
                purge.append(entry.position)
                erased_hours.add(entry.ts // HOUR_MS)
                erased_days[entry.ts // DAY_MS] = erased_days.get(entry.ts // DAY_MS, 0) + 1
                self._delete_site_event(txn, site, entry.position)
                if entry.counted():
                    _count(deltas, site, entry, 0, -1)
                if user_first is None or entry.position < user_first.position:
                    user_first = entry
            created_by_user = first is not None and first.uid == uid and first.counted()
            if not kept:
                if created_by_user:
                    _count(deltas, site, first, 1, -1)
                self._delete_session(txn, skey)
                done["sessions_removed"] += 1
                continue
            if first is not None and first.uid == uid:  # the session now starts later
                if created_by_user:
                    _count(deltas, site, first, 1, -1)
                if kept[0].counted():
                    _count(deltas, site, kept[0], 1, +1)
            self._refold_session(txn, skey, session, kept)
            self._unlink(txn, ukey, skey)
            done["sessions_refolded"] += 1
        done["events"] = len(purge)
        if user_first is not None and user_first.ts == user[R_FIRST] and user_first.counted():
            _count(deltas, site, user_first, 2, -1)
        self._delete_user(txn, ukey)
        self._add_counters(txn, deltas)
        if erased_hours:
            self._recount_hours(txn, site, erased_hours, log, log_txn)
        latest_before = open_day(txn, self.db, site)
        self._recheck_site(txn, site, log, log_txn)
        if erased_hours:
            tally = Tally(txn, self.db, self.reporting)
            for entry_day, count in erased_days.items():
                tally.days[site + period_bytes(entry_day)] = -count
            tally.flush()
            latest = open_day(txn, self.db, site)
            tally.derive_days_again(site, sorted(
                day for day in erased_days if latest is None or day < latest))
            if latest is not None and latest_before is not None and latest < latest_before:
                # the site's latest day is earlier now: days from it on are open again
                # (read from their hours), as a fold from scratch leaves them
                tally.drop_days(site, range(latest, latest_before + 1))
        return done, purge

    def _recount_hours(self, txn, site: bytes, hours: set[int], log, log_txn) -> None:
        """After an erasure: the report counters of the site's hours the user was in, counted
        again from the events left in the log (a sketch cannot take an item out), their days
        derived again, and the erased events taken off the events per day."""
        tally = Tally(txn, self.db, self.reporting, days=False)
        tally.forget_hours(site, hours)
        for hour in sorted(hours):
            start = log.position_at_time(log_txn, hour * HOUR_MS)
            end = log.position_at_time(log_txn, (hour + 1) * HOUR_MS)
            for position in self.site_positions(txn, site, start, end, 1 << 62):
                entry = log.get(log_txn, position)
                if entry is not None and entry.is_event:
                    tally.add(site, entry, entry.counted())
        tally.flush()

    def _refold_session(self, txn, skey: bytes, old: list, kept: list) -> None:
        """Rebuild a session record and its chunks from `kept` entries (in log order)."""
        self._delete_chunks(txn, skey)
        record = None
        for seq, entry in enumerate(kept):
            record = fold(record, entry, entry.sid, entry.uid)
            tail = record[R_TAIL] = record[R_TAIL] + position_bytes(entry.position)
            if len(tail) == CHUNK_BYTES:
                self._put_chunk(txn, skey, seq // SESSION_CHUNK, tail)
                record[R_TAIL] = b""
        self._put_record(txn, KIND_SESSION, skey, record, old[R_LAST])

    def _recheck_site(self, txn, site: bytes, log, log_txn) -> None:
        """After an erasure: the site's first and last times are those of its events left."""
        raw = txn.get(site, db=self.db["sites"])
        if raw is None:
            return
        si = unpackb(raw)[0]
        cur = txn.cursor(db=self.db["site_events"])
        first = last = None
        while cur.set_range(site) and cur.key()[:8] == site:
            first = log.get(log_txn, int.from_bytes(cur.key()[8:], "big"))
            if first is not None:
                break
            cur.delete()  # names an entry gone from the log: nothing to keep it for
        if first is None:
            self._delete_site(txn, site)
            return
        found = cur.set_range(site + b"\xff" * 9) and cur.prev() or cur.last()
        while found and cur.key()[:8] == site:  # the last of the site's events left
            last = log.get(log_txn, int.from_bytes(cur.key()[8:], "big"))
            if last is not None:
                break
            found = cur.prev()
        txn.put(site, packb([si, first.ts, (last or first).ts]), db=self.db["sites"])

    # ------------------------------------------------------------------ one helper per index

    def _put_record(self, txn, kind: bytes, key: bytes, record: list, old_last: int | None):
        txn.put(key, packb(record), db=self.db["sessions" if kind == KIND_SESSION else "users"])
        self._move_expiry(txn, kind, key, old_last, record[R_LAST])

    def _delete_session(self, txn, skey: bytes) -> None:
        db = self.db
        raw = txn.get(skey, db=db["sessions"])
        if raw is None:
            return
        self._delete_chunks(txn, skey)
        cur = txn.cursor(db=db["session_users"])
        for ukey in (list(cur.iternext_dup()) if cur.set_key(skey) else []):
            self._unlink(txn, ukey, skey, user_sessions=True)
        self._delete_expiry(txn, KIND_SESSION, skey, unpackb(raw)[R_LAST])
        txn.delete(skey, db=db["sessions"])

    def _delete_user(self, txn, ukey: bytes) -> None:
        db = self.db
        raw = txn.get(ukey, db=db["users"])
        if raw is None:
            return
        cur = txn.cursor(db=db["user_sessions"])
        for link in (list(cur.iternext_dup()) if cur.set_key(ukey) else []):
            self._unlink(txn, ukey, ukey[:8] + link[POSITION_BYTES:])
        txn.delete(ukey, db=db["user_sessions"])
        self._delete_expiry(txn, KIND_USER, ukey, unpackb(raw)[R_LAST])
        txn.delete(ukey, db=db["users"])

    def _put_chunk(self, txn, skey: bytes, number: int, positions: bytes) -> None:
        txn.put(chunk_key(skey, number), positions, db=self.db["session_chunks"])

    def _delete_chunks(self, txn, skey: bytes, below: int | None = None) -> int:
        """A session's chunks; with `below`, only the leading chunks whose every position is
        below it (the sweeper's: their events have left the log). -> chunks deleted."""
        prefix = chunk_key(skey, 0)[:-4]
        cur = txn.cursor(db=self.db["session_chunks"])
        deleted = 0
        cur.set_range(prefix)
        while cur.key()[:-4] == prefix:
            if below is not None and max(split_positions(cur.value())) >= below:
                break  # (a migrated session may list its positions out of order: max, not last)
            cur.delete()
            deleted += 1
        return deleted

    def _link(self, txn, ukey: bytes, skey: bytes, position: bytes) -> None:
        """The user was first seen in the session at `position` (user_sessions, session_users
        and user_pairs: one index of who was in which session, kept three ways)."""
        txn.put(pair_key(ukey, skey), position, db=self.db["user_pairs"])
        txn.put(ukey, position + skey[8:], db=self.db["user_sessions"])
        txn.put(skey, ukey, db=self.db["session_users"])

    def _unlink(self, txn, ukey: bytes, skey: bytes, user_sessions: bool = False) -> None:
        """Undo _link; the user's own user_sessions entry goes too with `user_sessions`
        (when the session goes; when the user goes, its whole list goes at once)."""
        db = self.db
        pair = pair_key(ukey, skey)
        first = txn.get(pair, db=db["user_pairs"])
        if first is not None:
            if user_sessions:
                txn.delete(ukey, first + skey[8:], db=db["user_sessions"])
            txn.delete(pair, db=db["user_pairs"])
        txn.delete(skey, ukey, db=db["session_users"])

    def _move_expiry(self, txn, kind: bytes, key: bytes, old_ts: int | None, new_ts: int) -> None:
        if old_ts is not None:
            if old_ts // HOUR_MS == new_ts // HOUR_MS:
                return
            self._delete_expiry(txn, kind, key, old_ts)
        txn.put(expiry_key(kind, key, new_ts), b"", db=self.db["expiry"])

    def _delete_expiry(self, txn, kind: bytes, key: bytes, last_ts: int) -> None:
        txn.delete(expiry_key(kind, key, last_ts), db=self.db["expiry"])

    def _put_site_event(self, txn, site: bytes, position: bytes) -> None:
        txn.put(site + position, b"", db=self.db["site_events"])

    def _delete_site_event(self, txn, site: bytes, position: int) -> None:
        txn.delete(site + position_bytes(position), db=self.db["site_events"])

    def _add_counters(self, txn, deltas: dict) -> None:
        """Add [events, new sessions, new users, and those of bots] per site-minute, and per
        site-hour; an entry left at zero events goes (it counts nothing any more)."""
        hours: dict[bytes, list] = {}
        for key, delta in deltas.items():
            hour = hours.setdefault(_hour_key(key), [0] * 6)
            for i, n in enumerate(delta):
                hour[i] += n
        self._add_to(txn, self.db["stats"], deltas)
        self._add_to(txn, self.db["stats_hours"], hours)

    @staticmethod
    def _add_to(txn, stats, deltas: dict) -> None:
        for key, delta in deltas.items():
            raw = txn.get(key, db=stats)
            if raw is not None:
                old = unpackb(raw)
                counter = [a + b for a, b in zip(old + [0] * (6 - len(old)), delta)]
            else:
                counter = delta
            if counter[0] > 0 or counter[3] > 0:
                txn.put(key, packb(counter), db=stats)
            elif raw is not None:
                txn.delete(key, db=stats)

    def _delete_counters_before(self, txn, site: bytes, minute: bytes, budget: int) -> int:
        """Up to `budget` of a site's counters of minutes before `minute` (and of hours that
        end before it); -> how many."""
        done = 0
        hour = (int.from_bytes(minute, "big") // 60).to_bytes(4, "big")
        for name, before in (("stats", minute), ("stats_hours", hour)):
            cur = txn.cursor(db=self.db[name])
            cur.set_range(site)
            while done < budget and cur.key()[:8] == site and cur.key()[8:] < before:
                cur.delete()
                done += 1
        return done

    def _note_sites(self, txn, batch: dict) -> dict:
        """Record each site's first and last event time, batch = {site: [si, first ts, last
        ts]} of a batch. -> {site: the days now over whose report counters are to be derived
        from their hours}: the site's latest day before, and the batch's days but its last."""
        sites = txn.cursor(db=self.db["sites"])
        over = {}
        for site, (si, first, latest) in batch.items():
            days = set(range(first // DAY_MS, latest // DAY_MS))
            raw = sites.get(site)
            if raw is not None:
                record = unpackb(raw)
                before = record[2] if len(record) > 2 else record[1]
                if before // DAY_MS < latest // DAY_MS:
                    days.add(before // DAY_MS)
                first = record[1]
                latest = max(latest, before)
            sites.put(site, packb([si, first, latest]))
            if days:
                over[site] = sorted(days)
        return over

    def _delete_site(self, txn, site: bytes) -> None:
        txn.delete(site, db=self.db["sites"])

    # ------------------------------------------------------------------ reads

    def get_session(self, txn, skey: bytes) -> list | None:
        raw = txn.get(skey, db=self.db["sessions"])
        return unpackb(raw) if raw is not None else None

    def get_user(self, txn, ukey: bytes) -> list | None:
        raw = txn.get(ukey, db=self.db["users"])
        return unpackb(raw) if raw is not None else None

    def session_positions(self, txn, record: list, skey: bytes, start: int,
                          limit: int) -> list[int]:
        """Log positions of a session's events number start.. (at most limit), in order
        (NO_POSITION where a chunk has gone with the events it listed)."""
        count = record[R_COUNT]
        end = min(count, start + limit)
        out: list[int] = []
        tail = split_positions(record[R_TAIL])
        spilled = count - len(tail)
        seq = start
        while seq < min(end, spilled):
            number, offset = divmod(seq, SESSION_CHUNK)
            take = min(SESSION_CHUNK - offset, end - seq)
            chunk = txn.get(chunk_key(skey, number), db=self.db["session_chunks"])
            out += split_positions(chunk)[offset:offset + take] if chunk else [NO_POSITION] * take
            seq += take
        if end > spilled:
            out += tail[max(seq, spilled) - spilled:end - spilled]
        return out

    def session_seq(self, txn, record: list, skey: bytes, position: int) -> int | None:
        """The number (from 0) of the session's event at `position`, or None."""
        tail = split_positions(record[R_TAIL])
        spilled = record[R_COUNT] - len(tail)
        if position in tail:
            return spilled + tail.index(position)
        prefix = chunk_key(skey, 0)[:-4]
        cur = txn.cursor(db=self.db["session_chunks"])
        cur.set_range(prefix)
        while cur.key()[:-4] == prefix:  # a walk, not a search: a session migrated from 0.1
            chunk = split_positions(cur.value())  # may list positions out of order
            if position in chunk:
                return int.from_bytes(cur.key()[-4:], "big") * SESSION_CHUNK + chunk.index(position)
            cur.next()
        return None

    def user_session_links(self, txn, ukey: bytes, after: bytes | None,
                           limit: int) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (link, session key) of a user, in order of first event, after `after`."""
        site = ukey[:8]
        cur = txn.cursor(db=self.db["user_sessions"])
        if after is None:
            found = cur.set_key(ukey)
        else:
            found = cur.set_range_dup(ukey, after)
            if found and cur.value() == after:
                found = cur.next_dup()
        out = []
        while found and len(out) < limit:
            link = cur.value()
            out.append((link, site + link[POSITION_BYTES:]))
            found = cur.next_dup()
        return out

    def site_positions(self, txn, site: bytes, start: int, end: int, limit: int) -> list[int]:
        """Positions of a site's events with start <= position < end, in order, at most limit."""
        cur = txn.cursor(db=self.db["site_events"])
        out: list[int] = []
        if not cur.set_range(site + position_bytes(start)):
            return out
        stop = site + position_bytes(end)
        for key in cur.iternext(values=False):
            if key >= stop or len(out) >= limit:
                break
            out.append(int.from_bytes(key[8:], "big"))
        return out

    def hour_counters(self, txn, site: bytes, first_hour: int, end_hour: int):
        """(hour, its six counters) of a site, first <= hour < end."""
        return self.minute_counters(txn, site, first_hour, end_hour, db="stats_hours")

    def minute_counters(self, txn, site: bytes, first_minute: int, end_minute: int,
                        db: str = "stats"):
        """(minute, [events, new sessions, new users(, the bots' three)]) of a site,
        first <= minute < end."""
        if self.db[db] is None:  # a read-only open of views older than the db
            return
        cur = txn.cursor(db=self.db[db])
        first_minute = max(0, min(first_minute, 0xFFFFFFFF))
        if not cur.set_range(site + first_minute.to_bytes(4, "big")):
            return
        stop = site + max(0, min(end_minute, 0xFFFFFFFF)).to_bytes(4, "big")
        for key, value in cur:
            if key >= stop:
                break
            yield int.from_bytes(key[8:], "big"), unpackb(value)

    def counts(self) -> dict:
        with self.read() as txn:
            return {name: txn.stat(self.db[name])["entries"] for name in ("sessions", "users", "sites")}


class _Batch:
    """The records one fold has loaded and changed; written back once, at `flush`. `add` is
    the folder's hot loop: one pass over a run of events with every lookup bound to a local
    (a method call and attribute loads per event were half of its time)."""

    __slots__ = ("views", "txn", "sessions", "users", "sessions_last", "users_last",
                 "counters", "sites", "tally")

    def __init__(self, views: Views, txn):
        self.views = views
        self.txn = txn
        self.sessions: dict[bytes, list] = {}
        self.users: dict[bytes, list] = {}
        self.sessions_last: dict[bytes, int | None] = {}  # last_ts as stored before (None: new)
        self.users_last: dict[bytes, int | None] = {}
        self.counters: dict[bytes, list] = {}  # site + minute -> [events, new sessions, new
        #                                        users, the same for bots]
        self.sites: dict[bytes, list] = {}  # site -> [si, first ts, last ts] of this batch
        self.tally = Tally(txn, views.db, views.reporting)

    def add(self, entries) -> None:
        """Fold a run of events (log order) into the batch's records and the indexes."""
        views, txn = self.views, self.txn
        db = views.db
        # Cursors: a call on one parses no db argument (half the cost of txn.get(..., db=)).
        session_get = txn.cursor(db=db["sessions"]).get
        user_get = txn.cursor(db=db["users"]).get
        pair_get = txn.cursor(db=db["user_pairs"]).get
        site_event_put = txn.cursor(db=db["site_events"]).put
        sessions, users, counters, sites = self.sessions, self.users, self.counters, self.sites
        sessions_last, users_last = self.sessions_last, self.users_last
        tally_add = self.tally.add
        minute_of = None, None, None  # the last (site, minute) counted, and its counter
        for e in entries:
            site = site_key(e.si)
            seen = sites.get(site)
            if seen is None:
                sites[site] = [e.si, e.ts, e.ts]
            else:
                seen[2] = e.ts
            position = position_bytes(e.position)
            site_event_put(site + position, b"")  # views._put_site_event
            counter = None
            counted = e.props.get("increment") != "false"
            bot = tally_add(site, e, counted)
            if counted:
                minute = e.ts // MINUTE_MS
                if minute_of[0] == site and minute_of[1] == minute:
                    counter = minute_of[2]
                else:
                    key = site + minute.to_bytes(4, "big")
                    counter = counters.get(key)
                    if counter is None:
                        counter = counters[key] = [0] * 6
                    minute_of = site, minute, counter
                base = 3 if bot else 0
                counter[base] += 1

            skey = site + ident_key(e.sid)
            session = sessions.get(skey)
            if session is None:
                raw = session_get(skey)
                if raw is None:
                    sessions_last[skey] = None
                    previous_uid, seq = None, 0
                    if counter is not None:
                        counter[base + 1] += 1
                else:
                    session = unpackb(raw)
                    sessions_last[skey] = session[R_LAST]
                    previous_uid, seq = session[R_OTHER], session[R_COUNT]
            else:
                previous_uid, seq = session[R_OTHER], session[R_COUNT]
            session = sessions[skey] = fold(session, e, e.sid, e.uid)
            tail = session[R_TAIL] = session[R_TAIL] + position
            if len(tail) == CHUNK_BYTES:
                views._put_chunk(txn, skey, seq // SESSION_CHUNK, tail)
                session[R_TAIL] = b""

            uid = e.uid
            ukey = site + ident_key(uid)
            user = users.get(ukey)
            if user is None:
                raw = user_get(ukey)
                if raw is None:
                    users_last[ukey] = None
                    if counter is not None:
                        counter[base + 2] += 1
                else:
                    user = unpackb(raw)
                    users_last[ukey] = user[R_LAST]
            users[ukey] = fold(user, e, uid, e.sid)

            # The user's list of sessions gains this session the first time the user is in it.
            if previous_uid != uid:
                if previous_uid is None or pair_get(pair_key(ukey, skey)) is None:
                    views._link(txn, ukey, skey, position)

    def flush(self) -> None:
        views, txn = self.views, self.txn
        for kind, records, last, db in (
                (KIND_SESSION, self.sessions, self.sessions_last, views.db["sessions"]),
                (KIND_USER, self.users, self.users_last, views.db["users"])):
            put = txn.cursor(db=db).put
            for key, record in records.items():  # views._put_record, its expiry check inline
                put(key, packb(record))
                old_last = last[key]
                if old_last is None or old_last // HOUR_MS != record[R_LAST] // HOUR_MS:
                    views._move_expiry(txn, kind, key, old_last, record[R_LAST])
        views._add_counters(txn, self.counters)
        over = views._note_sites(txn, self.sites)
        self.tally.flush()
        for site, days in over.items():
            self.tally.derive_days_again(site, days)


def _hour_key(minute_key: bytes) -> bytes:
    return minute_key[:8] + (int.from_bytes(minute_key[8:], "big") // 60).to_bytes(4, "big")


def _count(deltas: dict, site: bytes, entry, index: int, amount: int) -> None:
    """Change one of an event's minute counters (index 0 events, 1 new sessions, 2 new users;
    the bots' three follow)."""
    delta = deltas.setdefault(minute_key(site, entry.ts), [0] * 6)
    delta[index + (3 if classify((entry.captured or {}).get("user_agent")).bot else 0)] += amount


def views_path(data_dir: str) -> str:
    return os.path.join(data_dir, "views")
