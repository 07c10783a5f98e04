"""The read API (SPEC 5): tokens and their scope, errors as JSON, events, sessions with their
paged clickstream, users with their paged sessions, and the `otserver token` commands run while
the server is serving. Real process, real LMDB, real CLI.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from urllib.parse import quote, urlencode

import pytest
from conftest import assert_json_error

SITE_A = "read-a.example"
SITE_B = "read-b.example"
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
UNKNOWN_EID = "01900000-0000-7000-8000-000000000000"


def q(value: str) -> str:
    return quote(value, safe="")


def ok_eid(resp) -> str:
    assert resp.status == 200, resp
    assert UUID7.match(resp.text), resp
    return resp.text


def path(kind: str, ident: str, **params) -> str:
    return f"/api/v1/{kind}/{q(ident)}?{urlencode(params)}"


def ok_json(resp) -> dict:
    assert resp.status == 200, resp
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


def otserver_cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "otserver", *args, "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def world(shared_server):
    """Two sites with tokens, a session walked over several events, a user over several
    sessions, and a session id reused on the other site."""
    s = shared_server
    w = {"server": s,
         "token_a": s.create_token(SITE_A),
         "token_b": s.create_token(SITE_B),
         "admin": s.create_token("*")}
    walk = [ok_eid(s.track(si=SITE_A, sid="walk", uid="reader", step=str(i))) for i in range(5)]
    s2 = [ok_eid(s.track(si=SITE_A, sid="s2", uid="reader", step=f"s2-{i}")) for i in range(2)]
    s3 = [ok_eid(s.track(si=SITE_A, sid="s3", uid="reader", step="s3"))]
    fresh = ok_eid(s.track(si=SITE_A, uid="reader", step="fresh"))  # a new session: sid = eid
    walk.append(ok_eid(s.track(si=SITE_A, sid="walk", uid="reader", step="5")))  # back again
    even = [ok_eid(s.track(si=SITE_A, sid="even", n=str(i))) for i in range(4)]
    w.update(walk=walk, s2=s2, s3=s3, fresh=fresh, even=even,
             b_walk=ok_eid(s.track(si=SITE_B, sid="walk", uid="reader", step="on B")))
    return w


# --------------------------------------------------------------------------- auth

def test_no_token_is_401_json(world):
    s = world["server"]
    for target in (path("events", world["walk"][0], si=SITE_A), path("sessions", "walk", si=SITE_A),
                   path("users", "reader", si=SITE_A)):
        resp = s.api(target, None)
        assert_json_error(resp, 401)
        assert "walk" not in resp.text and "reader" not in resp.text


@pytest.mark.parametrize("header", [
    "Bearer ot_" + "A" * 43,
    "Bearer not-a-token",
    "Bearer ",
    "Basic dXNlcjpwYXNz",
    "{token}",            # the token without the Bearer scheme
    "Basic {token}",
], ids=["well-formed-unknown", "garbage", "empty", "basic", "no-scheme", "basic-real-token"])
def test_wrong_token_is_401_json(world, header):
    s = world["server"]
    resp = s.get(path("sessions", "walk", si=SITE_A),
                 headers={"Authorization": header.format(token=world["token_a"])})
    assert_json_error(resp, 401)
    assert "step" not in resp.text


def test_the_right_token_reads(world):
    s = world["server"]
    payload = ok_json(s.api(path("sessions", "walk", si=SITE_A), world["token_a"]))
    assert payload["session"]["sid"] == "walk"


@pytest.mark.parametrize("kind, ident", [("events", "b_walk"), ("sessions", "walk"),
                                         ("users", "reader")])
def test_token_for_another_site_is_403(world, kind, ident):
    s = world["server"]
    ident = world[ident] if ident == "b_walk" else ident
    assert_json_error(s.api(path(kind, ident, si=SITE_B), world["token_a"]), 403)
    assert_json_error(s.api(path(kind, ident, si=SITE_A), world["token_b"]), 403)


def test_admin_token_reads_every_site(world):
    s, admin = world["server"], world["admin"]
    a = ok_json(s.api(path("sessions", "walk", si=SITE_A), admin))
    b = ok_json(s.api(path("sessions", "walk", si=SITE_B), admin))
    assert a["session"]["si"] == SITE_A and a["event_count"] == 6
    assert b["session"]["si"] == SITE_B and b["event_count"] == 1
    assert [e["event"]["eid"] for e in b["events"]] == [world["b_walk"]]
    ev = ok_json(s.api(path("events", world["b_walk"], si=SITE_B), admin))
    assert ev["event"]["step"] == "on B"
    user = ok_json(s.api(path("users", "reader", si=SITE_B), admin))
    assert user["event_count"] == 1


@pytest.mark.parametrize("query", [{}, {"si": ""}, {"limit": "2"}], ids=["none", "empty", "other"])
@pytest.mark.parametrize("token", ["token_a", "admin"])
def test_missing_si_is_400(world, query, token):
    s = world["server"]
    for kind, ident in (("events", world["walk"][0]), ("sessions", "walk"), ("users", "reader")):
        assert_json_error(s.api(path(kind, ident, **query), world[token]), 400)


# --------------------------------------------------------------------------- not found

@pytest.mark.parametrize("kind, ident", [
    ("events", UNKNOWN_EID),
    ("events", "not-an-eid"),
    ("events", "walk"),
    ("sessions", "no-such-session"),
    ("sessions", "reader"),          # a uid is not a sid
    ("users", "no-such-user"),
    ("users", "walk"),               # a sid is not a uid (session walk's uid is "reader")
])
def test_unknown_ids_are_404(world, kind, ident):
    s = world["server"]
    assert_json_error(s.api(path(kind, ident, si=SITE_A), world["token_a"]), 404)
    assert_json_error(s.api(path(kind, ident, si=SITE_A), world["admin"]), 404)


def test_event_with_the_wrong_si_is_404(world):
    s = world["server"]
    eid = world["walk"][0]
    ok_json(s.api(path("events", eid, si=SITE_A), world["admin"]))
    assert_json_error(s.api(path("events", eid, si=SITE_B), world["admin"]), 404)
    assert_json_error(s.api(path("events", eid, si=SITE_B), world["token_b"]), 404)
    # likewise sessions and users that exist only on site A
    assert_json_error(s.api(path("sessions", "s2", si=SITE_B), world["admin"]), 404)
    assert_json_error(s.api(path("users", "even", si=SITE_B), world["admin"]), 404)
    ok_json(s.api(path("users", "even", si=SITE_A), world["admin"]))


def test_event_eid_is_case_insensitive_and_exact(world):
    s = world["server"]
    eid = world["walk"][1]
    assert ok_json(s.api(path("events", eid.upper(), si=SITE_A), world["token_a"]))[
        "event"]["eid"] == eid
    other = eid[:-1] + ("0" if eid[-1] != "0" else "1")
    assert_json_error(s.api(path("events", other, si=SITE_A), world["token_a"]), 404)


@pytest.mark.parametrize("kind", ["sessions", "users", "events"])
def test_undecodable_id_is_a_json_client_error(world, kind):
    s = world["server"]
    resp = s.api(f"/api/v1/{kind}/%FF?si={SITE_A}", world["token_a"])
    assert resp.status in (400, 404), resp
    assert_json_error(resp, resp.status)


# --------------------------------------------------------------------------- records

def test_event_payload(world):
    s = world["server"]
    eid = world["walk"][2]
    payload = ok_json(s.api(path("events", eid, si=SITE_A), world["token_a"]))
    assert set(payload) == {"event", "captured"}
    record = payload["event"]
    assert {k: v for k, v in record.items() if k != "unixtimestamp"} == {
        "si": SITE_A, "step": "2", "eid": eid, "sid": "walk", "uid": "reader"}
    assert isinstance(record["unixtimestamp"], int)
    assert payload["captured"]["ip"] == "127.0.0.0"


def test_session_payload(world):
    s = world["server"]
    payload = ok_json(s.api(path("sessions", "walk", si=SITE_A), world["token_a"]))
    walk = world["walk"]
    assert payload["session"]["eid"] == walk[-1] and payload["session"]["step"] == "5"
    assert payload["event_count"] == 6
    assert [e["event"]["eid"] for e in payload["events"]] == walk
    times = [e["event"]["unixtimestamp"] for e in payload["events"]]
    assert times == sorted(times)
    assert payload["first_seen"] == times[0]
    assert payload["last_seen"] == times[-1] == payload["session"]["unixtimestamp"]
    assert payload["next_after"] is None
    assert all(set(e) == {"event", "captured"} for e in payload["events"])


@pytest.mark.parametrize("sid, limit", [("walk", 2), ("walk", 4), ("walk", 1), ("even", 2),
                                        ("even", 4), ("even", 3)])
def test_session_paging_walks_every_event_once_in_order(world, sid, limit):
    s = world["server"]
    seen, after, pages = [], None, 0
    while True:
        params = {"si": SITE_A, "limit": str(limit)}
        if after is not None:
            params["after"] = after
        payload = ok_json(s.api(path("sessions", sid, **params), world["token_a"]))
        page = [e["event"]["eid"] for e in payload["events"]]
        assert 1 <= len(page) <= limit
        assert payload["event_count"] == len(world[sid])
        seen += page
        pages += 1
        after = payload["next_after"]
        if after is None:
            break
        assert after == page[-1]
        assert pages < 20
    assert seen == world[sid]
    assert pages == -(-len(world[sid]) // limit)


def test_session_paging_after_the_last_event_is_empty(world):
    s = world["server"]
    payload = ok_json(s.api(path("sessions", "walk", si=SITE_A, after=world["walk"][-1]),
                            world["token_a"]))
    assert payload["events"] == [] and payload["next_after"] is None


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "100000"])
def test_bad_limit_is_400(world, limit):
    s = world["server"]
    assert_json_error(s.api(path("sessions", "walk", si=SITE_A, limit=limit), world["token_a"]),
                      400)


def test_user_payload_and_sessions(world):
    s = world["server"]
    payload = ok_json(s.api(path("users", "reader", si=SITE_A), world["token_a"]))
    user = payload["user"]
    assert user["uid"] == "reader" and user["sid"] == "walk" and user["eid"] == world["walk"][-1]
    assert user["step"] == "5"
    assert payload["event_count"] == 10
    sessions = payload["sessions"]
    # in order of the user's first event in each; the revisited session is listed once
    assert [x["sid"] for x in sessions] == ["walk", "s2", "s3", world["fresh"]]
    assert [x["event_count"] for x in sessions] == [6, 2, 1, 1]
    for x in sessions:
        assert set(x) == {"sid", "first_seen", "last_seen", "event_count"}
        assert x["first_seen"] <= x["last_seen"]
    assert payload["first_seen"] == sessions[0]["first_seen"]
    assert payload["last_seen"] == sessions[0]["last_seen"] == user["unixtimestamp"]
    assert payload["next_after"] is None


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_user_sessions_paging(world, limit):
    s = world["server"]
    seen, after, pages = [], None, 0
    while True:
        params = {"si": SITE_A, "limit": str(limit)}
        if after is not None:
            params["after"] = after
        payload = ok_json(s.api(path("users", "reader", **params), world["token_a"]))
        assert 1 <= len(payload["sessions"]) <= limit
        assert payload["user"]["uid"] == "reader"
        seen += [x["sid"] for x in payload["sessions"]]
        pages += 1
        after = payload["next_after"]
        if after is None:
            break
        assert isinstance(after, str) and after
        assert pages < 20
    assert seen == ["walk", "s2", "s3", world["fresh"]]
    assert pages == -(-4 // limit)


def test_session_shared_by_two_users_is_listed_once_for_each(server):
    """A session whose events alternate between two uids appears once in each user's list."""
    si = "shared-session.example"
    token = server.create_token(si)
    for uid in ("ann", "bob", "ann", "bob", "ann"):
        ok_eid(server.track(si=si, sid="desk", uid=uid))
    ok_eid(server.track(si=si, sid="ann-own", uid="ann"))
    ann = ok_json(server.api(path("users", "ann", si=si), token))
    bob = ok_json(server.api(path("users", "bob", si=si), token))
    assert [x["sid"] for x in ann["sessions"]] == ["desk", "ann-own"]
    assert [x["sid"] for x in bob["sessions"]] == ["desk"]
    assert ann["event_count"] == 4 and bob["event_count"] == 2
    assert ann["sessions"][0]["event_count"] == 5  # the session's own count, all users
    desk = ok_json(server.api(path("sessions", "desk", si=si), token))
    assert desk["session"]["uid"] == "ann" and desk["event_count"] == 5


