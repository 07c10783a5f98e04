"""Migration of a store written by otserver 0.1 (release c1e1d7d, schema 1) to the event log and
its views: the fixture tests/fixtures/v1-store (made by that release for real, see
tests/fixtures/README.md) is copied, opened by this release, and must answer every read exactly
as the old release did; then it must keep working. Also: `otserver info` migrates, an interrupted
migration is redone, and an unknown schema (old or new layout) is refused with nothing changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from otserver.agents import DERIVED_FIELDS

FIXTURE = Path(__file__).parent / "fixtures" / "v1-store"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text(encoding="utf-8"))
NAMES = EXPECTED["names"]
APP_SI, SEED_SI, IMPORT_SI = NAMES["app_si"], NAMES["seed_si"], NAMES["import_si"]
SITE_TOKEN = EXPECTED["tokens"]["site"]["token"]
ADMIN_TOKEN = EXPECTED["tokens"]["admin"]["token"]
# The fixture's events only get older: keep them (the default TTL is 60 days).
KEEP = ("--ttl", "3650d")
FIXTURE_DIGEST = hashlib.sha256((FIXTURE / "store" / "data.mdb").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- helpers

def copy_fixture(data_dir: Path) -> Path:
    """A copy of the old store to open (the fixture itself is never opened)."""
    shutil.copytree(FIXTURE / "store", data_dir)
    assert sorted(os.listdir(data_dir)) == ["data.mdb"]
    return data_dir


def migrated_server(make_server, tmp_path, name: str = "otdata"):
    data_dir = copy_fixture(tmp_path / name)
    return make_server(*KEEP, data_dir=data_dir)


def cli(*args: str, data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otserver", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=timeout)


def info(data_dir: Path) -> tuple[dict, str]:
    out = cli("info", "--json", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def answer(server, path: str, token: str = ADMIN_TOKEN) -> dict:
    resp = server.api(path, token)
    assert resp.headers["content-type"].startswith("application/json"), (path, resp)
    return {"status": resp.status, "body": resp.json()}


def pages(server, kind: str, si: str, ident: str, limit: int) -> dict:
    """Every page of a session or user, following next_after (as the fixture recorded them)."""
    out, after = [], None
    while True:
        query = {"si": si, "limit": str(limit), **({"after": after} if after else {})}
        got = answer(server, f"/api/v1/{kind}/{quote(ident, safe='')}?{urlencode(query)}")
        if got["status"] != 200:
            assert not out, got
            return {"si": si, "id": ident, "limit": limit, "status": got["status"],
                    "body": got["body"]}
        out.append(got["body"])
        after = got["body"]["next_after"]
        if after is None:
            return {"si": si, "id": ident, "limit": limit, "status": 200, "pages": out}
        assert len(out) < 1000


def without_cursor(recorded: dict) -> dict:
    """A user's pages with the opaque next_after cursor replaced by whether there was one."""
    if "pages" not in recorded:
        return recorded
    return {**recorded, "pages": [{**p, "next_after": p["next_after"] is not None}
                                  for p in recorded["pages"]]}


def listing(server, si: str, limit: int, **times) -> list[str]:
    """Every event line of a site's listing, following X-Next-After (now a log position)."""
    lines, after = [], None
    while True:
        query = {"si": si, **times, "limit": str(limit), **({"after": after} if after else {})}
        resp = server.api(f"/api/v1/events?{urlencode(query)}", ADMIN_TOKEN)
        assert resp.status == 200 and resp.headers["content-type"].startswith(
            "application/x-ndjson"), resp
        lines += [json.dumps(without_derived(json.loads(line)), ensure_ascii=False,
                             separators=(",", ":")) for line in resp.text.splitlines()]
        after = resp.headers.get("x-next-after")
        if after is None:
            return lines
        assert after.isascii() and after.isdigit(), after
        assert len(lines) < 100_000


def without_derived(answer):
    """An answer without the captured fields the read API derives from the User-Agent since
    0.3 (browser, os, device, bot): 0.1 had none of them; all else must be the same."""
    if isinstance(answer, list):
        return [without_derived(item) for item in answer]
    if not isinstance(answer, dict):
        return answer
    return {name: ({k: v for k, v in value.items() if k not in DERIVED_FIELDS}
                   if name == "captured" and isinstance(value, dict) else without_derived(value))
            for name, value in answer.items()}


