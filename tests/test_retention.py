"""Retention: the sweeper with an injected clock, `otserver sweep` against a running server,
the size cap (503, then recovery), backup under load, and a store that levels off under churn."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import RunningServer, run_cli

from otserver.config import Config
from otserver.folder import Folder
from otserver.model import (R_COUNT, R_LAST, EidGenerator, chunk_key, make_event, pair_key,
                            session_key, unpackb, user_key)
from otserver.store import Store
from otserver.sweeper import sweep_step
from otserver.views import POSITION_BYTES

DAY_MS = 86_400_000
NOW = 1_800_000_000_000  # a fixed "now" for the injected clock
TTL_MS = 60 * DAY_MS
CONFIG = Config()


def write(store: Store, events: list) -> None:
    """Append events to the log and fold them, as the writer and the folder do."""
    store.log.append([event.encode() for event in events])
    Folder(store.log, store.views, CONFIG, sweeper=False).catch_up()


def ingest(store: Store, gen: EidGenerator, ts: int, si="s", **props) -> str:
    event = make_event({"si": si, **props}, None, gen, ts, CONFIG)
    write(store, [event])
    return event.eid


def sweep(store: Store, now: int = NOW, ttl: int = TTL_MS, limit: int = 1000) -> dict:
    return sweep_step(store.log, store.views, now, ttl, limit)


def assert_no_dangling(store: Store) -> None:
    """Every index entry names something that exists, and everything stored is indexed."""
    from otserver.model import LogEntry
    views = store.views
    db = views.db
    with views.read() as txn, store.log.read() as ltxn:
        sessions = {k for k, _ in txn.cursor(db=db["sessions"])}
        users = {k for k, _ in txn.cursor(db=db["users"])}
        logged = set()
        for position, raw in store.log.entries_after(ltxn, 0, 1 << 62):
            entry = LogEntry(position, raw)
            logged.add(position)
            assert session_key(entry.si, entry.sid) in sessions, f"event {entry.eid} has no session"
            assert user_key(entry.si, entry.uid) in users, f"event {entry.eid} has no user"
        expiry = set()
        for entry, _ in txn.cursor(db=db["expiry"]):
            kind, key = entry[4:5], entry[5:]
            assert key in (sessions if kind == b"S" else users), f"expiry entry {entry!r} dangles"
            raw = txn.get(key, db=db["sessions" if kind == b"S" else "users"])
            assert int.from_bytes(entry[:4], "big") == unpackb(raw)[R_LAST] // 3_600_000
            expiry.add((kind, key))
        assert expiry == {(b"S", k) for k in sessions} | {(b"U", k) for k in users}
        pairs = {k for k, _ in txn.cursor(db=db["user_pairs"])}
        listed = set()
        for ukey, entry in txn.cursor(db=db["user_sessions"]):
            skey = ukey[:8] + entry[POSITION_BYTES:]
            assert ukey in users and skey in sessions, "user_sessions entry dangles"
            listed.add(pair_key(ukey, skey))
        for skey, ukey in txn.cursor(db=db["session_users"]):
            assert skey in sessions and ukey in users, "session_users entry dangles"
        assert pairs == listed
        for key, _ in txn.cursor(db=db["session_chunks"]):
            assert any(key[:-4] == chunk_key(s, 0)[:-4] for s in sessions), "chunk dangles"
        for key, _ in txn.cursor(db=db["site_events"]):
            assert int.from_bytes(key[8:], "big") in logged, "site listing names a swept event"


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "store"))
    yield s
    s.close()


def test_an_event_61_days_old_goes_and_one_59_days_old_stays(store):
    gen = EidGenerator()
    old = ingest(store, gen, NOW - 61 * DAY_MS, sid="a")
    young = ingest(store, gen, NOW - 59 * DAY_MS, sid="b")
    result = sweep(store)
    assert result == {"events": 1, "sessions": 1, "users": 1, "keys": 0, "more": False}
    assert store.event_ids() == [young]
    assert old not in store.event_ids()
    with store.views.read() as txn:
        assert store.views.get_session(txn, session_key("s", "a")) is None
        assert store.views.get_user(txn, user_key("s", "a")) is None
        assert store.views.get_session(txn, session_key("s", "b")) is not None
    assert_no_dangling(store)


def test_a_session_touched_yesterday_stays_though_its_first_event_is_90_days_old(store):
    gen = EidGenerator()
    first = ingest(store, gen, NOW - 90 * DAY_MS, sid="long", uid="u1", page="/a")
    last = ingest(store, gen, NOW - 1 * DAY_MS, sid="long", uid="u2", page="/b")
    sweep(store)
    assert store.event_ids() == [last]
    with store.views.read() as txn:
        session = store.views.get_session(txn, session_key("s", "long"))
        assert session is not None and session[R_COUNT] == 2  # the fold keeps its history
        assert store.views.get_user(txn, user_key("s", "u1")) is None  # not touched for 90 days
        assert store.views.get_user(txn, user_key("s", "u2")) is not None
    assert first not in store.event_ids()
    assert_no_dangling(store)


def test_sweeping_is_bounded_per_step_and_finishes(store):
    gen = EidGenerator()
    batch = [make_event({"si": "s", "sid": f"s{i % 50}", "uid": f"u{i % 7}"}, None, gen,
                        NOW - 70 * DAY_MS + i, CONFIG) for i in range(500)]
    write(store, batch)
    keep = ingest(store, gen, NOW - DAY_MS, sid="s1", uid="u1")
    steps, totals = 0, {"events": 0, "sessions": 0, "users": 0}
    while True:
        result = sweep(store, limit=40)
        assert result["events"] + result["sessions"] + result["users"] <= 40
        for name in totals:
            totals[name] += result[name]
        steps += 1
        if not result["more"]:
            break
    assert steps >= 500 // 40
    assert totals == {"events": 500, "sessions": 49, "users": 6}
    assert store.event_ids() == [keep]
    assert_no_dangling(store)


def test_long_sessions_lose_their_expired_chunks(store):
    gen = EidGenerator()
    old = [make_event({"si": "s", "sid": "big"}, None, gen, NOW - 80 * DAY_MS + i, CONFIG)
           for i in range(200)]  # 3 full chunks of 64, 8 in the tail
    write(store, old)
    young = [make_event({"si": "s", "sid": "big"}, None, gen, NOW - DAY_MS + i, CONFIG)
             for i in range(100)]
    write(store, young)
    sweep(store, limit=10_000)
    views = store.views
    with views.read() as txn:
        chunks = [k for k, _ in txn.cursor(db=views.db["session_chunks"])]
        session = views.get_session(txn, session_key("s", "big"))
        positions = views.session_positions(txn, session, session_key("s", "big"), 0, 1000)
    assert len(chunks) == 1  # chunks 0-2 held only expired events; chunk 3 has young ones
    with store.log.read() as txn:
        listed = [store.log.get(txn, p).eid for p in positions if p and store.log.get(txn, p)]
    assert listed == [e.eid for e in young]
    assert_no_dangling(store)


def test_the_sweeper_leaves_unfolded_entries_and_positions_are_never_reused(store):
    """Only what the views have folded goes (else a view would miss it for good); when the
    log's last entry goes, the next entry still gets a new position."""
    gen = EidGenerator()
    folded = [make_event({"si": "s", "sid": "a"}, None, gen, NOW - 70 * DAY_MS + i, CONFIG)
              for i in range(3)]
    write(store, folded)
    unfolded = make_event({"si": "s", "sid": "b"}, None, gen, NOW - 70 * DAY_MS + 10, CONFIG)
    store.log.append([unfolded.encode()])  # logged, not yet folded
    assert sweep(store)["events"] == 3
    assert store.event_ids() == [unfolded.eid]
    Folder(store.log, store.views, CONFIG, sweeper=False).catch_up()
    assert sweep(store)["events"] == 1  # folded now: the log is empty
    assert store.event_ids() == []
    later = ingest(store, gen, NOW - DAY_MS, sid="c")
    assert store.event_ids() == [later]
    with store.log.read() as txn:
        assert store.log.first_position(txn) == store.log.tail(txn) == 5  # not reused


