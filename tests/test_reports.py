"""Reports (SPEC 5): the event listing with cursor paging under concurrent ingest, per-minute
stats against a hand count, the live SSE stream (over raw sockets, including a stalled reader),
user erasure, and the export/import round trip. Real server processes, real LMDB, real CLI.
"""
from __future__ import annotations

import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlencode

import pytest
from conftest import SseReader, assert_json_error

UUID7_VERSION = 0x7000


# --------------------------------------------------------------------------- helpers

def q(value: str) -> str:
    return quote(value, safe="")


def ok_eid(resp) -> str:
    assert resp.status == 200, resp
    assert len(resp.text) == 36, resp
    return resp.text


def ok_json(resp):
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert "access-control-allow-origin" not in resp.headers
    return resp.json()


def api_path(kind: str, ident: str | None = None, **params) -> str:
    base = f"/api/v1/{kind}" + (f"/{q(ident)}" if ident is not None else "")
    return base + ("?" + urlencode(params) if params else "")


def ndjson(resp) -> list[dict]:
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("application/x-ndjson"), resp.headers
    assert "access-control-allow-origin" not in resp.headers
    if not resp.body:
        return []
    assert resp.body.endswith(b"\n"), resp.body[-50:]
    return [json.loads(line) for line in resp.body.decode().split("\n")[:-1]]


def list_all(server, token, si, limit=1000, **params) -> list[dict]:
    """Every listed event of a site, following X-Next-After (a log position, on every page
    that lists an event) to the first empty page."""
    out = []
    after = None
    for _ in range(1000):
        query = dict(si=si, limit=str(limit), **params)
        if after:
            query["after"] = after
        resp = server.api(api_path("events", **query), token)
        page = ndjson(resp)
        out += page
        cursor = resp.headers.get("x-next-after")
        if not page:
            assert cursor is None, cursor
            return out
        assert cursor is not None and cursor.isdigit(), cursor
        assert after is None or int(cursor) > int(after)
        after = cursor
    raise AssertionError("listing never ended")


def positions(server, token, si) -> dict[str, int]:
    """eid -> log position of each listed event of a site (a walk one event per page)."""
    out = {}
    after = None
    while True:
        query = dict(si=si, limit="1", **({"after": after} if after else {}))
        resp = server.api(api_path("events", **query), token)
        page = ndjson(resp)
        if not page:
            return out
        after = resp.headers["x-next-after"]
        out[page[0]["event"]["eid"]] = int(after)


def session_all(server, token, si, sid, limit=1000) -> dict:
    """A session's payload with every page of its events gathered into `events`."""
    payload = None
    after = None
    for _ in range(1000):
        params = dict(si=si, limit=str(limit))
        if after:
            params["after"] = after
        page = ok_json(server.api(api_path("sessions", sid, **params), token))
        if payload is None:
            payload = page
        else:
            assert {k: v for k, v in page.items() if k not in ("events", "next_after")} == \
                {k: v for k, v in payload.items() if k not in ("events", "next_after")}
            payload["events"] += page["events"]
        after = page["next_after"]
        if after is None:
            payload["next_after"] = None
            return payload
    raise AssertionError("session paging never ended")


def user_all(server, token, si, uid, limit=1000) -> dict:
    payload = None
    after = None
    for _ in range(1000):
        params = dict(si=si, limit=str(limit))
        if after:
            params["after"] = after
        page = ok_json(server.api(api_path("users", uid, **params), token))
        if payload is None:
            payload = page
        else:
            payload["sessions"] += page["sessions"]
        after = page["next_after"]
        if after is None:
            payload["next_after"] = None
            return payload
    raise AssertionError("user paging never ended")


def iso(ms: int, precision: str = "milliseconds") -> str:
    text = datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec=precision)
    return text.replace("+00:00", "Z")


def otserver_cli(*args: str, stdin=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otserver", *args], capture_output=True,
                          encoding="utf-8", timeout=timeout, input=stdin)


def batch(server, lines: list[dict], headers: dict | None = None, **query) -> list[str]:
    body = "\n".join(urlencode(props, quote_via=quote) for props in lines)
    target = "/batch" + ("?" + urlencode(query) if query else "")
    resp = server.post(target, body, headers=headers)
    assert resp.status == 200, resp
    eids = resp.text.split()
    assert len(eids) == len(lines)
    return eids


class KeepAlive:
    """One keep-alive connection for many ingest requests."""

    def __init__(self, server, timeout: float = 10):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)

    def track(self, headers=None, **props) -> tuple[int, str]:
        self.conn.request("GET", "/?" + urlencode(props, quote_via=quote), headers=headers or {})
        resp = self.conn.getresponse()
        return resp.status, resp.read().decode()

    def close(self):
        self.conn.close()


def make_eid(ts: int, rng: random.Random) -> str:
    """A UUIDv7 carrying millisecond `ts`."""
    n = (ts << 80) | UUID7_VERSION << 64 | rng.getrandbits(12) << 64 | 1 << 63 | rng.getrandbits(62)
    h = "%032x" % n
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def import_file(data_dir, path) -> subprocess.CompletedProcess:
    return otserver_cli("import", str(path), "--data-dir", str(data_dir))


# --------------------------------------------------------------------------- 1. listing