def assert_same(kind: str, pairs) -> None:
    """(name, recorded, now) triples: every one equal, else a report naming each difference."""
    wrong = [(name, want, got) for name, want, got in pairs if want != without_derived(got)]
    if wrong:
        report = "\n".join(f"  {name}:\n    0.1: {json.dumps(want, ensure_ascii=False)[:1500]}\n"
                           f"    now: {json.dumps(got, ensure_ascii=False)[:1500]}"
                           for name, want, got in wrong[:5])
        pytest.fail(f"{len(wrong)} {kind} differ from what otserver 0.1 answered:\n{report}")


def compare_sessions(server, only=None, sites=None) -> None:
    """Sessions as recorded (those of the imported site only when asked: their events' times
    have their own test, test_imported_events_keep_their_times)."""
    sites = sites or [si for si in EXPECTED["sites"] if si != IMPORT_SI]
    assert_same("sessions", (
        (f"{r['si']} session {r['id'][:40]!r} limit={r['limit']}", r,
         pages(server, "sessions", r["si"], r["id"], r["limit"]))
        for r in EXPECTED["sessions"] if r["si"] in sites and (only is None or r["id"] in only)))


def compare_users(server, only=None) -> None:
    assert_same("users", (
        (f"{r['si']} user {r['id'][:40]!r} limit={r['limit']}", without_cursor(r),
         without_cursor(pages(server, "users", r["si"], r["id"], r["limit"])))
        for r in EXPECTED["users"] if only is None or r["id"] in only))


def snapshot(data_dir: Path) -> dict:
    """Every file under a data directory with its digest (LMDB lock files: only their names)."""
    out = {}
    for path in sorted(data_dir.rglob("*")):
        rel = str(path.relative_to(data_dir))
        if path.is_dir():
            out[rel + "/"] = None
        else:
            out[rel] = None if path.name == "lock.mdb" else hashlib.sha256(
                path.read_bytes()).hexdigest()
    return out


def set_schema(env_dir: Path, value: bytes) -> None:
    """Write meta `schema` of the LMDB environment at env_dir, in a separate process."""
    code = ("import sys, lmdb\n"
            "env = lmdb.open(sys.argv[1], max_dbs=32)\n"
            "meta = env.open_db(b'meta', create=False)\n"
            "with env.begin(write=True) as txn:\n"
            "    assert txn.get(b'schema', db=meta) is not None\n"
            "    txn.put(b'schema', sys.argv[2].encode(), db=meta)\n"
            "env.close()\n")
    subprocess.run([sys.executable, "-c", code, str(env_dir), value.decode()], check=True,
                   timeout=30)


def refused(args, data_dir: Path, version: str) -> str:
    """Run `otserver ARGS` on data_dir: it must exit non-zero, quickly, naming the schema."""
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "otserver", *args, "--data-dir", str(data_dir)],
                         capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert elapsed < 10, elapsed
    assert "otserver: " in out.stderr, text
    assert f"schema version {version}" in text, text
    assert "Traceback" not in text, text
    return text


SERVE = ("serve", "--host", "127.0.0.1", "--port", "0", *KEEP)


# --------------------------------------------------------------------------- the fixture

def test_the_fixture_is_an_old_store_worth_migrating():
    """What the fixture holds, as its maker checked: chunks, sweeps, an erasure, all sites."""
    counts = EXPECTED["counts"]
    assert counts["session_chunks"] >= 3 and counts["tokens"] == 2
    assert (FIXTURE / "store" / "data.mdb").stat().st_size < 1 << 20
    assert not (FIXTURE / "store" / "lock.mdb").exists()
    by_id = {r["id"]: r for r in EXPECTED["sessions"]}
    hist = by_id[NAMES["swept_history_session"]]["pages"][0]
    assert hist["event_count"] > len(hist["events"]) > 64  # it keeps swept history
    assert EXPECTED["swept"]["eids"] and EXPECTED["erasure"]["status"] == 200
    assert {r["status"] for r in EXPECTED["events"]} == {200, 404}


