"""The report counters the views fold beside the records: distinct sessions and visitors per
minute, hour and day (HLL sketches), the breakdowns (per dimension value and hour or day:
events, and sketches of its sessions and visitors) and events per site and day. No asyncio.

Databases of the views environment (keys are bytes):
  uniques     site(8) + grain(1) + flag(1) + period(4)                  -> HLL sketch
              grain b"m" | b"h" | b"d" (period = ts // that many ms); flag b"s" sessions,
              b"u" users (visitors), b"S" / b"U" the same for bots
  breakdowns  site(8) + len(1) + dimension + grain(1) + period(4) + bot(1) + kind(1) [+ value]
              grain b"h" | b"d"; bot b"h" (humans) | b"b"; kind b"E" -> events (msgpack int),
              b"S" -> sketch of the value's sessions, b"U" -> of its visitors, b"#" (no value)
              -> how many values the period holds
  site_days   site(8) + day(4)                                          -> events (msgpack int)

The bound: a (site, dimension, hour) holds at most `values_per_period` values; an event whose
value would be one more is counted under OTHER. A day holds the values of its hours (events
added, sketches merged), so a breakdown over a month reads at most 30 x 24 x that many small
counters per dimension, and in practice far fewer: the same values recur every hour.

Sketches are Apache DataSketches HLL (lg_k 12, HLL_4): exact while small (coupon lists, up to
a few hundred items), then about 1.6 % relative standard error; a range's count is the union
of the sketches covering it (days where whole, then hours, then minutes). Items are added in
log order, each batch's distinct items in order of first appearance, so the same log always
folds into sketches of the same estimates. A sketch cannot forget: an erasure counts the hours
its user's events were in again from the log, and derives their days again.
"""
from __future__ import annotations

import datasketches

from .dimensions import OTHER, Dimensions
from .model import packb, unpackb

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
GRAIN_MS = {b"m": MINUTE_MS, b"h": HOUR_MS, b"d": DAY_MS}
LG_K = 12
_HLL_TYPE = datasketches.tgt_hll_type.HLL_4
HUMAN, BOT = b"h", b"b"
SESSIONS, USERS = b"S", b"U"
EVENTS, SLOTS = b"E", b"#"
FLAGS = {False: (b"s", b"u"), True: (b"S", b"U")}  # bot? -> uniques flags (sessions, users)
ALL_FLAGS = FLAGS[False] + FLAGS[True]
NAMES = ("uniques", "breakdowns", "site_days")
VALUES_PER_PERIOD = 1000


def period_bytes(period: int) -> bytes:
    return max(0, min(period, 0xFFFFFFFF)).to_bytes(4, "big")


def dimension_prefix(site: bytes, name: str) -> bytes:
    raw = name.encode()
    return site + bytes((len(raw),)) + raw


def new_sketch():
    return datasketches.hll_sketch(LG_K, _HLL_TYPE)


def _sketch_of(raw):
    return datasketches.hll_sketch.deserialize(bytes(raw)) if raw is not None else new_sketch()


class Reporting:
    """What a store counts for its reports: the dimensions and the bound per period."""

    __slots__ = ("dimensions", "values_per_period")

    def __init__(self, properties: tuple[str, ...] = (), values_per_period: int = VALUES_PER_PERIOD):
        self.dimensions = Dimensions(properties)
        self.values_per_period = values_per_period