def test_store_size_levels_off_under_churn(tmp_path):
    """Ingest and sweep over many TTL cycles: the file stops growing once pages are reused."""
    store = Store(str(tmp_path / "churn"))
    gen = EidGenerator()
    ttl = 10_000
    used = []
    try:
        for cycle in range(16):
            now = NOW + cycle * ttl
            batch = [make_event({"si": "s", "sid": f"c{cycle}-{i % 300}", "uid": f"u{i % 500}",
                                 "page": "/x" * 20}, None, gen, now + i, CONFIG)
                     for i in range(3000)]
            for start in range(0, len(batch), 500):
                write(store, batch[start:start + 500])
            while sweep(store, now + 2000, ttl, 2000)["more"]:
                pass
            used.append((store.log.store.used_bytes(), store.views.store.used_bytes()))
    finally:
        store.close()
    # After a few cycles the sweeper frees as much as ingest takes: the high-water mark of
    # pages stops rising, in the log and in the views.
    for env in (0, 1):
        pages = [u[env] for u in used]
        assert max(pages[8:]) <= max(pages[:8]) * 1.10, used


# ---------------------------------------------------------------------- over the CLI

def test_sweep_over_the_cli_against_a_running_server(server):
    token = server.create_token("site")
    old_eid = server.track(si="site", sid="old-session", uid="old-user", page="/a").text
    time.sleep(3.2)
    young_eid = server.track(si="site", sid="young-session", uid="young-user").text
    done = run_cli("sweep", "--ttl", "3s", "--allow-short-ttl", "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    assert "swept 1 events, 1 sessions, 1 users" in done.stdout
    api = lambda path: server.api(path + "?si=site", token).status  # noqa: E731
    assert api(f"/api/v1/events/{old_eid}") == 404
    assert api("/api/v1/sessions/old-session") == 404
    assert api("/api/v1/users/old-user") == 404
    assert api(f"/api/v1/events/{young_eid}") == 200
    assert api("/api/v1/sessions/young-session") == 200
    assert api("/api/v1/users/young-user") == 200
    # The server keeps ingesting after a sweep by another process.
    assert server.track(si="site", sid="young-session").status == 200


def test_the_server_sweeps_by_itself(make_server):
    server = make_server("--ttl", "2s", "--allow-short-ttl", "--sweep-interval", "1s")
    token = server.create_token("site")
    eid = server.track(si="site", sid="short").text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.api(f"/api/v1/events/{eid}?si=site", token).status == 404:
            break
        time.sleep(0.25)
    assert server.api(f"/api/v1/events/{eid}?si=site", token).status == 404
    assert server.api("/api/v1/sessions/short?si=site", token).status == 404
    assert "sweeper: deleted 1 events, 1 sessions, 1 users" in server.log()


def test_info_reports_counts_and_span(server):
    eids = [server.track(si="site", sid="x").text for _ in range(3)]
    done = run_cli("info", "--json", "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    import json
    data = json.loads(done.stdout)
    assert (data["events"], data["sessions"], data["users"], data["sites"]) == (3, 1, 1, 1)
    assert data["oldest_event"]["eid"] == eids[0] and data["newest_event"]["eid"] == eids[-1]
    assert data["used_bytes"] <= data["file_bytes"] <= data["map_bytes"]


# ---------------------------------------------------------------------- size cap

def fill_until_refused(server: RunningServer, limit: int = 20_000) -> tuple[list[str], object]:
    acked = []
    for i in range(limit):
        resp = server.track(si="site", sid=f"s{i}", blob="x" * 2000)
        if resp.status != 200:
            return acked, resp
        acked.append(resp.text)
    raise AssertionError("the cap was never reached")


def test_at_the_size_cap_ingest_answers_503_and_resumes_with_room(make_server):
    server = make_server("--initial-store-bytes", "256KiB", "--max-store-bytes", "2MiB")
    acked, refused = fill_until_refused(server)
    assert refused.status == 503 and refused.headers.get("retry-after") == "1"
    assert "storage unavailable" in refused.text
    assert len(acked) > 100
    stored_before = server.counts()["events"]
    assert stored_before == len(acked)  # the refused event stored nothing
    token = server.create_token("site")
    assert server.api(f"/api/v1/events/{acked[0]}?si=site", token).status == 200  # reads work
    # Room comes back: restart with a higher cap, and every acknowledged event is there.
    server.stop()
    server.extra_args = ["--initial-store-bytes", "256KiB", "--max-store-bytes", "64MiB"]
    server.start()
    assert server.track(si="site", sid="after").status == 200
    assert set(acked) <= set(server.event_ids())


def test_at_the_size_cap_a_sweep_makes_room(make_server):
    server = make_server("--initial-store-bytes", "256KiB", "--max-store-bytes", "2MiB")
    acked, refused = fill_until_refused(server)
    assert refused.status == 503
    time.sleep(1.1)
    done = run_cli("sweep", "--ttl", "1s", "--allow-short-ttl", "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    assert server.counts()["events"] == 0
    for i in range(20):  # writes resume by themselves: no restart
        assert server.track(si="site", sid=f"again{i}", blob="x" * 2000).status == 200


# ---------------------------------------------------------------------- backup

def test_backup_of_a_store_under_load_opens_and_serves_the_same_data(make_server, tmp_path):
    server = make_server()
    before = [server.track(si="site", sid=f"b{i % 5}", n=str(i)).text for i in range(200)]
    stop = threading.Event()
    during: list[str] = []

    def load():
        while not stop.is_set():
            resp = server.track(si="site", sid="live")
            if resp.status == 200:
                during.append(resp.text)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.3)
        dest = tmp_path / "backup"
        done = run_cli("backup", str(dest), "--data-dir", str(server.data_dir))
    finally:
        stop.set()
        thread.join(10)
    assert done.returncode == 0, done.stderr
    assert during, "no load ran during the backup"
    copy = make_server(data_dir=dest)
    copied = set(copy.event_ids())
    assert set(before) <= copied
    assert copied <= set(before) | set(during)
    token, copy_token = server.create_token("site"), copy.create_token("site")
    for sid in ("b0", "b3"):
        original = server.api(f"/api/v1/sessions/{sid}?si=site&limit=1000", token)
        restored = copy.api(f"/api/v1/sessions/{sid}?si=site&limit=1000", copy_token)
        assert restored.status == 200 and restored.json()["events"] == original.json()["events"]
    live = copy.api("/api/v1/sessions/live?si=site&limit=1000", copy_token).json()
    assert live["event_count"] == len([e for e in during if e in copied])
    again = run_cli("backup", str(dest), "--data-dir", str(server.data_dir))
    assert again.returncode == 1 and "already holds a store" in again.stderr
    for env in ("log", "views"):
        assert Path(dest, env, "data.mdb").stat().st_size <= \
            Path(server.data_dir, env, "data.mdb").stat().st_size