# --------------------------------------------------------------------------- serve migrates

def test_serve_migrates_the_old_store(make_server, tmp_path):
    server = migrated_server(make_server, tmp_path)
    data_dir = server.data_dir
    assert "migrated " in server.log(), server.log()
    assert not (data_dir / "data.mdb").exists() and not (data_dir / "lock.mdb").exists()
    assert (data_dir / "log" / "data.mdb").is_file() and (data_dir / "views" / "data.mdb").is_file()
    assert not list(data_dir.glob("*.migrating"))
    counts = server.counts()
    for name in ("events", "sessions", "users", "sites", "tokens"):
        assert counts[name] == EXPECTED["counts"][name], (name, counts)


def test_sessions_answer_as_before(make_server, tmp_path):
    compare_sessions(migrated_server(make_server, tmp_path))


def test_users_answer_as_before(make_server, tmp_path):
    compare_users(migrated_server(make_server, tmp_path))


def test_paged_reads_answer_as_before(make_server, tmp_path):
    """Sessions paged by eid (same cursor contract: compared whole), users paged by their
    opaque cursor (its bytes changed: compared without it)."""
    server = migrated_server(make_server, tmp_path)
    pairs = []
    for r in EXPECTED["paged"]:
        now = pages(server, "sessions" if "events" in r["pages"][0] else "users",
                    r["si"], r["id"], r["limit"])
        assert len(r["pages"]) > 1, r["id"]
        if "events" in r["pages"][0]:
            pairs.append((f"session {r['id']} limit={r['limit']}", r, now))
        else:
            pairs.append((f"user {r['id']} limit={r['limit']}", without_cursor(r),
                          without_cursor(now)))
    assert_same("paged reads", pairs)


def test_events_by_eid_answer_as_before(make_server, tmp_path):
    """Every event by eid (the swept and the erased: 404 as before). The imported site has its
    own test below."""
    server = migrated_server(make_server, tmp_path)
    assert_same("events", (
        (f"{r['si']} event {r['eid']}", {"status": r["status"], "body": r["body"]},
         answer(server, f"/api/v1/events/{r['eid']}?{urlencode({'si': r['si']})}"))
        for r in EXPECTED["events"] if r["si"] != IMPORT_SI))


def test_listing_has_the_same_events_in_the_same_order(make_server, tmp_path):
    """Each site's whole listing, and time ranges of it (from/to), paged: the same lines in
    the same order (the cursor itself changed: it is a log position now)."""
    server = migrated_server(make_server, tmp_path)
    pairs = []
    for si, recorded in EXPECTED["listings"].items():
        if si == IMPORT_SI:
            continue
        assert recorded["pages"] > 1 or si != APP_SI
        pairs.append((f"listing of {si}", recorded["lines"],
                      listing(server, si, recorded["limit"])))
    for recorded in EXPECTED["ranged_listings"]:
        times = {k: recorded[k] for k in ("from", "to") if k in recorded}
        assert recorded["lines"]
        pairs.append((f"listing of {recorded['si']} {times}", recorded["lines"],
                      listing(server, recorded["si"], recorded["limit"], **times)))
    assert_same("listings", pairs)


NEW_IN_STATS = ("include_bots", "sessions", "visitors")  # since 0.3


def without_new_stats(answered: dict, counted: list) -> dict:
    """A stats answer as 0.1 gave it; its distinct sessions and visitors go to `counted`."""
    body = answered.get("body")
    if not isinstance(body, dict) or "buckets" not in body:
        return answered
    for row in body["buckets"] + [body["totals"]]:
        counted.append((row["events"], row.pop("sessions"), row.pop("visitors")))
    body.pop("include_bots")
    return answered


def test_stats_answer_as_before(make_server, tmp_path):
    """The 0.1 counters as they were, and the distinct counts 0.1 did not have, counted by the
    migration from the events it moved into the log."""
    server = migrated_server(make_server, tmp_path)
    counted: list = []
    assert_same("stats", (
        (f"stats {r['si']} {r['bucket']}", {"status": r["status"], "body": r["body"]},
         without_new_stats(answer(server, "/api/v1/stats?" + urlencode(
             {"si": r["si"], "bucket": r["bucket"], "from": r["from"], "to": r["to"]})),
             counted))
        for r in EXPECTED["stats"]))
    assert counted
    for events, sessions, visitors in counted:
        assert (events > 0) == (sessions > 0) == (visitors > 0), counted