def test_paging_across_concurrent_ingest_sees_every_acknowledged_event_once(server):
    si, other = "page.example", "page-other.example"
    token = server.create_token(si)
    acked: list[list[str]] = [[] for _ in range(4)]
    other_acked: list[str] = []
    failures: list = []

    def ingest(n: int, count: int):
        conn = KeepAlive(server)
        try:
            for i in range(count):
                status, body = conn.track(si=si, sid=f"s{n}-{i // 50}", uid=f"u{n}", n=str(i))
                if status != 200:
                    failures.append((status, body))
                    return
                acked[n].append(body)
                if i % 5 == 0:
                    status, body = conn.track(si=other, sid=f"x{n}", i=str(i))
                    if status != 200:
                        failures.append((status, body))
                        return
                    other_acked.append(body)
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=ingest, args=(n, 375), daemon=True) for n in range(4)]
    for t in threads:
        t.start()

    seen: list[str] = []
    after = None
    pages_during = 0

    def page() -> int:
        nonlocal after
        params = dict(si=si, limit="100")
        if after:
            params["after"] = after
        resp = server.api(api_path("events", **params), token)
        lines = ndjson(resp)
        assert len(lines) <= 100
        for line in lines:
            assert line["event"]["si"] == si, line
            assert set(line) == {"event", "captured"}
        eids = [line["event"]["eid"] for line in lines]
        seen.extend(eids)
        cursor = resp.headers.get("x-next-after")
        if eids:
            assert cursor is not None and (after is None or int(cursor) > int(after)), cursor
            after = cursor
        else:
            assert cursor is None, cursor
        return len(lines)

    deadline = time.monotonic() + 90
    while any(t.is_alive() for t in threads):
        assert time.monotonic() < deadline, "ingest did not finish in time"
        if page() < 100:
            time.sleep(0.02)
        pages_during += 1
    for t in threads:
        t.join(5)
    assert not failures, failures[:3]
    assert pages_during > 3  # the paging really ran beside the ingest
    while page() == 100:
        assert time.monotonic() < deadline
    assert page() == 0  # the end, and it stays the end

    all_acked = [eid for part in acked for eid in part]
    assert len(all_acked) == 1500
    assert len(seen) == len(set(seen)), "an event was listed twice"
    assert seen == sorted(seen), "not in eid order (one process: log order is eid order)"
    missing = set(all_acked) - set(seen)
    assert not missing, f"{len(missing)} acknowledged events never listed"
    assert set(seen) == set(all_acked)
    assert not set(seen) & set(other_acked)

    # One big page lists the same, and the default page is 1000 with a cursor.
    full = server.api(api_path("events", si=si, limit="10000"), token)
    assert [x["event"]["eid"] for x in ndjson(full)] == seen
    end = ndjson(server.api(api_path("events", si=si, after=full.headers["x-next-after"]), token))
    assert end == []
    default = server.api(api_path("events", si=si), token)
    lines = ndjson(default)
    assert [x["event"]["eid"] for x in lines] == seen[:1000]
    rest = server.api(api_path("events", si=si, after=default.headers["x-next-after"]), token)
    assert [x["event"]["eid"] for x in ndjson(rest)] == seen[1000:]
    # Each connection's events are listed in the order they were acknowledged.
    for part in acked:
        assert [eid for eid in seen if eid in set(part)] == part


def test_listing_from_to_in_ms_and_iso_and_other_sites(server):
    si, other = "range.example", "range-other.example"
    token = server.create_token(si)
    other_token = server.create_token(other)
    admin = server.create_token("*")
    mine, theirs = [], []
    for group in range(4):
        for i in range(5):
            mine.append(ok_eid(server.track(si=si, g=str(group), i=str(i))))
            theirs.append(ok_eid(server.track(si=other, g=str(group), i=str(i))))
        time.sleep(0.06)
    events = [x["event"] for x in list_all(server, token, si)]
    assert [e["eid"] for e in events] == mine
    assert all(e["si"] == si for e in events)
    ts = [e["unixtimestamp"] for e in events]
    assert ts == sorted(ts)

    def expect(lo, hi):
        return [e["eid"] for e in events if lo <= e["unixtimestamp"] < hi]

    def listed(**params):
        return [x["event"]["eid"] for x in list_all(server, token, si, limit=3, **params)]

    lo, hi = ts[5], ts[15]  # group 1's first event to group 3's first
    assert listed(**{"from": str(lo), "to": str(hi)}) == expect(lo, hi)
    assert expect(lo, hi) == mine[5:15]
    assert listed(**{"from": str(lo)}) == mine[5:]
    assert listed(to=str(hi)) == mine[:15]
    assert listed(**{"from": str(lo), "to": str(lo + 1)}) == expect(lo, lo + 1)
    backwards = server.api(api_path("events", si=si, **{"from": str(hi), "to": str(lo)}), token)
    if backwards.status == 400:  # an empty range: nothing listed, or a refusal
        assert_json_error(backwards, 400)
    else:
        assert ndjson(backwards) == []
    # ISO 8601, with milliseconds, as UTC with Z, and as an offset
    assert listed(**{"from": iso(lo), "to": iso(hi)}) == mine[5:15]
    offset = iso(lo).replace("Z", "+00:00")
    assert listed(**{"from": offset}) == mine[5:]
    shifted = datetime.fromtimestamp(lo / 1000, tz=timezone.utc).astimezone(
        timezone(timedelta(hours=2))).isoformat(timespec="milliseconds")
    assert listed(**{"from": shifted}) == mine[5:]
    # Whole seconds: everything from the start of the second of the first event
    second = ts[0] // 1000 * 1000
    assert listed(**{"from": iso(second, "seconds")}) == expect(second, 1 << 60)
    assert listed(to=iso(second, "seconds")) == []
    # after and from together: after wins when it is later, from when it is later
    where = positions(server, token, si)
    assert list(where) == mine and list(where.values()) == sorted(where.values())
    assert listed(**{"from": str(lo), "after": str(where[mine[10]])}) == mine[11:]
    assert listed(**{"from": str(hi), "after": str(where[mine[1]])}) == mine[15:]
    # other sites: not listed, and their token cannot list this one
    assert not set(listed()) & set(theirs)
    assert [x["event"]["eid"] for x in list_all(server, other_token, other)] == theirs
    assert [x["event"]["eid"] for x in list_all(server, admin, other)] == theirs
    assert_json_error(server.api(api_path("events", si=si), other_token), 403)
    assert_json_error(server.api(api_path("events", si=si), None), 401)
    assert_json_error(server.api(api_path("events", si=si), "ot_" + "x" * 43), 401)
    assert list_all(server, admin, "nobody.example") == []


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "10001"}, {"limit": "abc"}, {"limit": "-1"}, {"limit": ""},
    {"after": "not-a-position"}, {"after": "0190000000007000800000000000000"},
    {"after": "-3"}, {"after": "01a217a4-7e4b-7773-a97f-4e5514e16c82"},
    {"from": "yesterday"}, {"to": "2026-13-45T00:00:00Z"}, {"from": "-5"}, {"to": "1.5e12"},
], ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()))
def test_listing_bad_parameters_are_400_json(shared_server, params):
    si = "bad-params.example"
    token = shared_server.create_token(si)
    if params.get("limit") == "":
        resp = shared_server.api(api_path("events", si=si, **params), token)
        assert resp.status in (200, 400), resp  # an empty limit: the default or a refusal
        return
    assert_json_error(shared_server.api(api_path("events", si=si, **params), token), 400)


def test_listing_after_the_largest_position_is_an_answer_not_500(shared_server):
    si = "after-max.example"
    token = shared_server.create_token(si)
    ok_eid(shared_server.track(si=si))
    resp = shared_server.api(api_path("events", si=si, after=str((1 << 63) - 1)), token)
    assert ndjson(resp) == []
    # an eid is not a cursor of the listing (positions are)
    eid = ok_eid(shared_server.track(si=si))
    assert_json_error(shared_server.api(api_path("events", si=si, after=eid), token), 400)


