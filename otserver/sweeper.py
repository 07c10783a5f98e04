"""Retention: delete what is older than the TTL from the log and the views, in small steps.

`sweep_step(log, views, now_ms, ttl_ms, limit, window_ms)` is one bounded step; `Sweeper` schedules steps
(a pass soon after start, then one every `sweep_interval_s`), with the clock injected. No asyncio.

Invariants:
- A step deletes at most `limit` things: the log's expired prefix first (times never decrease
  along the log, so the expired entries are a prefix of it), then counters of expired minutes
  (and the report counters of expired periods),
  then sessions and users whose last event is older than the TTL (the expiry index); and up to
  `limit` idempotency keys older than their window, in a transaction of their own.
- The sweeper deletes only entries the views have folded (up to the watermark).
- The views are changed first, the log second, each in one transaction: a crash between the
  two leaves the entries in the log, and the next step deletes them again (idempotent).
- A step reads the TTL cutoff from the clock it is given: tests inject a fixed `now`.
"""
from __future__ import annotations

import logging
import time

from .model import LogEntry, ident_key, now_ms, site_key
from .tallies import delete_before
from .views import HOUR_MS, KIND_SESSION, MINUTE_MS, R_LAST

log = logging.getLogger("otserver")
SWEEP_SHARE = 0.2  # of the folder's time, at most, while it is busy folding