def test_tokens_authorize_and_refuse_as_before(make_server, tmp_path):
    server = migrated_server(make_server, tmp_path)
    tokens = {"site": SITE_TOKEN, "admin": ADMIN_TOKEN, "none": "ot_not-a-token"}
    assert_same("token checks", (
        (f"{r['token']} token on {r['path']}", {"status": r["status"], "body": r["body"]},
         answer(server, r["path"], tokens[r["token"]]))
        for r in EXPECTED["refusals"]))


def test_imported_events_keep_their_times(make_server, tmp_path):
    """Events the old `otserver import` stored with fresh eids and their own (earlier)
    unixtimestamp: the migration must keep each event's time as stored, not clamp it to the
    time of the entry before it in the log."""
    server = migrated_server(make_server, tmp_path)
    pairs = [(f"{IMPORT_SI} event {r['eid']}", {"status": r["status"], "body": r["body"]},
              answer(server, f"/api/v1/events/{r['eid']}?{urlencode({'si': IMPORT_SI})}"))
             for r in EXPECTED["events"] if r["si"] == IMPORT_SI]
    recorded = EXPECTED["listings"][IMPORT_SI]
    # 0.1 listed by eid; the log (so the listing) is in time order: the same lines, by time.
    by_time = sorted(recorded["lines"], key=lambda line: (
        json.loads(line)["event"]["unixtimestamp"], json.loads(line)["event"]["eid"]))
    assert by_time != recorded["lines"], "the fixture's imported events are in eid order"
    pairs.append((f"listing of {IMPORT_SI}, in time order", by_time,
                  listing(server, IMPORT_SI, recorded["limit"])))
    pairs += [(f"{IMPORT_SI} session {r['id']}", r,
               pages(server, "sessions", IMPORT_SI, r["id"], r["limit"]))
              for r in EXPECTED["sessions"] if r["si"] == IMPORT_SI]
    assert_same("imported events", pairs)


# --------------------------------------------------------------------------- it keeps working

