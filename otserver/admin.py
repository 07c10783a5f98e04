"""Commands that work on a store directly: sweep, info, backup, export, import, tokens. Safe
while a server runs on the same data directory (LMDB takes one writer at a time per
environment; a backup copies one read snapshot of each). A command that needs the views
current first has them catch up with the log (folder.catch_up): inline when no folder runs,
else by waiting."""
from __future__ import annotations

import json
import os
import sys
import time

from .agents import DERIVED_FIELDS
from .api import new_token, token_digest, token_id
from .config import format_setting
from .folder import catch_up, folder_running
from .model import LogEntry, entry_ts, now_ms
from .sweeper import sweep_all


def sweep(store, config, *, clock=now_ms, out=sys.stdout, timeout_s: float = 120.0) -> int:
    """A full retention pass, in transactions of config.sweep_step_limit deletions. The
    sweeper deletes only what the views have folded, so passes alternate with folding until
    one starts with the views caught up (a store at its size cap may need several: each pass
    makes the room the folder needs to fold more)."""
    totals = {"events": 0, "sessions": 0, "users": 0}
    deadline = time.monotonic() + timeout_s
    while True:
        caught_up = catch_up(store.events, store.views, config, timeout_s=2.0)
        done = sweep_all(store.events, store.views, config, clock=clock,
                         node_log=store.log if store.cluster else None)
        for name in totals:
            totals[name] += done[name]
        if caught_up or time.monotonic() > deadline:
            break
    print(f"swept {totals['events']} events, {totals['sessions']} sessions, "
          f"{totals['users']} users older than {config.ttl_s:g} s", file=out)
    if not caught_up:
        print("otserver: the views did not catch up with the log; what they had not folded "
              "is left for the next sweep", file=sys.stderr)
    return 0


def info(store) -> dict:
    """Counts, sizes, the folder's lag and the time span of what the store holds."""
    counts = store.counts()
    event_log, views = store.events, store.views
    watermark = views.watermark()
    with event_log.read() as txn:
        tail = event_log.tail(txn)
        first = event_log.first_position(txn)
        oldest = _event_at(event_log, txn, first, +1) if tail else None
        newest = _event_at(event_log, txn, tail, -1) if tail else None
        unfolded = event_log.raw(txn, watermark + 1) if tail > watermark else None
    sizes = {}
    for name, env in store.environments():
        path = os.path.join(env.path, "data.mdb")
        stat = os.stat(path)
        sizes[name] = {"file_bytes": stat.st_size, "disk_bytes": stat.st_blocks * 512,
                       "used_bytes": env.used_bytes(), "map_bytes": env.map_size()}
    return {
        "data_dir": store.path,
        "events": counts["events"], "sessions": counts["sessions"], "users": counts["users"],
        "sites": counts["sites"], "tokens": counts["tokens"],
        "log_position": tail, "views_watermark": watermark,
        "view_lag_events": max(0, tail - watermark),
        "view_lag_seconds": max(0.0, now_ms() - entry_ts(unfolded)) / 1000 if unfolded else 0.0,
        "folder_running": folder_running(store.path),
        "file_bytes": sum(s["file_bytes"] for s in sizes.values()),
        "disk_bytes": sum(s["disk_bytes"] for s in sizes.values()),
        "used_bytes": sum(s["used_bytes"] for s in sizes.values()),
        "map_bytes": sum(s["map_bytes"] for s in sizes.values()),
        "environments": sizes, "max_store_bytes": store.max_bytes,
        "oldest_event": oldest, "newest_event": newest,
    }


def _event_at(event_log, txn, position: int, step: int) -> dict | None:
    """The first event at or after (step +1) or at or before (step -1) a position."""
    for found, raw in event_log.scan(txn, position, reverse=step < 0):
        entry = LogEntry(found, raw)
        if entry.is_event:
            return {"eid": entry.eid, "unixtimestamp": entry.ts, "position": found}
    return None


