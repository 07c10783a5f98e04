"""Checks on a data directory, read straight from LMDB: the views are exact folds of the log,
and equal, record by record, a fold of the whole log from scratch (`otserver rebuild-views`).

Run these on a store no server is folding (stopped or killed): `views_equal_a_refold` first
catches the views up with `otserver fold --once`, so a kill -9 between an append and its fold
is caught up exactly the way a restarted folder would.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from otserver.model import R_COUNT, session_key, user_key
from otserver.store import Store
from otserver.tallies import estimate_of
from otserver.views import NAMES as VIEW_NAMES


@contextmanager
def opened(data_dir, readonly: bool = True):
    store = Store(str(data_dir), readonly=readonly)
    try:
        yield store
    finally:
        store.close()


def log_events(data_dir) -> list:
    """Every event entry of the log the views are folded from (a cluster node's copy of the
    stream), decoded, in its order."""
    from otserver.model import LogEntry
    with opened(data_dir) as store:
        with store.events.read() as txn:
            return [entry for entry in (LogEntry(p, raw) for p, raw in
                                        store.events.entries_after(txn, 0, 1 << 62))
                    if entry.is_event]


def wait_caught_up(data_dir, timeout: float = 20.0) -> None:
    """Until the views' watermark reaches the log's last position (a running folder)."""
    deadline = time.monotonic() + timeout
    while True:
        with opened(data_dir) as store:
            if store.views.watermark() >= store.events.last_position():
                return
        assert time.monotonic() < deadline, "the views did not catch up with the log"
        time.sleep(0.05)


def check_consistent(data_dir, site: str | None = None) -> dict:
    """With the views caught up: every event has its session and user; each record counts
    its events exactly; a session lists its events once each, in log order; a user lists
    exactly the sessions its events are in. -> {eid: entry}."""
    events = log_events(data_dir)
    per_session: dict[tuple, list] = {}
    per_user: dict[tuple, int] = {}
    user_sessions: dict[tuple, set] = {}
    for entry in events:
        if site is not None:
            assert entry.si == site, entry.si
        per_session.setdefault((entry.si, entry.sid), []).append(entry.position)
        per_user[(entry.si, entry.uid)] = per_user.get((entry.si, entry.uid), 0) + 1
        user_sessions.setdefault((entry.si, entry.uid), set()).add(entry.sid)
    with opened(data_dir) as store:
        views = store.views
        with views.read() as txn:
            assert views.watermark_in(txn) == store.events.last_position(), "views not caught up"
            assert txn.stat(views.db["sessions"])["entries"] == len(per_session)
            assert txn.stat(views.db["users"])["entries"] == len(per_user)
            for (si, sid), positions in per_session.items():
                skey = session_key(si, sid)
                record = views.get_session(txn, skey)
                assert record is not None, f"event without session {sid}"
                assert record[R_COUNT] == len(positions), \
                    f"session {sid}: counts {record[R_COUNT]}, has {len(positions)}"
                listed = views.session_positions(txn, record, skey, 0, 10**9)
                assert listed == positions, f"session {sid}: event list differs from the log"
            for (si, uid), count in per_user.items():
                ukey = user_key(si, uid)
                record = views.get_user(txn, ukey)
                assert record is not None, f"event without user {uid}"
                assert record[R_COUNT] == count, f"user {uid}: counts {record[R_COUNT]}, has {count}"
                links = [skey for _, skey in views.user_session_links(txn, ukey, None, 10**6)]
                assert len(links) == len(set(links))
                assert set(links) == {session_key(si, s) for s in user_sessions[(si, uid)]}, uid
    return {entry.eid: entry for entry in events}


def dump_views(data_dir) -> dict:
    """Every view's records, and the watermark (pending erasure purges must be done)."""
    with opened(data_dir) as store:
        views = store.views
        with views.read() as txn:
            out = {name: [(bytes(k), estimate_of(name, k, v))
                          for k, v in txn.cursor(db=views.db[name])] for name in VIEW_NAMES}
            out["watermark"] = views.watermark_in(txn)
            out["pending purges"] = views.pending_purges(txn)
    return out


def otserver(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otserver", *args], capture_output=True,
                          text=True, timeout=timeout)


def catch_up(data_dir) -> None:
    done = otserver("fold", "--once", "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr


def views_equal_a_refold(data_dir, scratch: Path) -> dict:
    """Catch the views up; copy the data directory; rebuild the copy's views from its log;
    assert every view equal, record by record. -> the incremental dump."""
    catch_up(data_dir)
    incremental = dump_views(data_dir)
    assert incremental["pending purges"] == []
    copy = Path(scratch) / f"refold-{time.monotonic_ns()}"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("lock.mdb", "metrics"))
    done = otserver("rebuild-views", "--data-dir", str(copy))
    assert done.returncode == 0, done.stderr
    rebuilt = dump_views(copy)
    for name in (*VIEW_NAMES, "watermark"):
        assert incremental[name] == rebuilt[name], f"view {name} differs from a refold"
    shutil.rmtree(copy, ignore_errors=True)
    return incremental
