"""Commands that work on a store directly: sweep, info, backup. Safe while a server runs on the
same data directory (LMDB takes one writer at a time; a backup copies one read snapshot)."""
from __future__ import annotations

import json
import os
import sys

from .model import key_to_eid, now_ms


def sweep(store, config, *, clock=now_ms, out=sys.stdout) -> int:
    """One full retention pass, in transactions of config.sweep_step_limit deletions."""
    totals = {"events": 0, "sessions": 0, "users": 0}
    ttl_ms = int(config.ttl_s * 1000)
    while True:
        step = store.sweep_step(clock(), ttl_ms, config.sweep_step_limit)
        for name in totals:
            totals[name] += step[name]
        if not step["more"]:
            break
    print(f"swept {totals['events']} events, {totals['sessions']} sessions, "
          f"{totals['users']} users older than {config.ttl_s:g} s", file=out)
    return 0


def info(store) -> dict:
    """Counts, sizes and the time span of what the store holds."""
    counts = store.counts()
    path = os.path.join(store.path, "data.mdb")
    stat = os.stat(path)
    env_info = store.env.info()
    page = store.env.stat()["psize"]
    oldest = newest = None
    with store.read() as txn:
        cur = txn.cursor(db=store.db["events"])
        if cur.first():
            oldest = {"eid": key_to_eid(cur.key()), "unixtimestamp": int.from_bytes(cur.key()[:6], "big")}
        if cur.last():
            newest = {"eid": key_to_eid(cur.key()), "unixtimestamp": int.from_bytes(cur.key()[:6], "big")}
    return {
        "data_dir": store.path,
        "events": counts["events"], "sessions": counts["sessions"], "users": counts["users"],
        "sites": counts["sites"], "tokens": counts["tokens"],
        "file_bytes": stat.st_size, "disk_bytes": stat.st_blocks * 512,
        "used_bytes": (env_info["last_pgno"] + 1) * page, "map_bytes": env_info["map_size"],
        "max_store_bytes": store.max_bytes,
        "oldest_event": oldest, "newest_event": newest,
    }


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
    print(f"file size     {data['file_bytes'] / mib:.1f} MiB ({data['disk_bytes'] / mib:.1f} MiB on disk)", file=out)
    print(f"in use        {data['used_bytes'] / mib:.1f} MiB of a {data['map_bytes'] / mib:.0f} MiB map "
          f"(cap {data['max_store_bytes'] / mib:.0f} MiB)", file=out)
    for label, key in (("oldest event", "oldest_event"), ("newest event", "newest_event")):
        event = data[key]
        print(f"{label:<13} {event['eid'] + ' at ' + str(event['unixtimestamp']) if event else '-'}", file=out)
    return 0


def backup(store, dest: str, *, out=sys.stderr) -> int:
    """A consistent, compacted copy of the store (one read snapshot; free pages left out)."""
    if os.path.exists(os.path.join(dest, "data.mdb")):
        print(f"otserver: {dest} already holds a store; give a new directory", file=out)
        return 1
    os.makedirs(dest, exist_ok=True)
    store.env.copy(dest, compact=True)
    size = os.path.getsize(os.path.join(dest, "data.mdb"))
    print(f"backed up {store.path} to {dest} ({size / (1 << 20):.1f} MiB, compacted)", file=out)
    return 0


def export(store, si: str, start_ms: int, end_ms: int, *, out=sys.stdout, err=sys.stderr,
           page: int = 10_000) -> int:
    """Write a site's events with start_ms <= time < end_ms as NDJSON, oldest first."""
    from .api import event_payload, time_key
    progress = err.isatty()
    start = time_key(start_ms)
    end = time_key(end_ms)
    written = 0
    while True:
        with store.read() as txn:
            keys = store.site_event_keys(txn, si, start, end, page)
            lines = [json.dumps(event_payload(key, stored), ensure_ascii=False,
                                separators=(",", ":"))
                     for key in keys if (stored := store.get_event(txn, key)) is not None]
        if lines:
            out.write("\n".join(lines) + "\n")
        written += len(lines)
        if progress:
            err.write(f"\rexported {written:,} events")
            err.flush()
        if len(keys) < page:
            break
        start = (int.from_bytes(keys[-1], "big") + 1).to_bytes(16, "big")
    if progress:
        err.write("\n")
    print(f"exported {written} events of site {si!r}", file=err)
    return 0


def import_events(store, lines, config, *, err=sys.stderr, batch_size: int = 1000) -> int:
    """Store events read as NDJSON (as `export` writes them), keeping their eids and times.
    Events already in the store are skipped, so an import can be run again after a failure."""
    from .errors import BadRequest
    from .model import Event, eid_to_key
    imported = skipped = 0
    batch: list = []

    def flush() -> None:
        nonlocal imported, skipped
        seen: set = set()
        with store.read() as txn:
            fresh = [ev for ev in batch if ev.key not in seen and not seen.add(ev.key)
                     and store.get_event(txn, ev.key) is None]
        skipped += len(batch) - len(fresh)
        if fresh:
            store.write_batch(fresh)
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
            return 1
        batch.append(Event(eid, key, ts, si, sid, uid, props, item.get("captured") or None))
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    print(f"imported {imported} events ({skipped} already present)", file=err)
    return 0
