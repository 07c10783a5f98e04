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