def test_the_migrated_store_keeps_working(make_server, tmp_path):
    server = migrated_server(make_server, tmp_path)
    recorded = {(r["si"], r["id"]): r for r in EXPECTED["sessions"] + EXPECTED["users"]}
    hist_sid = NAMES["swept_history_session"]
    hist = recorded[(APP_SI, hist_sid)]["pages"][0]
    carol = recorded[(APP_SI, "carol")]["pages"][0]

    # New events fold onto an old session (one with swept history): 48 of them fill its tail
    # to a full chunk, written in the new layout beside the converted one.
    added = []
    for n in range(48):
        resp = server.track(si=APP_SI, sid=hist_sid, uid="carol", page=f"/after/{n}",
                            utm_source="after-migration")
        assert resp.status == 200, resp
        added.append(resp.text)
    now = pages(server, "sessions", APP_SI, hist_sid, 1000)["pages"][0]
    assert now["event_count"] == hist["event_count"] + 48
    assert now["first_seen"] == hist["first_seen"]
    assert [e["event"]["eid"] for e in now["events"]] == \
        [e["event"]["eid"] for e in hist["events"]] + added
    assert without_derived(now["events"][:len(hist["events"])]) == hist["events"]
    assert now["session"]["utm_source"] == hist["session"]["utm_source"]  # the first one stays
    assert now["session"]["eid"] == added[-1]
    user = pages(server, "users", APP_SI, "carol", 1000)["pages"][0]
    assert user["event_count"] == carol["event_count"] + 48
    assert user["first_seen"] == carol["first_seen"]

    # an old session of 130 events (two chunks) gets one more; an old user a new session
    long1 = recorded[(APP_SI, "long-1")]["pages"][0]
    eid = server.track(si=APP_SI, sid="long-1", uid="alice", page="/one-more").text
    now = pages(server, "sessions", APP_SI, "long-1", 1000)["pages"][0]
    assert (now["event_count"], now["first_seen"]) == (long1["event_count"] + 1,
                                                       long1["first_seen"])
    assert without_derived(now["events"]) == long1["events"] + [without_derived(answer(
        server, f"/api/v1/events/{eid}?si={APP_SI}")["body"])]
    alice = recorded[(APP_SI, "alice")]["pages"][0]
    assert server.track(si=APP_SI, sid="a-4", uid="alice", page="/new").status == 200
    now = pages(server, "users", APP_SI, "alice", 1000)["pages"][0]
    assert [s["sid"] for s in now["sessions"]] == [s["sid"] for s in alice["sessions"]] + ["a-4"]
    assert now["event_count"] == alice["event_count"] + 2  # one in long-1, one in a-4

    # the erased user stays erased; tokens made by 0.1 still authorize
    erased = NAMES["erased_uid"]
    assert answer(server, f"/api/v1/users/{erased}?si={APP_SI}")["status"] == 404
    assert answer(server, f"/api/v1/sessions/m-1?si={APP_SI}")["status"] == 404
    for eid in EXPECTED["erased_eids"]:
        assert answer(server, f"/api/v1/events/{eid}?si={APP_SI}")["status"] == 404
    assert answer(server, f"/api/v1/users/123456?si={SEED_SI}", SITE_TOKEN)["status"] == 200
    assert answer(server, f"/api/v1/users/123456?si={APP_SI}", SITE_TOKEN)["status"] == 403

    # erasing an old user whose sessions began with events swept before the migration
    dave = recorded[(APP_SI, "dave")]["pages"][0]
    resp = server.request("DELETE", f"/api/v1/users/dave?si={APP_SI}",
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert resp.status == 200, resp
    live = sum(len(recorded[(APP_SI, s["sid"])]["pages"][0]["events"]) for s in dave["sessions"])
    assert resp.json() == {"erased": {"events": live, "sessions_removed": len(dave["sessions"]),
                                      "sessions_refolded": 0}}
    assert answer(server, f"/api/v1/users/dave?si={APP_SI}")["status"] == 404

    # the other records are as they were
    compare_sessions(server, only={"long-2", "shared-1", "shared-2", "v1"})
    compare_users(server, only={"bob", "123456", "lena"})

    assert server.stop() == 0
    data, _ = info(server.data_dir)
    counts = EXPECTED["counts"]
    assert data["events"] == counts["events"] + 48 + 1 + 1 - live
    assert data["sessions"] == counts["sessions"] + 1 - len(dave["sessions"])
    assert data["users"] == counts["users"] - 1
    assert (data["sites"], data["tokens"]) == (counts["sites"], counts["tokens"])
    assert data["view_lag_events"] == 0


def test_the_sweeper_sweeps_a_migrated_store(tmp_path):
    """Retention works on converted records and indexes: with a TTL shorter than the
    fixture's age, `otserver sweep` (which migrates first) deletes everything it may."""
    data_dir = copy_fixture(tmp_path / "otdata")
    out = cli("sweep", "--ttl", "1s", "--allow-short-ttl", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    assert "migrated " in out.stderr
    counts = EXPECTED["counts"]
    swept = re.match(r"swept (\d+) events, (\d+) sessions, (\d+) users", out.stdout)
    assert swept, out.stdout
    data, _ = info(data_dir)
    assert (data["sessions"], data["users"]) == (0, 0), data
    assert data["events"] + int(swept[1]) == counts["events"] and data["events"] <= 1, data
    assert (int(swept[2]), int(swept[3])) == (counts["sessions"], counts["users"])
    # positions are never reused; the events 0.1 had swept, still named by its records, had
    # places of their own in the migrated log
    assert data["log_position"] >= counts["events"]


# --------------------------------------------------------------------------- other ways in

def test_info_migrates_and_a_second_open_finds_nothing_to_migrate(make_server, tmp_path):
    data_dir = copy_fixture(tmp_path / "otdata")
    first, err = info(data_dir)
    assert "migrated " in err, err
    assert not (data_dir / "data.mdb").exists() and (data_dir / "log").is_dir()
    counts = EXPECTED["counts"]
    for name in ("events", "sessions", "users", "sites", "tokens"):
        assert first[name] == counts[name], (name, first)
    assert first["view_lag_events"] == 0
    before = snapshot(data_dir)
    second, err = info(data_dir)
    assert "migrating " not in err and "migrated " not in err, err
    assert {k: v for k, v in second.items() if k != "view_lag_seconds"} == \
        {k: v for k, v in first.items() if k != "view_lag_seconds"}
    assert snapshot(data_dir) == before
    server = make_server(*KEEP, data_dir=data_dir)
    assert "migrating " not in server.log() and "migrated " not in server.log()
    compare_sessions(server, only={NAMES["swept_history_session"], "long-1", "1234567890"})


def test_an_interrupted_migration_is_done_again(make_server, tmp_path):
    """A crash mid-migration leaves log.migrating (and views) behind, the old store whole:
    the next open starts over from the old store, and ends with exactly what a migration
    that was never interrupted makes."""
    clean = copy_fixture(tmp_path / "clean")
    info(clean)
    data_dir = copy_fixture(tmp_path / "otdata")
    for junk_dir in ("log.migrating", "views", "views.migrating"):
        (data_dir / junk_dir).mkdir()
        (data_dir / junk_dir / "data.mdb").write_bytes(b"half a migration " * 1000)
        (data_dir / junk_dir / "junk").write_text("left by a crash")
    server = make_server(*KEEP, data_dir=data_dir)
    assert "migrated " in server.log()
    assert not list(data_dir.glob("*.migrating")) and not (data_dir / "views" / "junk").exists()
    assert not (data_dir / "data.mdb").exists()
    compare_sessions(server)
    assert server.stop() == 0
    assert dump(data_dir) == dump(clean)


def dump(data_dir: Path) -> dict:
    """Every key and value of the log and the views (named databases, meta included)."""
    import lmdb

    from otserver import log, views
    out = {}
    for name, names, dupsort in (("log", log.NAMES, ()), ("views", views.NAMES, views.DUPSORT)):
        env = lmdb.open(str(data_dir / name), readonly=True, lock=False, max_dbs=32)
        try:
            with env.begin() as txn:
                for db_name in names + ("meta",):
                    db = env.open_db(db_name.encode(), txn=txn, create=False,
                                     dupsort=db_name in dupsort)
                    out[f"{name}/{db_name}"] = list(txn.cursor(db=db))
        finally:
            env.close()
    return out


def test_a_finished_migration_whose_old_files_were_left_removes_them(tmp_path):
    """A crash after the log was renamed into place but before data.mdb was deleted: the next
    open deletes the old files and migrates nothing twice."""
    data_dir = copy_fixture(tmp_path / "otdata")
    first, _ = info(data_dir)
    shutil.copy(FIXTURE / "store" / "data.mdb", data_dir / "data.mdb")
    second, err = info(data_dir)
    assert not (data_dir / "data.mdb").exists()
    for name in ("events", "sessions", "users", "log_position"):
        assert second[name] == first[name], (name, second, first)


# --------------------------------------------------------------------------- unknown schemas

def test_an_old_store_of_an_unknown_schema_is_refused_untouched(tmp_path):
    data_dir = copy_fixture(tmp_path / "otdata")
    set_schema(data_dir, b"9")
    before = snapshot(data_dir)
    for args in (SERVE, ("info", "--json")):
        refused(args, data_dir, "9")
        assert snapshot(data_dir) == before
        assert not (data_dir / "log").exists() and not (data_dir / "views").exists()
        assert (data_dir / "data.mdb").is_file()


@pytest.mark.parametrize("environment", ["log", "views"])
def test_a_new_store_of_an_unknown_schema_is_refused_untouched(tmp_path, environment):
    data_dir = copy_fixture(tmp_path / "otdata")
    info(data_dir)  # migrated: the new layout
    set_schema(data_dir / environment, b"99")
    before = snapshot(data_dir)
    for args in (SERVE, ("info", "--json")):
        refused(args, data_dir, "99")
        assert snapshot(data_dir) == before


def test_the_fixture_itself_is_untouched():
    assert sorted(os.listdir(FIXTURE / "store")) == ["data.mdb"]
    assert hashlib.sha256((FIXTURE / "store" / "data.mdb").read_bytes()).hexdigest() == \
        FIXTURE_DIGEST