def sweep_step(event_log, views, now_ms: int, ttl_ms: int, limit: int = 500,
               window_ms: int | None = None, node_log=None) -> dict:
    """Delete up to `limit` expired things (and `limit` idempotency keys older than
    `window_ms`). `node_log`: on a cluster node (where `event_log` is the copy of the
    stream), the node's own log, which holds the keys and whose published entries expire
    too. -> {"events", "sessions", "users", "keys", "more"}."""
    cutoff = now_ms - ttl_ms
    done = {"events": 0, "sessions": 0, "users": 0, "keys": 0, "more": False}
    if window_ms is not None:
        done["keys"], done["more"] = (node_log or event_log).expire_keys(now_ms, window_ms, limit)
    if node_log is not None and expire_published(node_log, cutoff, limit):
        done["more"] = True
    watermark = views.watermark()
    with event_log.read() as ltxn:
        last = event_log.tail(ltxn)
        expired = []
        for position, raw in event_log.entries_after(ltxn, 0, limit + 1, until=min(watermark, last)):
            entry = LogEntry(position, raw)
            if entry.ts >= cutoff:
                break
            expired.append(entry)
    if len(expired) > limit:
        expired.pop()
        done["more"] = True
    below = expired[-1].position + 1 if expired else 0
    budget = limit - len(expired)

    def apply(txn) -> None:
        nonlocal budget
        sessions = set()
        for entry in expired:
            site = site_key(entry.si)
            views._delete_site_event(txn, site, entry.position)
            if entry.is_event:
                sessions.add(site + ident_key(entry.sid))
        for skey in sessions:  # chunks that listed only events now gone from the log
            views._delete_chunks(txn, skey, below=below)
        if done["more"]:
            return
        cutoff_minute = (max(cutoff, 0) // MINUTE_MS).to_bytes(4, "big")
        for site in txn.cursor(db=views.db["sites"]).iternext(values=False):
            budget -= views._delete_counters_before(txn, site, cutoff_minute, budget)
            if budget > 0:
                budget -= delete_before(txn, views.db, views.reporting, site, cutoff, budget)
            if budget <= 0:
                done["more"] = True
                return
        cutoff_hour = cutoff // HOUR_MS
        cur = txn.cursor(db=views.db["expiry"])
        cur.first()
        young = 0  # skipped in the cutoff's own hour; bounded so a step stays small
        while young < 20 * limit:
            entry = cur.key()
            if not entry or int.from_bytes(entry[:4], "big") > cutoff_hour:
                break
            if budget <= 0:
                done["more"] = True
                return
            kind, key = entry[4:5], entry[5:]
            record = views.get_session(txn, key) if kind == KIND_SESSION else views.get_user(txn, key)
            if record is not None and record[R_LAST] >= cutoff:
                cur.next()  # the cutoff's own hour: this one is still young
                young += 1
                continue
            if record is not None:
                if kind == KIND_SESSION:
                    views._delete_session(txn, key)
                    done["sessions"] += 1
                else:
                    views._delete_user(txn, key)
                    done["users"] += 1
            txn.delete(entry, db=views.db["expiry"])  # gone with its record, or naming nothing
            cur.set_range(entry)  # the deletions moved the cursor: find our place again
            budget -= 1

    views.write(apply)
    if expired:
        def purge(txn) -> int:
            deleted = event_log.delete_in(txn, [entry.position for entry in expired])
            event_log.delete_erasure_results_before(txn, below, limit)
            return deleted
        event_log.write(purge)
        done["events"] = sum(1 for entry in expired if entry.is_event)
    return done


def expire_published(node_log, cutoff: int, limit: int) -> bool:
    """On a cluster node: delete up to `limit` entries of its own log older than `cutoff`
    that the stream has acknowledged (the views were folded from the copy, which the
    sweeper sweeps as any log). -> whether more are due."""
    published = node_log.outbox_cursor()[0]
    with node_log.read() as txn:
        expired = [position for position, raw in
                   node_log.entries_after(txn, 0, limit + 1, until=published)
                   if int.from_bytes(raw[:8], "big") < cutoff]
    if expired:
        node_log.write(node_log.delete_in, expired[:limit])
    return len(expired) > limit


class Sweeper:
    """When to run a step: a pass a second after start, then one every `interval_s`; while
    the folder is busy, at most SWEEP_SHARE of its time (after a step of t s, wait 4t)."""

    def __init__(self, event_log, views, config, *, clock=now_ms, monotonic=time.monotonic,
                 node_log=None):
        self.event_log = event_log
        self.node_log = node_log
        self.views = views
        self.ttl_ms = int(config.ttl_s * 1000)
        self.window_ms = int(config.idempotency_window_s * 1000)
        self.limit = config.sweep_step_limit
        self.interval_s = config.sweep_interval_s
        self.clock = clock
        self.monotonic = monotonic
        self.next_at = monotonic() + 1.0
        self.totals = {"events": 0, "sessions": 0, "users": 0, "keys": 0, "passes": 0}
        self._pass = dict.fromkeys(("events", "sessions", "users", "keys"), 0)

    def due(self) -> bool:
        return self.monotonic() >= self.next_at

    def step(self, busy: bool) -> dict:
        started = self.monotonic()
        result = sweep_step(self.event_log, self.views, self.clock(), self.ttl_ms, self.limit,
                            self.window_ms, self.node_log)
        for name in self._pass:
            self._pass[name] += result[name]
            self.totals[name] += result[name]
        took = self.monotonic() - started
        if result["more"]:
            self.next_at = started + took / SWEEP_SHARE if busy else self.monotonic()
            return result
        self.totals["passes"] += 1
        # A reader killed while we run (a backup, an export) would pin old pages, and a file
        # would grow by everything swept until a restart: clear dead readers' slots.
        logs = (self.event_log, self.views) + ((self.node_log,) if self.node_log else ())
        cleared = sum(part.store.env.reader_check() for part in logs)
        if cleared:
            log.warning("cleared %d stale reader slot(s) left by dead processes", cleared)
        if any(self._pass.values()):
            log.info("sweeper: deleted %(events)d events, %(sessions)d sessions, "
                     "%(users)d users, %(keys)d idempotency keys", self._pass)
        self._pass = dict.fromkeys(self._pass, 0)
        self.next_at = self.monotonic() + self.interval_s
        return result


def sweep_all(event_log, views, config, *, clock=now_ms, node_log=None) -> dict:
    """One whole pass (`otserver sweep`)."""
    totals = {"events": 0, "sessions": 0, "users": 0, "keys": 0}
    ttl_ms = int(config.ttl_s * 1000)
    window_ms = int(config.idempotency_window_s * 1000)
    while True:
        step = sweep_step(event_log, views, clock(), ttl_ms, config.sweep_step_limit, window_ms,
                          node_log)
        for name in totals:
            totals[name] += step[name]
        if not step["more"]:
            return totals