def test_listing_without_si_is_400(shared_server):
    admin = shared_server.create_token("*")
    assert_json_error(shared_server.api("/api/v1/events", admin), 400)
    assert_json_error(shared_server.api("/api/v1/events?si=", admin), 400)


# --------------------------------------------------------------------------- 2. stats

MIN, HOUR, DAY = 60_000, 3_600_000, 86_400_000


def hand_count(events: list[dict]) -> dict:
    """events: flat records of one site in eid order -> {minute start: [events, sessions, users]}.
    A session (user) is new at its first event; increment=false events are not counted."""
    counts: dict[int, list] = {}
    seen_sessions, seen_users = set(), set()
    for ev in events:
        counted = ev.get("increment") != "false"
        minute = ev["unixtimestamp"] // MIN * MIN
        if counted:
            row = counts.setdefault(minute, [0, 0, 0])
            row[0] += 1
            if ev["sid"] not in seen_sessions:
                row[1] += 1
            if ev["uid"] not in seen_users:
                row[2] += 1
        seen_sessions.add(ev["sid"])
        seen_users.add(ev["uid"])
    return counts


def rebucket(counts: dict, size: int, lo: int = 0, hi: int = 1 << 62) -> dict:
    out: dict[int, list] = {}
    for minute, row in counts.items():
        if lo // MIN * MIN <= minute < hi:
            into = out.setdefault(minute // size * size, [0, 0, 0])
            for i in range(3):
                into[i] += row[i]
    return {k: v for k, v in out.items() if any(v)}


def stats(server, token, si, **params) -> dict:
    payload = ok_json(server.api(api_path("stats", si=si, **params), token))
    assert payload["si"] == si
    rows = payload["buckets"]
    starts = [r["start"] for r in rows]
    assert starts == sorted(set(starts))
    size = {"minute": MIN, "hour": HOUR, "day": DAY}[payload["bucket"]]
    for row in rows:
        assert set(row) == {"start", "events", "new_sessions", "new_users", "sessions",
                            "visitors"}
        assert 1 <= row["sessions"] <= row["events"] and 1 <= row["visitors"] <= row["events"]
        assert row["start"] % size == 0
    totals = {name: sum(r[name] for r in rows) for name in ("events", "new_sessions", "new_users")}
    assert {name: payload["totals"][name] for name in totals} == totals
    return payload


def nonzero(payload) -> dict:
    return {r["start"]: [r["events"], r["new_sessions"], r["new_users"]]
            for r in payload["buckets"] if r["events"] or r["new_sessions"] or r["new_users"]}


def test_stats_match_a_hand_count_over_minutes_hours_days(make_server, tmp_path):
    """Events spread over three days (imported with their own times), then live ingest in the
    current minute, with increment=false events among them; stats per minute, hour and day."""
    si, other = "stats.example", "stats-other.example"
    rng = random.Random(7)
    now = int(time.time() * 1000)
    plan = [  # (ms before now, sid, uid, increment)
        (50 * HOUR, "old-1", "ann", None), (50 * HOUR - 10, "old-1", "ann", None),
        (50 * HOUR - 5 * MIN, "old-1", "ann", "false"),
        (49 * HOUR, "old-2", "bob", None),
        (30 * HOUR, "quiet", "quiet-user", "false"),  # a session and user never counted
        (30 * HOUR - 1, "quiet", "quiet-user", "false"),
        (26 * HOUR, "old-3", "ann", None),
        (23 * HOUR, "day-1", "cid", None), (23 * HOUR - 2 * MIN, "day-1", "cid", "false"),
        (23 * HOUR - 3 * MIN, "day-1", "dan", None),
        (5 * HOUR, "day-2", "cid", None), (5 * HOUR - 61_000, "day-2", "cid", None),
        (2 * HOUR + 30_000, "day-3", "eve", None), (2 * HOUR, "day-3", "eve", None),
        (2 * HOUR - 1, "day-3", "fay", None), (2 * HOUR - 2, "day-4", "fay", "false"),
        (90 * MIN, "only-uncounted-minute", "ann", "false"),
    ]
    lines = []
    for ago, sid, uid, inc in sorted(plan, key=lambda p: -p[0]):
        ts = now - ago
        record = {"unixtimestamp": ts, "si": si, "page": "/x"}
        if inc is not None:
            record["increment"] = inc
        record.update(eid=make_eid(ts, rng), sid=sid, uid=uid)
        lines.append(json.dumps({"event": record, "captured": {}}))
        other_rec = dict(record, si=other, eid=make_eid(ts, rng))
        other_rec.pop("increment", None)
        lines.append(json.dumps({"event": other_rec, "captured": {}}))
    lines.sort(key=lambda line: json.loads(line)["event"]["eid"])
    source = tmp_path / "planned.ndjson"
    source.write_text("\n".join(lines) + "\n")
    data_dir = tmp_path / "statsdata"
    out = import_file(data_dir, source)
    assert out.returncode == 0, out.stderr

    server = make_server(data_dir=data_dir)
    token = server.create_token(si)
    # live ingest now: new and returning sessions and users, and uncounted events
    ok_eid(server.track(si=si, sid="day-3", uid="eve"))        # returning session and user
    ok_eid(server.track(si=si, sid="now-1", uid="ann"))        # new session, returning user
    ok_eid(server.track(si=si, sid="now-2", uid="gus"))        # new session, new user
    ok_eid(server.track(si=si, sid="now-2", uid="gus", increment="false"))
    ok_eid(server.track(si=si, sid="now-3", uid="hal", increment="false"))  # never counted
    ok_eid(server.track(si=si, increment="false"))            # sid = uid = eid, never counted
    ok_eid(server.track(si=si))                               # sid = uid = eid, counted
    ok_eid(server.track(si=si, sid="now-2", uid="gus", increment="true"))  # counted
    for _ in range(3):
        ok_eid(server.track(si=other, sid="elsewhere"))
    events = [x["event"] for x in list_all(server, token, si)]
    assert len(events) == len(plan) + 8
    expected = hand_count(events)
    assert sum(r[0] for r in expected.values()) == sum(
        1 for e in events if e.get("increment") != "false")
    end = int(time.time() * 1000) + 2 * MIN
    start = (now - 4 * DAY) // DAY * DAY

    for bucket, size in (("minute", MIN), ("hour", HOUR), ("day", DAY)):
        for lo, hi in ((str(start), str(end)), (iso(start, "seconds"), iso(end))):
            got = stats(server, token, si, bucket=bucket, **{"from": lo, "to": hi})
            assert got["bucket"] == bucket and got["from"] == start
            assert nonzero(got) == rebucket(expected, size), bucket
            assert got["totals"]["events"] == sum(r[0] for r in expected.values())

    # A range inside: from one event's minute (included) to another's (excluded).
    first_minute = (now - 26 * HOUR) // MIN * MIN
    stop_minute = (now - 2 * HOUR) // MIN * MIN
    got = stats(server, token, si, bucket="minute", **{"from": str(first_minute),
                                                       "to": str(stop_minute)})
    assert nonzero(got) == rebucket(expected, MIN, first_minute, stop_minute)
    got = stats(server, token, si, bucket="hour", **{"from": iso(first_minute, "seconds"),
                                                     "to": iso(stop_minute, "seconds")})
    assert nonzero(got) == rebucket(expected, HOUR, first_minute, stop_minute)

    # The default range is the last 24 hours (by hour).
    asked = int(time.time() * 1000)
    got = stats(server, token, si)
    answered = int(time.time() * 1000)
    assert got["bucket"] == "hour"
    assert asked <= got["to"] <= answered + 1  # "now" as the server saw it (to is exclusive)
    assert got["to"] - got["from"] == DAY
    assert nonzero(got) == rebucket(expected, HOUR, got["from"], got["to"])
    assert got["totals"]["events"] == sum(
        r[0] for m, r in expected.items() if m >= now - 24 * HOUR)

    # another site is counted apart
    other_token = server.create_token(other)
    got = stats(server, other_token, other, bucket="day", **{"from": str(start), "to": str(end)})
    assert got["totals"]["events"] == len(plan) + 3
    # a site with nothing is all zeros
    admin = server.create_token("*")
    empty = stats(server, admin, "nobody.example", bucket="minute")
    assert nonzero(empty) == {} and empty["totals"] == {"events": 0, "new_sessions": 0,
                                                        "new_users": 0, "sessions": 0,
                                                        "visitors": 0}


def test_stats_count_live_ingest_at_commit(server):
    si = "stats-live.example"
    token = server.create_token(si)
    before = stats(server, token, si, bucket="minute")["totals"]
    assert before == {"events": 0, "new_sessions": 0, "new_users": 0, "sessions": 0,
                      "visitors": 0}
    ok_eid(server.track(si=si, sid="a", uid="one"))
    ok_eid(server.track(si=si, sid="a", uid="one"))
    ok_eid(server.track(si=si, sid="a", uid="two"))
    ok_eid(server.track(si=si, sid="b", uid="two", increment="false"))
    batch(server, [{"sid": "c", "uid": "three"}, {"sid": "c", "uid": "three"},
                   {"sid": "d", "uid": "four", "increment": "false"}], si=si)
    # counted at commit: no settle time needed
    got = stats(server, token, si, bucket="day")
    assert got["totals"] == {"events": 5, "new_sessions": 2, "new_users": 3, "sessions": 2,
                             "visitors": 3}


@pytest.mark.parametrize("params", [
    {"bucket": "week"}, {"bucket": "Minute"}, {"bucket": ""}, {"from": "abc"},
    {"to": "2026-02-30T00:00:00Z"}, {"from": "1000", "to": "1000"}, {"from": "2000", "to": "1000"},
    {"from": "2026-11-26T10:00:00Z", "to": "2026-11-26T09:59:59Z"},
], ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()))
def test_stats_bad_parameters_are_400_json(shared_server, params):
    si = "stats-bad.example"
    token = shared_server.create_token(si)
    assert_json_error(shared_server.api(api_path("stats", si=si, **params), token), 400)