# --------------------------------------------------------------------------- headers

def test_read_api_sends_no_cors_header_and_json(world):
    s = world["server"]
    answers = [
        s.api(path("events", world["walk"][0], si=SITE_A), world["token_a"]),
        s.api(path("sessions", "walk", si=SITE_A), world["token_a"]),
        s.api(path("users", "reader", si=SITE_A), world["token_a"]),
        s.api(path("sessions", "walk", si=SITE_A), None),
        s.api(path("sessions", "walk", si=SITE_B), world["token_a"]),
        s.api(path("sessions", "nope", si=SITE_A), world["token_a"]),
        s.api(path("sessions", "walk"), world["token_a"]),
    ]
    assert [r.status for r in answers] == [200, 200, 200, 401, 403, 404, 400]
    for resp in answers:
        assert "access-control-allow-origin" not in resp.headers, resp.headers
        assert resp.headers["content-type"].startswith("application/json")
        json.loads(resp.body)


# --------------------------------------------------------------------------- token commands

def _token_rows(server) -> list[dict]:
    out = otserver_cli(server, "token", "list", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_token_list_shows_ids_and_sites_never_tokens(server):
    token_a = server.create_token("list-a.example")
    admin = server.create_token("*")
    plain = otserver_cli(server, "token", "list")
    assert plain.returncode == 0, plain.stderr
    rows = _token_rows(server)
    assert sorted(r["site"] for r in rows) == ["*", "list-a.example"]
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == 2 and all(ids)
    for ident in ids:
        assert ident in plain.stdout
    assert "list-a.example" in plain.stdout
    for token in (token_a, admin):
        assert token not in plain.stdout + plain.stderr
        assert token[3:] not in plain.stdout + plain.stderr
        assert all(token not in json.dumps(r) for r in rows)


def test_token_revoke_while_serving(server):
    token_a = server.create_token("rev-a.example")
    token_b = server.create_token("rev-b.example")
    ok_eid(server.track(si="rev-a.example", sid="x"))
    ok_eid(server.track(si="rev-b.example", sid="x"))
    target_a = path("sessions", "x", si="rev-a.example")
    target_b = path("sessions", "x", si="rev-b.example")
    ok_json(server.api(target_a, token_a))
    ok_json(server.api(target_b, token_b))

    [row] = [r for r in _token_rows(server) if r["site"] == "rev-a.example"]
    out = otserver_cli(server, "token", "revoke", row["id"])
    assert out.returncode == 0, out.stderr

    assert_json_error(server.api(target_a, token_a), 401)
    ok_json(server.api(target_b, token_b))          # the other token still works
    assert [r["site"] for r in _token_rows(server)] == ["rev-b.example"]

    again = otserver_cli(server, "token", "revoke", row["id"])
    assert again.returncode != 0
    assert otserver_cli(server, "token", "revoke", "ab").returncode != 0  # too short a prefix
    ok_json(server.api(target_b, token_b))


def test_token_created_while_serving_works_at_once(server):
    ok_eid(server.track(si="late.example", sid="x"))
    assert_json_error(server.api(path("sessions", "x", si="late.example"), "ot_" + "x" * 43), 401)
    token = server.create_token("late.example")
    assert token.startswith("ot_") and len(token) > 20
    ok_json(server.api(path("sessions", "x", si="late.example"), token))