class Tally:
    """The report counters one fold changes, gathered in memory and written once at `flush`.

    Minutes and hours are counted from the events. A day is derived from its hours once it is
    over for its site (`derive_days_again`, called by the views when a site's events reach a
    later day: log times never decrease, so its hours are final then), events added and
    sketches merged; until then a read merges the day's hours. So an event costs one cell per
    dimension. `days=False` (an erasure's recount) leaves site_days alone."""

    __slots__ = ("txn", "db", "reporting", "uniques", "cells", "slots", "days",
                 "derive_days", "_keys_of")

    def __init__(self, txn, db: dict, reporting: Reporting, days: bool = True):
        self.txn = txn
        self.db = db
        self.reporting = reporting
        self.derive_days = days
        self.uniques: dict[bytes, dict] = {}  # uniques key -> {item: None} (ordered, distinct)
        self.cells: dict[tuple, list] = {}  # (hour prefix, value) -> [events, [sid], [uid]]
        self.slots: dict[bytes, int] = {}  # hour prefix -> values the hour holds
        self.days: dict[bytes, int] = {}  # site_days key -> events
        self._keys_of: dict[tuple, tuple] = {}  # (site, minute, bot) -> the keys it counts in

    def add(self, site: bytes, e, counted: bool) -> bool:
        """Count one event (a LogEntry); `counted`: whether it counts in reports (not sent
        with increment=false). -> whether it is a bot's (False when not counted)."""
        ts = e.ts
        if self.derive_days:
            key = site + period_bytes(ts // DAY_MS)
            self.days[key] = self.days.get(key, 0) + 1
        if not counted:
            return False
        bot, values = self.reporting.dimensions.values(e.props, e.captured)
        minute = ts // MINUTE_MS
        keys = self._keys_of.get((site, minute, bot))
        if keys is None:
            keys = self._keys_of[(site, minute, bot)] = self._keys(site, minute, bot)
        uniques_keys, prefixes = keys
        sid, uid = e.sid, e.uid
        uniques = self.uniques
        for key, item in zip(uniques_keys, (sid, uid, sid, uid)):
            seen = uniques.get(key)
            if seen is None:
                seen = uniques[key] = {}
            seen[item] = None
        cells = self.cells
        for prefix, value in zip(prefixes, values):
            cell = cells.get((prefix, value))
            if cell is None:
                cell = self._cell(prefix, value)
            cell[0] += 1
            cell[1].append(sid)
            cell[2].append(uid)
        return bot

    def _keys(self, site: bytes, minute: int, bot: bool):
        sessions, users = FLAGS[bot]
        hour = period_bytes(minute // 60)
        uniques_keys = [site + b"m" + sessions + period_bytes(minute),
                        site + b"m" + users + period_bytes(minute),
                        site + b"h" + sessions + hour, site + b"h" + users + hour]
        who = BOT if bot else HUMAN
        prefixes = [dimension_prefix(site, name) + b"h" + hour + who
                    for name in self.reporting.dimensions.names]
        return uniques_keys, prefixes

    def _cell(self, prefix: bytes, value: str) -> list:
        """The cell of a value new to this batch: an existing one, a new slot, or OTHER."""
        cells = self.cells
        if value != OTHER and self.txn.get(prefix + EVENTS + value.encode(),
                                           db=self.db["breakdowns"]) is None:
            count = self.slots.get(prefix)
            if count is None:
                raw = self.txn.get(prefix + SLOTS, db=self.db["breakdowns"])
                count = unpackb(raw) if raw is not None else 0
            if count >= self.reporting.values_per_period:
                cell = cells.get((prefix, OTHER))
                if cell is None:
                    cell = self._cell(prefix, OTHER)
                cells[(prefix, value)] = cell  # later events of the value: straight there
                return cell
            self.slots[prefix] = count + 1
        cell = cells[(prefix, value)] = [0, [], []]
        return cell

    def flush(self) -> None:
        txn, db = self.txn, self.db
        uniques = txn.cursor(db=db["uniques"])
        for key, items in self.uniques.items():
            sketch = _sketch_of(uniques.get(key))
            for item in items:
                sketch.update(item)
            uniques.put(key, sketch.serialize_compact())
        breakdowns = txn.cursor(db=db["breakdowns"])
        done = set()
        for (prefix, value), (events, sids, uids) in self.cells.items():
            if id(sids) in done:  # a value sent to OTHER shares OTHER's cell
                continue
            done.add(id(sids))
            raw_value = value.encode()
            key = prefix + EVENTS + raw_value
            raw = breakdowns.get(key)
            breakdowns.put(key, packb(events + (unpackb(raw) if raw is not None else 0)))
            for kind, items in ((SESSIONS, sids), (USERS, uids)):
                key = prefix + kind + raw_value
                sketch = _sketch_of(breakdowns.get(key))
                for item in dict.fromkeys(items):  # distinct, in order of first appearance
                    sketch.update(item)
                breakdowns.put(key, sketch.serialize_compact())
        for prefix, count in self.slots.items():
            breakdowns.put(prefix + SLOTS, packb(count))
        site_days = txn.cursor(db=db["site_days"])
        for key, events in self.days.items():
            raw = site_days.get(key)
            total = events + (unpackb(raw) if raw is not None else 0)
            if total > 0:
                site_days.put(key, packb(total))
            elif raw is not None:
                site_days.delete()

    # ------------------------------------------------------------------ erasure

    def forget_hours(self, site: bytes, hours: set[int]) -> None:
        """Delete the minute and hour counters of the site's `hours`, before they are counted
        again from the events left in the log (then `derive_days_again` for days over)."""
        txn, db = self.txn, self.db
        for hour in hours:
            for flag in ALL_FLAGS:
                _delete_range(txn, db["uniques"], site + b"m" + flag, hour * 60, hour * 60 + 60)
                _delete_range(txn, db["uniques"], site + b"h" + flag, hour, hour + 1)
            for name in self.reporting.dimensions.names:
                _delete_range(txn, db["breakdowns"], dimension_prefix(site, name) + b"h",
                              hour, hour + 1)

    def drop_days(self, site: bytes, days) -> None:
        """Delete what was derived for the site's `days` (their hours stay)."""
        txn, db = self.txn, self.db
        for day in days:
            for flag in ALL_FLAGS:
                _delete_range(txn, db["uniques"], site + b"d" + flag, day, day + 1)
            for name in self.reporting.dimensions.names:
                _delete_range(txn, db["breakdowns"], dimension_prefix(site, name) + b"d",
                              day, day + 1)

    def derive_days_again(self, site: bytes, days) -> None:
        """Write the site's `days` (over: no event of theirs is still to come) from their
        hours."""
        txn, db = self.txn, self.db
        self.drop_days(site, days)
        uniques = txn.cursor(db=db["uniques"])
        breakdowns = txn.cursor(db=db["breakdowns"])
        for day in days:
            hours = (day * 24, day * 24 + 24)
            for flag in ALL_FLAGS:
                sketches = [_sketch_of(raw) for _key, raw in
                            _records(uniques, site + b"h" + flag, *hours)]
                _merge_into(uniques, {site + b"d" + flag + period_bytes(day): sketches})
            for name in self.reporting.dimensions.names:
                head = dimension_prefix(site, name)
                events: dict[bytes, int] = {}
                merges: dict[bytes, list] = {}
                for key, raw in _records(breakdowns, head + b"h", *hours):
                    # key: head + b"h" + hour(4) + who(1) + kind(1) + value
                    rest = bytes(key[len(head) + 5:])
                    kind = rest[1:2]
                    day_key = head + b"d" + period_bytes(day) + rest
                    if kind == EVENTS:
                        events[day_key] = events.get(day_key, 0) + unpackb(raw)
                    elif kind != SLOTS:
                        merges.setdefault(day_key, []).append(_sketch_of(raw))
                for key, count in events.items():
                    breakdowns.put(key, packb(count))
                _merge_into(breakdowns, merges)


def _merge_into(cursor, merges: dict) -> None:
    """Store at each key the union of what it holds and the sketches given for it."""
    for key, sketches in merges.items():
        if not sketches:
            continue
        union = datasketches.hll_union(LG_K)
        raw = cursor.get(key)
        if raw is not None:
            union.update(_sketch_of(raw))
        for sketch in sketches:
            union.update(sketch)
        cursor.put(key, union.get_result(_HLL_TYPE).serialize_compact())


def _records(cursor, prefix: bytes, first: int, end: int):
    """(key, value) of the keys prefix + period(4) + ... with first <= period < end."""
    if not cursor.set_range(prefix + period_bytes(first)):
        return []
    stop = prefix + period_bytes(end)
    out = []
    for key, raw in cursor:
        if key >= stop:
            break
        out.append((bytes(key), bytes(raw)))
    return out


def _delete_range(txn, db, prefix: bytes, first: int, end: int, budget: int = 1 << 62) -> int:
    """Delete the keys prefix + period(4) + ... with first <= period < end; -> how many."""
    cur = txn.cursor(db=db)
    done = 0
    if not cur.set_range(prefix + period_bytes(first)):
        return 0
    stop = prefix + period_bytes(end)
    while done < budget:
        key = cur.key()
        if not key or key >= stop:
            break
        cur.delete()
        done += 1
    return done


def delete_before(txn, db: dict, reporting: Reporting, site: bytes, cutoff_ms: int,
                  budget: int) -> int:
    """Up to `budget` of a site's report counters of periods that end before `cutoff_ms`."""
    done = 0
    for grain, size in GRAIN_MS.items():
        for flag in ALL_FLAGS:
            done += _delete_range(txn, db["uniques"], site + grain + flag, 0, cutoff_ms // size,
                                  budget - done)
            if done >= budget:
                return done
    for name in reporting.dimensions.names:
        prefix = dimension_prefix(site, name)
        for grain in (b"h", b"d"):
            done += _delete_range(txn, db["breakdowns"], prefix + grain, 0,
                                  cutoff_ms // GRAIN_MS[grain], budget - done)
            if done >= budget:
                return done
    done += _delete_range(txn, db["site_days"], site, 0, cutoff_ms // DAY_MS, budget - done)
    return done


# ---------------------------------------------------------------------- reads

def cover(start_ms: int, end_ms: int, grains: bytes = b"mhd",
          open_day: int | None = None) -> list[tuple[bytes, int]]:
    """The fewest aligned periods that cover [start, end): minutes up to the first whole hour,
    hours up to the first whole day, days, then hours and minutes. Without b"m" in `grains`
    the range is first widened to whole hours. Days from `open_day` on (not derived yet: the
    site's latest day) are covered by their hours."""
    if b"m" not in grains:
        start_ms = start_ms // HOUR_MS * HOUR_MS
        end_ms = -(-end_ms // HOUR_MS) * HOUR_MS
    else:
        start_ms = start_ms // MINUTE_MS * MINUTE_MS
        end_ms = -(-end_ms // MINUTE_MS) * MINUTE_MS
    sizes = [(g, GRAIN_MS[g]) for g in (b"d", b"h", b"m") if g in grains]
    open_ms = open_day * DAY_MS if open_day is not None else None
    out = []
    position = start_ms
    while position < end_ms:
        for grain, size in sizes:  # the largest period that starts here and fits
            if position % size == 0 and position + size <= end_ms and not (
                    grain == b"d" and open_ms is not None and position >= open_ms):
                out.append((grain, position // size))
                position += size
                break
        else:  # cannot happen: the smallest grain divides both ends
            raise AssertionError("uncovered range")
    return out


def open_day(txn, db: dict, site: bytes) -> int | None:
    """The site's latest day (its counters of that day are in hours only), None for none."""
    raw = txn.get(site, db=db["sites"])
    if raw is None:
        return None
    record = unpackb(raw)
    return (record[2] if len(record) > 2 else record[1]) // DAY_MS


def _merged(raws) -> int:
    raws = [raw for raw in raws if raw is not None]
    if not raws:
        return 0
    if len(raws) == 1:
        return round(datasketches.hll_sketch.deserialize(bytes(raws[0])).get_estimate())
    union = datasketches.hll_union(LG_K)
    for raw in raws:
        union.update(datasketches.hll_sketch.deserialize(bytes(raw)))
    return round(union.get_estimate())


def uniques(txn, db: dict, site: bytes, pieces, include_bots: bool) -> tuple[int, int]:
    """(distinct sessions, distinct visitors) over the periods `pieces`."""
    uniques_db = db["uniques"]
    if uniques_db is None:  # a read-only open of views written before there were reports
        return 0, 0
    out = []
    for flags in ((b"s", b"S"), (b"u", b"U")):
        flags = flags if include_bots else flags[:1]
        out.append(_merged(txn.get(site + grain + flag + period_bytes(period), db=uniques_db)
                           for grain, period in pieces for flag in flags))
    return out[0], out[1]


def breakdown(txn, db: dict, site: bytes, name: str, pieces, include_bots: bool,
              limit: int) -> list[dict]:
    """The top `limit` values of a dimension over the periods `pieces` (hours and days) by
    events, each with its distinct sessions and visitors."""
    breakdowns = db["breakdowns"]
    if breakdowns is None:
        return []
    prefix = dimension_prefix(site, name)
    who = (HUMAN, BOT) if include_bots else (HUMAN,)
    events: dict[bytes, int] = {}
    cur = txn.cursor(db=breakdowns)
    heads = [prefix + grain + period_bytes(period) + w for grain, period in pieces for w in who]
    for head in heads:
        start = head + EVENTS
        if not cur.set_range(start):
            continue
        for key, raw in cur:
            if not key.startswith(start):
                break
            value = bytes(key[len(start):])
            events[value] = events.get(value, 0) + unpackb(raw)
    top = sorted(events.items(), key=lambda item: (-item[1], item[0]))[:limit]
    rows = []
    for value, count in top:
        rows.append({
            "value": value.decode(),
            "events": count,
            "sessions": _merged(txn.get(head + SESSIONS + value, db=breakdowns) for head in heads),
            "visitors": _merged(txn.get(head + USERS + value, db=breakdowns) for head in heads),
        })
    return rows


def events_since(txn, db: dict, site: bytes, first_day: int) -> int:
    """The site's events of days >= first_day (what it holds within the TTL)."""
    site_days = db["site_days"]
    if site_days is None:
        return 0
    cur = txn.cursor(db=site_days)
    total = 0
    if cur.set_range(site + period_bytes(first_day)):
        for key, raw in cur:
            if key[:8] != site:
                break
            total += unpackb(raw)
    return total


def estimate_of(name: str, key: bytes, value: bytes):
    """A record of these databases as one can compare it: a sketch as its estimate (two
    sketches of the same items may be laid out differently once they were written between
    folds of different sizes), anything else as it is stored."""
    if name == "uniques" or (name == "breakdowns" and _kind(key) in (SESSIONS, USERS)):
        return round(datasketches.hll_sketch.deserialize(bytes(value)).get_estimate(), 6)
    return bytes(value)


def _kind(key: bytes) -> bytes:
    at = 8 + 1 + key[8] + 1 + 4 + 1
    return key[at:at + 1]