def format_time(ms: int) -> str:
    """Unix milliseconds as a date a person reads: '2026-12-02 03:14:15 UTC'."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def print_info(store, *, as_json: bool = False, out=sys.stdout) -> int:
    data = info(store)
    if as_json:
        print(json.dumps(data), file=out)
        return 0
    mib = 1 << 20
    print(f"data dir      {data['data_dir']}", file=out)
    print(f"events        {data['events']}", file=out)
    print(f"sessions      {data['sessions']}", file=out)
    print(f"users         {data['users']}", file=out)
    print(f"sites         {data['sites']}", file=out)
    print(f"tokens        {data['tokens']}", file=out)
    print(f"log position  {data['log_position']}", file=out)
    print(f"views at      {data['views_watermark']} ({data['view_lag_events']} events, "
          f"{data['view_lag_seconds']:.3f} s behind; folder "
          f"{'running' if data['folder_running'] else 'not running'})", file=out)
    for name, env in data["environments"].items():
        print(f"{name + ' file':<13} {env['file_bytes'] / mib:.1f} MiB "
              f"({env['disk_bytes'] / mib:.1f} MiB on disk, {env['used_bytes'] / mib:.1f} MiB "
              f"in use of a {env['map_bytes'] / mib:.0f} MiB map)", file=out)
    print(f"size cap      {format_setting('max_store_bytes', data['max_store_bytes'])} per "
          "environment", file=out)
    for label, key in (("oldest event", "oldest_event"), ("newest event", "newest_event")):
        event = data[key]
        when = f"{event['eid']} at {format_time(event['unixtimestamp'])}" if event else "-"
        print(f"{label:<13} {when}", file=out)
    return 0


def backup(store, dest: str, *, out=sys.stderr) -> int:
    """A consistent, compacted copy of the store: the views first, then the log they are
    folded from (so the copy's log holds at least what its views have folded; its folder
    folds the rest), then on a cluster node its own log."""
    from .log import copy_path, log_path
    from .views import views_path
    if os.path.exists(os.path.join(dest, "data.mdb")) or os.path.exists(log_path(dest)):
        print(f"otserver: {dest} already holds a store; give a new directory", file=out)
        return 1
    size = 0
    parts = [(store.views.store, views_path(dest))]
    if store.cluster:
        parts.append((store.events.store, copy_path(dest)))
    parts.append((store.log.store, log_path(dest)))
    for env, path in parts:
        os.makedirs(path, exist_ok=True)
        env.env.copy(path, compact=True)
        size += os.path.getsize(os.path.join(path, "data.mdb"))
    print(f"backed up {store.path} to {dest} ({size / (1 << 20):.1f} MiB, compacted)", file=out)
    return 0


def export(store, config, si: str, start_ms: int | None, end_ms: int | None, *,
           fmt: str = "ndjson", columns: list[str] | None = None,
           out=sys.stdout, err=sys.stderr, page: int = 10_000) -> int:
    """Write a site's events with start_ms <= time < end_ms as NDJSON (or CSV), in log
    order."""
    from .api import positions_between, site_event_lines
    catch_up(store.events, store.views, config)
    progress = err.isatty()
    start, end = positions_between(store.events, start_ms, end_ms)
    if fmt == "csv":
        written = _export_csv(store, si, start, end, columns, out, err, progress, page)
    else:
        written = 0
        while True:
            lines, positions = site_event_lines(store.events, store.views, si, start, end, page)
            if lines:
                out.write("\n".join(lines) + "\n")
            written += len(lines)
            if progress:
                err.write(f"\rexported {written:,} events")
                err.flush()
            if len(positions) < page:
                break
            start = positions[-1] + 1
    if progress:
        err.write("\n")
    print(f"exported {written} events of site {si!r}", file=err)
    return 0


def _site_payloads(store, si: str, start: int, end: int, page: int, last: list):
    """The site's events at positions start <= p < end as payloads, one read transaction a
    page (none held while the caller works); last[0] is the position of the last listed."""
    from .api import site_event_payloads
    while True:
        payloads, positions = site_event_payloads(store.events, store.views, si, start, end, page)
        if positions:
            last[0] = positions[-1]
        yield from payloads
        if len(positions) < page:
            return
        start = positions[-1] + 1


def _export_csv(store, si, start, end, columns, out, err, progress, page) -> int:
    """CSV on out's bytes: with `columns`, one pass; else a first pass finds the columns (the
    union over the export), and the second writes the events the first one saw."""
    from .csvformat import columns_for, csv_header, csv_rows
    if columns is None:
        last = [start - 1]
        scanned = 0

        def counted(payloads):
            nonlocal scanned
            for scanned, payload in enumerate(payloads, 1):
                if progress and scanned % page == 0:
                    err.write(f"\rscanned {scanned:,} events")
                    err.flush()
                yield payload
        columns = columns_for(counted(_site_payloads(store, si, start, end, page, last)))
        if progress and scanned:
            err.write(f"\rscanned {scanned:,} events\n")
        end = last[0] + 1  # events folded since the first pass are left out, not half-written
    sink = getattr(out, "buffer", out)
    out.flush()
    sink.write(csv_header(columns))
    written = 0
    chunk: list = []
    for payload in _site_payloads(store, si, start, end, page, [0]):
        chunk.append(payload)
        if len(chunk) == page:
            sink.write(csv_rows(chunk, columns))
            written += len(chunk)
            chunk.clear()
            if progress:
                err.write(f"\rexported {written:,} events")
                err.flush()
    if chunk:
        sink.write(csv_rows(chunk, columns))
        written += len(chunk)
    sink.flush()
    if progress:
        err.write(f"\rexported {written:,} events")
    return written


def import_events(store, lines, config, *, err=sys.stderr, batch_size: int = 1000) -> int:
    """Append events read as NDJSON (as `export` writes it), keeping their eids and times.
    Events already in the store are skipped, so an import can be run again after a failure.
    The log is kept in time order: an event older than the newest one in the store is
    refused (import into an empty data directory, oldest first, to restore an export)."""
    from .errors import BadRequest
    from .model import Event, eid_to_key
    event_log = store.log
    imported = skipped = 0
    batch: list = []
    with event_log.read() as txn:
        tail = event_log.tail(txn)
        raw = event_log.raw(txn, tail) if tail else None
    newest = entry_ts(raw) if raw else 0

    def flush() -> None:
        nonlocal imported, skipped
        seen: set = set()
        with event_log.read() as txn:
            fresh = [ev for ev in batch if ev.key not in seen and not seen.add(ev.key)
                     and event_log.find(txn, ev.key) is None]
        skipped += len(batch) - len(fresh)
        if fresh:
            event_log.append([ev.encode() for ev in fresh])
        imported += len(fresh)
        batch.clear()

    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            record = dict(item["event"])
            eid = record.pop("eid")
            key = eid_to_key(eid)
            if key is None:
                raise ValueError(f"bad eid {eid!r}")
            ts = int(record.pop("unixtimestamp"))
            si, sid, uid = record.pop("si"), record.pop("sid"), record.pop("uid")
            props = {str(k): str(v) for k, v in record.items()}
            if not si or not sid or not uid:
                raise ValueError("si, sid and uid are required")
        except (ValueError, KeyError, TypeError, BadRequest) as exc:
            print(f"otserver: line {number}: {exc}", file=err)
            flush()
            return 1
        captured = {name: value for name, value in (item.get("captured") or {}).items()
                    if name not in DERIVED_FIELDS}  # the read API derives them again
        event = Event(eid, key, ts, si, sid, uid, props, captured or None)
        if ts < newest:
            flush()
            with event_log.read() as txn:
                present = event_log.find(txn, key) is not None
            if not present:
                print(f"otserver: line {number}: the event's time ({ts}) is before the newest "
                      f"event in the store ({newest}); the log is kept in time order, so import "
                      f"into an empty data directory, oldest first", file=err)
                return 1
            skipped += 1
            continue
        newest = ts
        batch.append(event)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    catch_up(store.events, store.views, config)
    print(f"imported {imported} events ({skipped} already present)", file=err)
    return 0


# ---------------------------------------------------------------------- tokens

def create_token(event_log, site: str, label: str = "") -> tuple[str, str]:
    """-> (token, id). The token is shown once; only its digest is kept."""
    if not site:
        raise ValueError("a token needs a site (or * for every site)")
    token = new_token()
    digest = token_digest(token)
    event_log.put_token(digest, site, now_ms(), label)
    return token, token_id(digest)


def list_tokens(event_log) -> list[dict]:
    return [{"id": token_id(d), "site": v[0], "created": v[1], "label": v[2]}
            for d, v in event_log.list_tokens()]


def revoke_token(event_log, ident: str) -> int:
    ident = ident.lower()
    if len(ident) < 6:
        raise ValueError("give at least 6 characters of the token id")
    return event_log.delete_tokens([d for d, _ in event_log.list_tokens()
                                    if token_id(d).startswith(ident)])


# ---------------------------------------------------------------------- registered sites

def add_site(event_log, si: str, origins: str | None, max_chars: int) -> tuple[bool, list]:
    """Register `si` (exactly as devices send it), with the origins its browser requests may
    come from; None keeps a registered site's origins, "" clears them. -> (new, origins)."""
    from .guards import parse_origins
    if not si or len(si) > max_chars:
        raise ValueError(f"a site is 1 to {max_chars} characters, exactly as events send it "
                         "in si")
    known = {row[0]: row[2] for row in event_log.list_sites()}
    chosen = parse_origins(origins) if origins is not None else known.get(si, [])
    return event_log.put_site(si, now_ms(), chosen), chosen


def list_sites(event_log) -> list[dict]:
    return [{"si": si, "created": created, "origins": origins}
            for si, created, origins in event_log.list_sites()]


def remove_site(event_log, si: str) -> bool:
    return event_log.delete_site(si)