def test_stats_with_a_huge_time_is_a_json_answer_not_500(shared_server):
    si = "stats-huge.example"
    token = shared_server.create_token(si)
    ok_eid(shared_server.track(si=si))
    resp = shared_server.api(api_path("stats", si=si, **{"from": "0", "to": "9" * 20}), token)
    assert resp.status in (200, 400), resp
    assert resp.headers["content-type"].startswith("application/json")
    if resp.status == 400:
        assert_json_error(resp, 400)


def test_stats_auth(shared_server):
    si = "stats-auth.example"
    token = shared_server.create_token("stats-auth-other.example")
    assert_json_error(shared_server.api(api_path("stats", si=si), token), 403)
    assert_json_error(shared_server.api(api_path("stats", si=si), None), 401)


# --------------------------------------------------------------------------- 3. live (SSE)

class Live(SseReader):
    """A live subscriber whose events' ids are checked to rise (one log order)."""

    def __init__(self, server, si: str, token: str | None, rcvbuf: int | None = None,
                 timeout: float = 5.0):
        super().__init__(server, si, token, rcvbuf=rcvbuf, timeout=timeout)
        self.last_id = 0

    def event(self, timeout: float = 5.0) -> tuple[str, dict]:
        """The next event frame (comments skipped) -> (its eid, data). Its `id:` is the log
        position, checked to rise from frame to frame (one log order)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.frame(max(0.01, deadline - time.monotonic()))
            if all(line.startswith(":") for line in lines):
                continue
            fields = dict(line.split(": ", 1) for line in lines)
            assert set(fields) == {"id", "data"}, lines
            assert fields["id"].isdigit() and int(fields["id"]) > self.last_id, lines
            self.last_id = int(fields["id"])
            data = json.loads(fields["data"])
            return data["event"]["eid"], data


def test_live_stream_carries_committed_events_of_its_site_only(server):
    si, other = "live.example", "live-other.example"
    token = server.create_token(si)
    other_token = server.create_token(other)
    live = Live(server, si, token)
    try:
        assert live.status == 200
        assert live.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in live.headers
        assert "access-control-allow-origin" not in live.headers
        first = live.frame()
        assert first[0].startswith(":"), first  # a comment line opens the stream
        ok_eid(server.track(si=other, sid="o", secret="not for you"))
        eid = ok_eid(server.track(headers={"User-Agent": "LiveAgent/1"}, si=si, sid="s1",
                                  uid="u1", page="/pricing", note="héllo wörld"))
        got_id, data = live.event()
        assert got_id == eid
        assert data["event"]["eid"] == eid
        assert data["event"]["page"] == "/pricing" and data["event"]["note"] == "héllo wörld"
        assert data["event"]["si"] == si and data["event"]["sid"] == "s1"
        assert data["event"]["uid"] == "u1"
        assert data["captured"]["user_agent"] == "LiveAgent/1"
        stored = ok_json(server.api(api_path("events", eid, si=si), token))
        assert data == stored
        # a batch: one frame per event, in order; other sites' events never show up
        for i in range(3):
            ok_eid(server.track(si=other, i=str(i)))
        eids = batch(server, [{"si": si, "n": str(i)} for i in range(5)])
        ok_eid(server.track(si=other, last="1"))
        last = ok_eid(server.track(si=si, last="1"))
        got = [live.event() for _ in range(6)]
        assert [g[0] for g in got] == eids + [last]
        assert [g[1]["event"].get("n") for g in got[:5]] == [str(i) for i in range(5)]
        assert all(g[1]["event"]["si"] == si for g in got)
        # nothing else is pending for this subscriber (no other site's frames)
        live.sock.settimeout(0.3)
        try:
            extra = live.sock.recv(65536)
        except socket.timeout:
            extra = b""
        assert b"data:" not in live.buf + extra
        # a refused request is not stored and not streamed
        assert server.track(si=si, eid="x").status == 400
        confirm = ok_eid(server.track(si=si, confirm="1"))
        assert live.event()[0] == confirm
    finally:
        live.close()
    # the other site's subscriber got its own
    other_live = Live(server, other, other_token)
    try:
        other_live.frame()
        mine = ok_eid(server.track(si=other, here="1"))
        assert other_live.event()[0] == mine
    finally:
        other_live.close()


def sse_dispatch(raw: bytes) -> list[dict]:
    """Events as a browser's EventSource would dispatch them from `raw` (WHATWG HTML 9.2.6:
    lines end with CRLF, LF or CR; a blank line dispatches; ':' lines are comments)."""
    import re
    events, data, ident = [], [], None
    for line in re.split(r"\r\n|\r|\n", raw.decode()):
        if line == "":
            if data:
                events.append({"id": ident, "data": "\n".join(data)})
            data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id":
            ident = value
    return events


def test_live_opening_comment_cannot_inject_fields(server):
    """The opening comment must stay one comment line whatever the site is called (a CR in
    `si` once ended it early and the rest was read as fields: a fake event)."""
    si = "odd\rdata: fake\rid: 666\r"  # a site name may hold a CR (%0D)
    admin = server.create_token("*")
    live = Live(server, si, admin)
    try:
        assert live.status == 200
        eid = ok_eid(server.track(si=si, real="1"))
        deadline = time.monotonic() + 5
        while eid.encode() + b'","sid"' not in live.buf and time.monotonic() < deadline:
            live.sock.settimeout(0.5)
            try:
                live.buf += live.sock.recv(65536)
            except socket.timeout:
                pass
        dispatched = sse_dispatch(live.buf)
    finally:
        live.close()
    assert len(dispatched) == 1 and dispatched[0]["id"].isdigit(), dispatched
    assert json.loads(dispatched[0]["data"])["event"]["eid"] == eid
    assert json.loads(dispatched[0]["data"])["event"]["real"] == "1"


def test_live_two_subscribers_each_get_every_event(server):
    si = "live-two.example"
    token = server.create_token(si)
    a, b = Live(server, si, token), Live(server, si, token)
    try:
        a.frame(), b.frame()
        eids = [ok_eid(server.track(si=si, i=str(i))) for i in range(4)]
        assert [a.event()[0] for _ in eids] == eids
        assert [b.event()[0] for _ in eids] == eids
    finally:
        a.close()
        b.close()
    # closed subscribers cost nothing: ingest goes on
    ok_eid(server.track(si=si, after="close"))


def test_live_auth_and_method(server):
    si = "live-auth.example"
    token = server.create_token("live-auth-other.example")
    for tok, status in ((None, 401), ("ot_" + "z" * 43, 401), (token, 403)):
        resp = server.api(api_path("live", si=si), tok)
        assert_json_error(resp, status)
    good = server.create_token(si)
    assert_json_error(server.api(api_path("live"), good), 400)
    resp = server.request("HEAD", api_path("live", si=si),
                          headers={"Authorization": f"Bearer {good}"})
    assert resp.status == 405
    resp = server.request("POST", api_path("live", si=si), body=b"",
                          headers={"Authorization": f"Bearer {good}"})
    assert resp.status == 405


def test_live_heartbeat_and_no_idle_timeout(make_server):
    server = make_server("--live-heartbeat", "1s", "--keepalive", "1s")
    si = "live-beat.example"
    token = server.create_token(si)
    live = Live(server, si, token)
    try:
        live.frame()
        started = time.monotonic()
        beats = 0
        while beats < 3:
            lines = live.frame(timeout=3.0)
            assert lines == [": heartbeat"], lines
            beats += 1
        elapsed = time.monotonic() - started
        assert 1.5 <= elapsed <= 8, elapsed  # about one a second
        # idle past the keep-alive deadline, the stream is still open and still streams
        eid = ok_eid(server.track(si=si, late="1"))
        assert live.event(timeout=3.0)[0] == eid
    finally:
        live.close()


def test_live_stream_ends_on_sigterm_drain(server):
    si = "live-drain.example"
    token = server.create_token(si)
    live = Live(server, si, token)
    live.frame()
    eid = ok_eid(server.track(si=si))
    assert live.event()[0] == eid
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    ended, _ = _read_until_dropped(live, timeout=5)
    live.close()
    assert ended


def _stop_with_workers(server) -> None:
    """SIGTERM the supervisor (it drains its workers), then make sure no worker it started is
    left behind: a SIGKILLed supervisor would orphan them."""
    import os
    import re
    import signal
    try:
        server.stop()
    finally:
        for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", server.log()):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_live_with_several_workers_streams_every_event(make_server):
    server = make_server("--workers", "2")
    try:
        si = "live-workers.example"
        token = server.create_token(si)
        live = Live(server, si, token)
        try:
            live.frame()
            eids = [ok_eid(server.track(si=si, i=str(i))) for i in range(20)]  # new connections
            got = []
            try:
                while len(got) < len(eids):
                    got.append(live.event(timeout=3)[0])
            except (TimeoutError, ConnectionError):
                pass
        finally:
            live.close()
        assert got == eids
    finally:
        _stop_with_workers(server)


def _read_until_dropped(live: Live, timeout: float = 10.0) -> tuple[bool, int]:
    """Read what the stalled subscriber was sent -> (the stream ended, bytes read)."""
    received = len(live.buf)
    deadline = time.monotonic() + timeout
    live.sock.settimeout(1.0)
    while time.monotonic() < deadline:
        try:
            chunk = live.sock.recv(1 << 20)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return True, received
        if not chunk:
            return True, received
        received += len(chunk)
    return False, received


def _flood(server, si: str, count: int, props: dict) -> float:
    """Ingest `count` events on one keep-alive connection (POST form bodies); every one must
    be answered 200 and the whole run must stay within 10 s. -> the seconds taken."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body = urlencode(dict(si=si, sid="flood", **props))
    started = time.monotonic()
    try:
        for i in range(count):
            conn.request("POST", f"/?i={i}", body=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, (i, resp.status)
            assert time.monotonic() - started < 10, f"ingest stalled after {i} events"
    finally:
        conn.close()
    return time.monotonic() - started


def test_stalled_live_subscriber_is_dropped_and_ingest_goes_on(make_server):
    server = make_server("--live-buffer-bytes", "64KiB")
    si = "live-stall.example"
    token = server.create_token(si)
    stalled = Live(server, si, token, rcvbuf=2048)
    stalled.frame()  # subscribed; from here on it never reads
    # 300 events of ~56 KB: ~17 MB owed, far past the 64 KiB bound and any socket buffer
    props = {f"pad{k}": chr(ord("a") + k) * 8000 for k in range(7)}
    seconds = _flood(server, si, 300, props)
    assert seconds < 10
    ended, received = _read_until_dropped(stalled)
    stalled.close()
    assert ended, f"the stalled subscriber was not dropped (read {received} bytes)"
    assert received < 8_000_000, received
    # healthy afterwards: health, ingest, a new subscriber streams
    assert server.get("/healthz").status == 200
    fresh = Live(server, si, token)
    try:
        fresh.frame()
        eid = ok_eid(server.track(si=si, after="drop"))
        assert fresh.event()[0] == eid
    finally:
        fresh.close()
    assert server.counts()["events"] == 301


def test_stalled_live_subscriber_is_dropped_once_past_the_bound_not_past_the_kernel_buffer(
        make_server):
    """The bound holds for the whole backlog, not only the part past the kernel's send buffer
    (autotuned to ~4 MB on loopback, which once absorbed this whole flood)."""
    server = make_server("--live-buffer-bytes", "64KiB")
    si = "live-stall-small.example"
    token = server.create_token(si)
    stalled = Live(server, si, token, rcvbuf=2048)
    stalled.frame()
    # 300 events of ~4 KB: ~1.2 MB owed, 19 times the bound
    assert _flood(server, si, 300, {"pad": "x" * 4000}) < 10
    ended, received = _read_until_dropped(stalled, timeout=5)
    stalled.close()
    assert ended, f"the stalled subscriber was not dropped (read {received} bytes)"
    assert received < 600_000, received


# --------------------------------------------------------------------------- 4. erasure

def fold_by_hand(payloads: list[dict]) -> tuple[dict, dict]:
    """The session record and captured fields folded from event payloads (SPEC 2.4)."""
    record: dict = {}
    captured: dict = {}
    for p in payloads:
        ev = p["event"]
        for name, value in ev.items():
            if name in ("unixtimestamp", "si", "eid", "sid", "uid"):
                continue
            if name.startswith("utm_") and name in record:
                continue
            record[name] = value
        captured.update(p["captured"])
    last = payloads[-1]["event"]
    flat = {"unixtimestamp": last["unixtimestamp"], "si": last["si"], **record,
            "eid": last["eid"], "sid": last["sid"], "uid": last["uid"]}
    return flat, captured


def test_erasure_removes_every_trace_of_one_user_and_keeps_the_other(server):
    si, other = "erase.example", "erase-other.example"
    token = server.create_token(si)
    other_token = server.create_token(other)
    alice_h = {"User-Agent": "AliceAgent/9", "Referer": "https://alice.example/private"}
    bob_h = {"User-Agent": "BobAgent/2"}
    alice, bob = [], []
    alice.append(ok_eid(server.track(alice_h, si=si, sid="shared", uid="alice", page="/a",
                                     alice_secret="s3cr3t", utm_source="alice-ads")))
    bob.append(ok_eid(server.track(bob_h, si=si, sid="shared", uid="bob", page="/b",
                                   utm_source="bob-news", plan="pro")))
    for round_ in range(2):  # interleaved batches: the shared session spills into chunks
        alice += batch(server, [{"sid": "shared", "uid": "alice", "step": f"a{round_}-{i}"}
                                for i in range(15)], headers=alice_h, si=si)
        bob += batch(server, [{"sid": "shared", "uid": "bob", "step": f"b{round_}-{i}"}
                              for i in range(40)], headers=bob_h, si=si)
    alice_last_shared = ok_eid(server.track(alice_h, si=si, sid="shared", uid="alice",
                                            page="/a-last"))
    alice.append(alice_last_shared)
    alice_private = [ok_eid(server.track(alice_h, si=si, sid="a-priv", uid="alice", n=str(i)))
                     for i in range(3)]
    alice += alice_private
    bob_private = [ok_eid(server.track(bob_h, si=si, sid="b-priv", uid="bob", n=str(i)))
                   for i in range(2)]
    bob += bob_private
    # the same uid on another site is someone else
    elsewhere = ok_eid(server.track(alice_h, si=other, sid="shared", uid="alice", keep="me"))

    payloads = {eid: ok_json(server.api(api_path("events", eid, si=si), token))
                for eid in alice + bob}
    bob_shared = [eid for eid in bob if payloads[eid]["event"]["sid"] == "shared"]
    assert len(bob_shared) == 81
    before_shared = session_all(server, token, si, "shared")
    assert before_shared["event_count"] == 81 + 32
    assert before_shared["session"]["utm_source"] == "alice-ads"
    bob_before = user_all(server, token, si, "bob", limit=1)
    bpriv_before = session_all(server, token, si, "b-priv")
    other_before = (user_all(server, other_token, other, "alice"),
                    session_all(server, other_token, other, "shared"))
    counts_before = server.counts()

    # refusals first: nothing is erased by them
    resp = server.request("DELETE", api_path("users", "alice", si=si),
                          headers={"Authorization": f"Bearer {other_token}"})
    assert_json_error(resp, 403)
    resp = server.request("DELETE", api_path("users", "alice", si=si))
    assert_json_error(resp, 401)
    resp = server.request("DELETE", api_path("users", "nobody", si=si),
                          headers={"Authorization": f"Bearer {token}"})
    assert_json_error(resp, 404)
    resp = server.request("DELETE", api_path("sessions", "shared", si=si),
                          headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 405
    assert server.counts() == counts_before
    ok_json(server.api(api_path("users", "alice", si=si), token))

    resp = server.request("DELETE", api_path("users", "alice", si=si),
                          headers={"Authorization": f"Bearer {token}"})
    assert ok_json(resp) == {"erased": {"events": len(alice), "sessions_removed": 1,
                                        "sessions_refolded": 1}}

    # no trace of alice
    for eid in alice:
        assert_json_error(server.api(api_path("events", eid, si=si), token), 404)
    assert_json_error(server.api(api_path("users", "alice", si=si), token), 404)
    assert_json_error(server.api(api_path("sessions", "a-priv", si=si), token), 404)
    listing = server.api(api_path("events", si=si, limit="10000"), token)
    assert [x["event"]["eid"] for x in ndjson(listing)] == bob
    shared = session_all(server, token, si, "shared", limit=7)
    texts = [listing.text, json.dumps(shared, ensure_ascii=False)]
    for text in texts:
        for trace in ("alice", "AliceAgent", "s3cr3t", "alice.example", "/a-last"):
            assert trace not in text, trace

    # the shared session is folded again from bob's events only
    flat, captured = fold_by_hand([payloads[eid] for eid in bob_shared])
    assert shared["session"] == flat
    assert "alice_secret" not in shared["session"]
    assert shared["session"]["utm_source"] == "bob-news"  # alice's first touch is gone
    assert shared["session"]["uid"] == "bob" and shared["session"]["eid"] == bob_shared[-1]
    assert shared["captured"] == captured
    assert "referer" not in shared["captured"]
    assert shared["captured"]["user_agent"] == "BobAgent/2"
    assert shared["first_seen"] == payloads[bob_shared[0]]["event"]["unixtimestamp"]
    assert shared["last_seen"] == payloads[bob_shared[-1]]["event"]["unixtimestamp"]
    assert shared["event_count"] == len(bob_shared)
    assert [p["event"]["eid"] for p in shared["events"]] == bob_shared
    assert [p for p in shared["events"]] == [payloads[eid] for eid in bob_shared]

    # bob is intact
    bob_after = user_all(server, token, si, "bob", limit=1)
    for key in ("user", "captured", "first_seen", "last_seen", "event_count"):
        assert bob_after[key] == bob_before[key], key
    assert [s["sid"] for s in bob_after["sessions"]] == [s["sid"] for s in bob_before["sessions"]]
    summary = {s["sid"]: s for s in bob_after["sessions"]}["shared"]
    assert summary == {"sid": "shared", "first_seen": shared["first_seen"],
                       "last_seen": shared["last_seen"], "event_count": len(bob_shared)}
    assert session_all(server, token, si, "b-priv") == bpriv_before
    for eid in bob:
        assert ok_json(server.api(api_path("events", eid, si=si), token)) == payloads[eid]
    # the other site's alice is intact
    assert (user_all(server, other_token, other, "alice"),
            session_all(server, other_token, other, "shared")) == other_before
    ok_json(server.api(api_path("events", elsewhere, si=other), other_token))
    counts = server.counts()
    assert counts["events"] == counts_before["events"] - len(alice)
    assert counts["sessions"] == counts_before["sessions"] - 1
    assert counts["users"] == counts_before["users"] - 1

    # again: no such user
    resp = server.request("DELETE", api_path("users", "alice", si=si),
                          headers={"Authorization": f"Bearer {token}"})
    assert_json_error(resp, 404)

    # the same uid coming back is a new user, with no leftovers of the old one
    back = ok_eid(server.track(si=si, sid="shared", uid="alice", page="/again"))
    user = user_all(server, token, si, "alice")
    assert user["event_count"] == 1 and user["first_seen"] == user["last_seen"]
    assert [s["sid"] for s in user["sessions"]] == ["shared"]
    assert "alice_secret" not in user["user"] and user["user"]["eid"] == back
    shared = session_all(server, token, si, "shared", limit=10)
    assert [p["event"]["eid"] for p in shared["events"]] == bob_shared + [back]
    assert shared["event_count"] == len(bob_shared) + 1


def test_erasing_the_only_user_of_sessions_removes_them(server):
    si = "erase-solo.example"
    uid = "sölo/ü 1?&"  # percent-encoded in the path
    token = server.create_token(si)
    admin = server.create_token("*")
    eids = [ok_eid(server.track(si=si, sid=f"solo-{i % 2}", uid=uid, i=str(i)))
            for i in range(6)]
    eids += batch(server, [{"uid": uid, "i": str(i)} for i in range(3)], si=si)  # sid = eid
    keep = ok_eid(server.track(si=si, sid="keep", uid="stay"))
    ok_json(server.api(api_path("users", uid, si=si), token))
    resp = server.request("DELETE", api_path("users", uid, si=si),
                          headers={"Authorization": f"Bearer {admin}"})
    assert ok_json(resp) == {"erased": {"events": 9, "sessions_removed": 5,
                                        "sessions_refolded": 0}}
    for sid in ("solo-0", "solo-1", *eids[6:]):
        assert_json_error(server.api(api_path("sessions", sid, si=si), token), 404)
    assert_json_error(server.api(api_path("users", uid, si=si), token), 404)
    assert server.counts()["events"] == 1
    assert server.counts()["sessions"] == 1 and server.counts()["users"] == 1
    assert [x["event"]["eid"] for x in list_all(server, token, si)] == [keep]


def test_erasure_while_ingest_goes_on(server):
    """DELETE while another user's events keep arriving: every acknowledged event of the other
    user stays, the erased user is gone, and ingest never stops answering."""
    si = "erase-busy.example"
    token = server.create_token(si)
    gone = [ok_eid(server.track(si=si, sid=f"g{i % 4}", uid="gone", i=str(i))) for i in range(40)]
    gone += batch(server, [{"sid": "both", "uid": "gone", "i": str(i)} for i in range(100)], si=si)
    stop = threading.Event()
    kept: list[str] = []
    failures: list = []

    def ingest():
        conn = KeepAlive(server, timeout=10)
        try:
            i = 0
            while not stop.is_set() and i < 2000:
                status, body = conn.track(si=si, sid="both" if i % 2 else "stay", uid="stay",
                                          i=str(i))
                if status != 200:
                    failures.append((status, body))
                    return
                kept.append(body)
                i += 1
        except Exception as exc:  # noqa: BLE001
            failures.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=ingest, daemon=True)
    thread.start()
    time.sleep(0.3)
    resp = server.request("DELETE", api_path("users", "gone", si=si),
                          headers={"Authorization": f"Bearer {token}"})
    erased = ok_json(resp)["erased"]
    time.sleep(0.3)
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    assert not failures, failures[:3]
    assert erased["events"] == len(gone)
    assert erased["sessions_removed"] == 4 and erased["sessions_refolded"] == 1
    assert len(kept) > 10
    listed = [x["event"]["eid"] for x in list_all(server, token, si)]
    assert listed == kept
    both = session_all(server, token, si, "both", limit=64)
    assert [p["event"]["uid"] for p in both["events"]] == ["stay"] * both["event_count"]
    assert both["event_count"] == len([e for e in kept[1::2]])
    user = user_all(server, token, si, "stay")
    assert user["event_count"] == len(kept)
    assert_json_error(server.api(api_path("users", "gone", si=si), token), 404)


# --------------------------------------------------------------------------- 5. export/import

def _world_for_export(server, si, other):
    ua = {"User-Agent": "Exporter/1", "Referer": "https://ref.example/"}
    ok_eid(server.track(ua, si=si, sid="long", uid="ann", utm_source="first", page="/"))
    batch(server, [{"sid": "long", "uid": "ann" if i % 3 else "ben", "i": str(i),
                    "utm_source": f"later-{i}"} for i in range(70)], si=si)  # > one chunk
    for i in range(5):
        ok_eid(server.track(si=si, sid=f"s{i}", uid="cy", page=f"/p{i}", increment="false"
                            if i == 4 else "true"))
    ok_eid(server.track(si=si, uid="dee", note="new session by uid"))
    ok_eid(server.track(si=si, sid="only-sid", note="uid = sid"))
    ok_eid(server.track(si=si, note="all from eid", text="ünïcödé ✓ \u2028"))
    ok_eid(server.post("/", f"si={si}&sid=posted&uid=ann&form=yes&empty=", headers=ua))
    for i in range(4):
        ok_eid(server.track(si=other, sid="long", uid="ann", i=str(i)))


def _snapshot(server, token, si) -> dict:
    events = list_all(server, token, si, limit=25)
    sids = sorted({e["event"]["sid"] for e in events})
    uids = sorted({e["event"]["uid"] for e in events})
    return {
        "events": events,
        "by_eid": {e["event"]["eid"]: ok_json(server.api(api_path("events", e["event"]["eid"],
                                                                  si=si), token))
                   for e in events},
        "sessions": {sid: session_all(server, token, si, sid, limit=30) for sid in sids},
        "users": {uid: user_all(server, token, si, uid, limit=2) for uid in uids},
        "stats": nonzero(stats(server, token, si, bucket="minute")),
    }


def test_export_import_round_trip(make_server, tmp_path):
    si, other = "export.example", "export-other.example"
    source = make_server()
    token = source.create_token(si)
    _world_for_export(source, si, other)
    original = _snapshot(source, token, si)
    assert len(original["events"]) == 1 + 70 + 5 + 4
    assert original["sessions"]["long"]["event_count"] == 71

    # export while the source server runs
    out = otserver_cli("export", "--si", si, "--data-dir", str(source.data_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n")
    lines = [json.loads(line) for line in out.stdout[:-1].split("\n")]
    assert lines == original["events"]
    assert "80" in out.stderr
    dump = tmp_path / "export.ndjson"
    dump.write_text(out.stdout)

    # --from/--to pick a range, in ms and ISO 8601
    ts = [e["event"]["unixtimestamp"] for e in original["events"]]
    lo, hi = ts[1], ts[-2]
    part = otserver_cli("export", "--si", si, "--from", str(lo), "--to", iso(hi),
                        "--data-dir", str(source.data_dir))
    assert part.returncode == 0, part.stderr
    assert [json.loads(x) for x in part.stdout[:-1].split("\n")] == [
        e for e in original["events"] if lo <= e["event"]["unixtimestamp"] < hi]
    none = otserver_cli("export", "--si", "nobody.example", "--data-dir", str(source.data_dir))
    assert none.returncode == 0 and none.stdout == ""

    target_dir = tmp_path / "imported"
    done = import_file(target_dir, dump)
    assert done.returncode == 0, done.stderr
    target = make_server(data_dir=target_dir)
    target_token = target.create_token(si)
    copy = _snapshot(target, target_token, si)
    assert copy["events"] == original["events"]
    assert copy["by_eid"] == original["by_eid"]
    assert copy["sessions"] == original["sessions"]
    assert copy["users"] == original["users"]
    assert copy["stats"] == original["stats"]
    assert target.counts()["events"] == len(original["events"])
    admin = target.create_token("*")
    assert list_all(target, admin, other) == []  # only the exported site came over

    # importing again stores nothing new (the target server running meanwhile)
    counts = target.counts()
    again = import_file(target_dir, dump)
    assert again.returncode == 0, again.stderr
    assert target.counts() == counts
    assert _snapshot(target, target_token, si) == copy
    # and the copy goes on taking events
    eid = ok_eid(target.track(si=si, sid="long", uid="ann", more="1"))
    long = session_all(target, target_token, si, "long", limit=50)
    assert long["event_count"] == 72 and long["events"][-1]["event"]["eid"] == eid


def test_import_of_overlapping_exports_skips_the_repeats(make_server, tmp_path):
    """An eid repeated within one batch of the file is skipped like one already stored (it
    once made write_batch raise 'duplicate eid' and the import fail)."""
    si = "overlap.example"
    source = make_server()
    token = source.create_token(si)
    eids = [ok_eid(source.track(si=si, sid="s", uid="u", i=str(i))) for i in range(6)]
    ts = [e["event"]["unixtimestamp"] for e in list_all(source, token, si)]
    full = otserver_cli("export", "--si", si, "--data-dir", str(source.data_dir))
    tail = otserver_cli("export", "--si", si, "--from", str(ts[3]),
                        "--data-dir", str(source.data_dir))
    assert full.returncode == 0 and tail.returncode == 0
    dump = tmp_path / "overlap.ndjson"
    dump.write_text(full.stdout + tail.stdout)
    target_dir = tmp_path / "overlap-import"
    done = import_file(target_dir, dump)
    assert done.returncode == 0, done.stderr
    target = make_server(data_dir=target_dir)
    t = target.create_token(si)
    session = session_all(target, t, si, "s")
    assert [p["event"]["eid"] for p in session["events"]] == eids
    assert session["event_count"] == 6


def test_import_refuses_a_bad_line(tmp_path):
    data_dir = tmp_path / "bad-import"
    rng = random.Random(3)
    now = int(time.time() * 1000)
    good = {"event": {"unixtimestamp": now, "si": "i.example", "eid": make_eid(now, rng),
                      "sid": "s", "uid": "u"}, "captured": {}}
    bad = tmp_path / "bad.ndjson"
    bad.write_text(json.dumps(good) + "\n" + "{not json\n")
    out = import_file(data_dir, bad)
    assert out.returncode != 0
    assert "line 2" in out.stderr
