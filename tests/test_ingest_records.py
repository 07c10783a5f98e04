"""Ingest end to end: what goes in through the raw-URL API comes back out of the read API as the
seed document and SPEC 2.1-2.4 say. Every test talks to a real otserver process over a socket
and reads back through `/api/v1/...` (or straight from LMDB for "nothing stored").
"""
from __future__ import annotations

import re
import time
from urllib.parse import quote, urlencode

import pytest

from otserver.agents import agent_fields
from conftest import FreshView

SEED_SI = "test.opentracker.net"
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

# The six example URLs of seed/opentracker-events-api.txt, copied verbatim.
SEED_URLS = [
    "https://log.opentracker.net/?message=Please track me&si=test.opentracker.net",
    "https://log.opentracker.net/?message=Please track me too!&sid=1234567890&si=test.opentracker.net",
    "https://log.opentracker.net/?message=Please track a seconds event!&sid=1234567890&si=test.opentracker.net",
    "https://log.opentracker.net/?privateMessage=Please track a third event!&sid=1234567890&si=test.opentracker.net",
    "https://log.opentracker.net/?message=Please track me too!&sid=1234567890&uid=123456&si=test.opentracker.net",
    "https://log.opentracker.net/?message=Im a new session starting!&uid=123456&si=test.opentracker.net",
]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def server(shared_server) -> FreshView:
    """The module's one server (its tests only add events, each under its own ids): each test
    sees what it stored."""
    return FreshView(shared_server)


def seed_target(url: str) -> str:
    """The seed's URL as a request target: same properties, same order, percent-encoded."""
    rest = url.split("://", 1)[1]
    path_query = rest[rest.index("/"):]
    path, _, query = path_query.partition("?")
    pairs = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        pairs.append(quote(name, safe="") + "=" + quote(value, safe=""))
    return path + "?" + "&".join(pairs)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def q(value: str) -> str:
    return quote(value, safe="")


def ok_eid(resp) -> str:
    assert resp.status == 200, resp
    eid = resp.text
    assert UUID7.match(eid), eid
    return eid


def read(server, token: str, kind: str, ident: str, si: str, **params) -> dict:
    """GET /api/v1/{kind}/{ident}?si=..., asserting 200 JSON; returns the payload."""
    query = urlencode({"si": si, **params})
    resp = server.api(f"/api/v1/{kind}/{q(ident)}?{query}", token)
    assert resp.status == 200, (kind, ident, resp)
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


def event_of(server, token, eid, si) -> dict:
    return read(server, token, "events", eid, si)


def flat_without_ts(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "unixtimestamp"}


def assert_refused(server, resp, *names: str) -> None:
    """A 400 plain-text refusal naming each of `names`, with nothing stored."""
    assert resp.status == 400, resp
    assert resp.headers["content-type"].startswith("text/plain")
    assert resp.headers.get("access-control-allow-origin") == "*"
    for name in names:
        assert name in resp.text, (name, resp.text)
    counts = server.counts()
    assert counts["events"] == 0 and counts["sessions"] == 0 and counts["users"] == 0, counts


# --------------------------------------------------------------------------- the seed, in order

@pytest.fixture(scope="module")
def seed_run(shared_server):
    """Send the six seed examples in order; after each, snapshot the event, its session and its
    user as the read API gives them (later examples change earlier sessions and users)."""
    server = shared_server
    token = server.create_token(SEED_SI)
    steps = []
    for url in SEED_URLS:
        before = now_ms()
        resp = server.get(seed_target(url))
        after = now_ms()
        eid = ok_eid(resp)
        event = event_of(server, token, eid, SEED_SI)
        sid, uid = event["event"]["sid"], event["event"]["uid"]
        steps.append({
            "resp": resp, "eid": eid, "before": before, "after": after, "event": event,
            "session": read(server, token, "sessions", sid, SEED_SI),
            "user": read(server, token, "users", uid, SEED_SI),
        })
    return {"server": server, "token": token, "steps": steps}


def test_seed_urls_are_the_seed_documents_urls():
    """The targets sent are the seed's example URLs, properly percent-encoded."""
    assert seed_target(SEED_URLS[0]) == "/?message=Please%20track%20me&si=test.opentracker.net"
    assert seed_target(SEED_URLS[1]) == (
        "/?message=Please%20track%20me%20too%21&sid=1234567890&si=test.opentracker.net")


def test_seed_every_answer_is_a_fresh_uuid7_eid_as_plain_text(seed_run):
    eids = [step["eid"] for step in seed_run["steps"]]
    assert len(set(eids)) == 6
    assert eids == sorted(eids), "UUIDv7 eids issued in order must sort in order"
    for step in seed_run["steps"]:
        resp = step["resp"]
        assert resp.headers["content-type"] == "text/plain; charset=utf-8"
        assert resp.body == step["eid"].encode()
        assert len(resp.body) == 36


def test_seed_unixtimestamps_are_server_receive_times_in_ms(seed_run):
    for step in seed_run["steps"]:
        ts = step["event"]["event"]["unixtimestamp"]
        assert isinstance(ts, int)
        assert step["before"] - 5 <= ts <= step["after"] + 5, (ts, step["before"], step["after"])
        # the folds carry the last event's timestamp
        assert step["session"]["session"]["unixtimestamp"] == ts
        assert step["user"]["user"]["unixtimestamp"] == ts


def test_seed_example_1_only_si_copies_the_eid_to_sid_and_uid(seed_run):
    step = seed_run["steps"][0]
    e1 = step["eid"]
    expected = {"si": SEED_SI, "message": "Please track me", "eid": e1, "sid": e1, "uid": e1}
    assert flat_without_ts(step["event"]["event"]) == expected
    assert flat_without_ts(step["session"]["session"]) == expected
    assert flat_without_ts(step["user"]["user"]) == expected
    assert step["session"]["event_count"] == 1
    assert [e["event"]["eid"] for e in step["session"]["events"]] == [e1]
    assert [s["sid"] for s in step["user"]["sessions"]] == [e1]


def test_seed_example_2_sid_given_uid_copied(seed_run):
    step = seed_run["steps"][1]
    e2 = step["eid"]
    expected = {"si": SEED_SI, "message": "Please track me too!", "eid": e2,
                "sid": "1234567890", "uid": "1234567890"}
    assert flat_without_ts(step["event"]["event"]) == expected
    assert flat_without_ts(step["session"]["session"]) == expected
    assert flat_without_ts(step["user"]["user"]) == expected
    assert step["session"]["event_count"] == 1


def test_seed_example_3_second_event_overwrites_the_session_and_user(seed_run):
    e2 = seed_run["steps"][1]["eid"]
    step = seed_run["steps"][2]
    e3 = step["eid"]
    expected = {"si": SEED_SI, "message": "Please track a seconds event!", "eid": e3,
                "sid": "1234567890", "uid": "1234567890"}
    assert flat_without_ts(step["event"]["event"]) == expected
    assert flat_without_ts(step["session"]["session"]) == expected
    assert flat_without_ts(step["user"]["user"]) == expected
    assert step["session"]["event_count"] == 2
    assert [e["event"]["eid"] for e in step["session"]["events"]] == [e2, e3]


def test_seed_example_4_third_event_folds_into_session_and_user(seed_run):
    e2, e3 = seed_run["steps"][1]["eid"], seed_run["steps"][2]["eid"]
    step = seed_run["steps"][3]
    e4 = step["eid"]
    assert flat_without_ts(step["event"]["event"]) == {
        "si": SEED_SI, "privateMessage": "Please track a third event!", "eid": e4,
        "sid": "1234567890", "uid": "1234567890"}
    folded = {"si": SEED_SI, "message": "Please track a seconds event!",
              "privateMessage": "Please track a third event!", "eid": e4,
              "sid": "1234567890", "uid": "1234567890"}
    assert flat_without_ts(step["session"]["session"]) == folded
    # The seed's user record here shows privateMessage = "Please track a seconds event!", a typo
    # in the seed (no request ever sent that value as privateMessage). SPEC 2.4's fold rule (the
    # last value wins, the user fold is the same as the session fold) is the contract.
    assert flat_without_ts(step["user"]["user"]) == folded
    session = step["session"]
    assert session["event_count"] == 3
    assert [e["event"]["eid"] for e in session["events"]] == [e2, e3, e4]
    assert session["first_seen"] == seed_run["steps"][1]["event"]["event"]["unixtimestamp"]
    assert session["last_seen"] == step["event"]["event"]["unixtimestamp"]
    assert step["user"]["event_count"] == 3
    assert [s["sid"] for s in step["user"]["sessions"]] == ["1234567890"]


def test_seed_example_5_sid_and_uid_given(seed_run):
    step = seed_run["steps"][4]
    e4, e5 = seed_run["steps"][3]["eid"], step["eid"]
    assert flat_without_ts(step["event"]["event"]) == {
        "si": SEED_SI, "message": "Please track me too!", "eid": e5,
        "sid": "1234567890", "uid": "123456"}
    # The session takes the last event's eid and uid; earlier names stay.
    assert flat_without_ts(step["session"]["session"]) == {
        "si": SEED_SI, "message": "Please track me too!",
        "privateMessage": "Please track a third event!", "eid": e5,
        "sid": "1234567890", "uid": "123456"}
    assert step["session"]["event_count"] == 4
    assert flat_without_ts(step["user"]["user"]) == {
        "si": SEED_SI, "message": "Please track me too!", "eid": e5,
        "sid": "1234567890", "uid": "123456"}
    assert step["user"]["event_count"] == 1
    # user 1234567890 is untouched by an event of user 123456
    server, token = seed_run["server"], seed_run["token"]
    old_user = read(server, token, "users", "1234567890", SEED_SI)
    assert old_user["user"]["eid"] == e4
    assert old_user["user"]["uid"] == "1234567890"
    assert old_user["event_count"] == 3


def test_seed_example_6_uid_only_starts_a_new_session_named_by_the_eid(seed_run):
    step = seed_run["steps"][5]
    e6 = step["eid"]
    expected = {"si": SEED_SI, "message": "Im a new session starting!", "eid": e6,
                "sid": e6, "uid": "123456"}
    assert flat_without_ts(step["event"]["event"]) == expected
    assert flat_without_ts(step["session"]["session"]) == expected
    assert step["session"]["event_count"] == 1
    assert flat_without_ts(step["user"]["user"]) == expected
    assert step["user"]["event_count"] == 2
    assert [s["sid"] for s in step["user"]["sessions"]] == ["1234567890", e6]


def test_seed_final_state_of_the_shared_session(seed_run):
    server, token, steps = seed_run["server"], seed_run["token"], seed_run["steps"]
    session = read(server, token, "sessions", "1234567890", SEED_SI)
    assert [e["event"]["eid"] for e in session["events"]] == [s["eid"] for s in steps[1:5]]
    assert [e["event"].get("message") for e in session["events"]] == [
        "Please track me too!", "Please track a seconds event!", None, "Please track me too!"]
    assert session["next_after"] is None
    # example 1's own session is still on its own
    e1 = steps[0]["eid"]
    assert read(server, token, "sessions", e1, SEED_SI)["event_count"] == 1


# --------------------------------------------------------------------------- id resolution

@pytest.mark.parametrize("given, expect_sid, expect_uid", [
    ({}, "eid", "eid"),
    ({"sid": "S-1"}, "S-1", "S-1"),
    ({"uid": "U-1"}, "eid", "U-1"),
    ({"sid": "S-1", "uid": "U-1"}, "S-1", "U-1"),
    # an empty sid or uid counts as absent
    ({"sid": "", "uid": ""}, "eid", "eid"),
    ({"sid": "S-1", "uid": ""}, "S-1", "S-1"),
    ({"sid": "", "uid": "U-1"}, "eid", "U-1"),
], ids=["si", "si+sid", "si+uid", "si+sid+uid", "empty-both", "sid+empty-uid", "empty-sid+uid"])
def test_id_table(shared_server, request, given, expect_sid, expect_uid):
    si = "ids-" + request.node.callspec.id + ".example"
    token = shared_server.create_token(si)
    eid = ok_eid(shared_server.track(si=si, **given, page="x"))
    record = event_of(shared_server, token, eid, si)["event"]
    sid = eid if expect_sid == "eid" else expect_sid
    uid = eid if expect_uid == "eid" else expect_uid
    assert flat_without_ts(record) == {"si": si, "page": "x", "eid": eid, "sid": sid, "uid": uid}
    session = read(shared_server, token, "sessions", sid, si)
    assert session["session"]["sid"] == sid and session["session"]["uid"] == uid
    assert session["event_count"] == 1
    user = read(shared_server, token, "users", uid, si)
    assert user["user"]["uid"] == uid and user["user"]["sid"] == sid
    assert [s["sid"] for s in user["sessions"]] == [sid]


def test_uid_only_makes_a_new_session_each_time(shared_server):
    si = "uid-only.example"
    token = shared_server.create_token(si)
    eids = [ok_eid(shared_server.track(si=si, uid="walker", n=str(i))) for i in range(3)]
    user = read(shared_server, token, "users", "walker", si)
    assert [s["sid"] for s in user["sessions"]] == eids
    assert all(s["event_count"] == 1 for s in user["sessions"])
    assert user["event_count"] == 3
    assert user["user"]["n"] == "2" and user["user"]["sid"] == eids[-1]


def test_si_only_events_are_each_their_own_session_and_user(shared_server):
    si = "si-only.example"
    token = shared_server.create_token(si)
    a = ok_eid(shared_server.track(si=si))
    b = ok_eid(shared_server.track(si=si))
    assert a != b
    for eid in (a, b):
        assert read(shared_server, token, "sessions", eid, si)["event_count"] == 1
        assert read(shared_server, token, "users", eid, si)["event_count"] == 1


def test_sessions_and_users_are_scoped_by_site(shared_server):
    site_a, site_b = "scope-a.example", "scope-b.example"
    token_a = shared_server.create_token(site_a)
    token_b = shared_server.create_token(site_b)
    ea = ok_eid(shared_server.track(si=site_a, sid="1", uid="1", page="on A"))
    eb = ok_eid(shared_server.track(si=site_b, sid="1", uid="1", page="on B"))
    eb2 = ok_eid(shared_server.track(si=site_b, sid="1", uid="1", page="on B again"))

    sa = read(shared_server, token_a, "sessions", "1", site_a)
    assert sa["event_count"] == 1
    assert [e["event"]["eid"] for e in sa["events"]] == [ea]
    assert sa["session"]["page"] == "on A" and sa["session"]["si"] == site_a
    ua = read(shared_server, token_a, "users", "1", site_a)
    assert ua["event_count"] == 1 and ua["user"]["page"] == "on A"

    sb = read(shared_server, token_b, "sessions", "1", site_b)
    assert sb["event_count"] == 2
    assert [e["event"]["eid"] for e in sb["events"]] == [eb, eb2]
    assert sb["session"]["page"] == "on B again" and sb["session"]["si"] == site_b

    # site A's view never shows site B's data
    assert shared_server.api(f"/api/v1/events/{eb}?si={site_a}", token_a).status == 404
    assert shared_server.api(f"/api/v1/events/{eb}?si={site_b}", token_a).status == 403


# --------------------------------------------------------------------------- utm_ rule

def test_utm_properties_keep_their_first_value_in_session_and_user(shared_server):
    si = "utm.example"
    token = shared_server.create_token(si)
    e1 = ok_eid(shared_server.track(si=si, sid="s1", uid="u", utm_source="google",
                                    utm_campaign="spring", page="home"))
    e2 = ok_eid(shared_server.track(si=si, sid="s1", uid="u", utm_source="bing",
                                    utm_medium="cpc", page="pricing"))
    e3 = ok_eid(shared_server.track(si=si, sid="s2", uid="u", utm_source="newsletter",
                                    page="signup"))
    # events keep what they were sent
    assert event_of(shared_server, token, e2, si)["event"]["utm_source"] == "bing"
    assert event_of(shared_server, token, e1, si)["event"]["utm_source"] == "google"

    s1 = read(shared_server, token, "sessions", "s1", si)["session"]
    assert s1["utm_source"] == "google"       # first value kept
    assert s1["utm_campaign"] == "spring"
    assert s1["utm_medium"] == "cpc"          # a new utm_ name is still added
    assert s1["page"] == "pricing"            # other names: last value
    assert s1["eid"] == e2

    s2 = read(shared_server, token, "sessions", "s2", si)["session"]
    assert s2["utm_source"] == "newsletter"   # a new session starts its own attribution

    user = read(shared_server, token, "users", "u", si)["user"]
    assert user["utm_source"] == "google"
    assert user["utm_medium"] == "cpc"
    assert user["page"] == "signup"
    assert user["eid"] == e3


# --------------------------------------------------------------------------- captured fields

UA = "Mozilla/5.0 (X11; Linux x86_64) otserver-tests/1.0"
REFERER = "https://example.org/from/here?x=1"
AGENT = agent_fields(UA)


def _captured_of(server, si, headers=None, **props):
    token = server.create_token(si)
    eid = ok_eid(server.track(headers=headers, si=si, sid="cap-s", uid="cap-u", **props))
    event = event_of(server, token, eid, si)
    session = read(server, token, "sessions", "cap-s", si)
    user = read(server, token, "users", "cap-u", si)
    return event, session, user


def test_captured_user_agent_referer_and_anonymised_ip(server):
    event, session, user = _captured_of(
        server, "cap.example", headers={"User-Agent": UA, "Referer": REFERER}, page="p")
    # what the User-Agent tells is read off it (the read API adds it; nothing stores it)
    expected = {"user_agent": UA, "referer": REFERER, "ip": "127.0.0.0", **AGENT}
    assert AGENT == {"browser": "Unknown", "os": "Linux", "device": "desktop"}
    assert event["captured"] == expected
    assert session["captured"] == expected
    assert user["captured"] == expected
    # captured fields live beside the flat record, not in it
    assert "user_agent" not in event["event"] and "ip" not in event["event"]


@pytest.mark.parametrize("flag, missing", [
    ("--no-capture-user-agent", "user_agent"),
    ("--no-capture-referer", "referer"),
    ("--no-capture-ip", "ip"),
])
def test_each_capture_can_be_switched_off(make_server, flag, missing):
    server = make_server(flag)
    event, session, user = _captured_of(
        server, "cap-off.example", headers={"User-Agent": UA, "Referer": REFERER})
    expected = {"user_agent": UA, "referer": REFERER, "ip": "127.0.0.0"}
    del expected[missing]
    if "user_agent" in expected:
        expected |= AGENT
    assert event["captured"] == expected
    assert session["captured"] == expected
    assert user["captured"] == expected


def test_no_anonymize_ip_keeps_the_whole_address(make_server):
    server = make_server("--no-anonymize-ip")
    event, _, _ = _captured_of(server, "raw-ip.example")
    assert event["captured"]["ip"] == "127.0.0.1"


@pytest.mark.parametrize("flags, xff, expected", [
    (("--trusted-proxies", "127.0.0.1"), "203.0.113.7", "203.0.113.0"),
    (("--trusted-proxies", "127.0.0.1", "--no-anonymize-ip"), "203.0.113.7", "203.0.113.7"),
    (("--trusted-proxies", "127.0.0.1"), "198.51.100.23, 127.0.0.1", "198.51.100.0"),
    (("--trusted-proxies", "127.0.0.1"), "2001:db8:1234:5678:9abc:def0:1234:5678",
     "2001:db8:1234::"),
    # not believed: no trusted proxy configured, or the peer is not one of them
    ((), "203.0.113.7", "127.0.0.0"),
    (("--trusted-proxies", "10.0.0.0/8"), "203.0.113.7", "127.0.0.0"),
], ids=["trusted", "trusted-raw", "trusted-chain", "trusted-ipv6", "untrusted", "other-proxy"])
def test_x_forwarded_for_only_from_a_trusted_proxy(make_server, flags, xff, expected):
    server = make_server(*flags)
    event, session, _ = _captured_of(server, "xff.example", headers={"X-Forwarded-For": xff})
    assert event["captured"]["ip"] == expected
    assert session["captured"]["ip"] == expected


def test_clients_cannot_spoof_captured_fields(make_server):
    server = make_server("--no-capture-referer")
    event, session, user = _captured_of(
        server, "spoof.example", headers={"User-Agent": UA},
        user_agent="evil-bot", ip="6.6.6.6", referer="https://evil.example/", captured="yes",
        bot="false", device="mobile")
    assert event["captured"] == {"user_agent": UA, "ip": "127.0.0.0", **AGENT}
    assert session["captured"] == {"user_agent": UA, "ip": "127.0.0.0", **AGENT}
    assert user["captured"] == {"user_agent": UA, "ip": "127.0.0.0", **AGENT}
    # ...and the would-be spoofs are ordinary properties of the flat records
    for record in (event["event"], session["session"], user["user"]):
        assert record["user_agent"] == "evil-bot"
        assert record["ip"] == "6.6.6.6"
        assert record["referer"] == "https://evil.example/"
        assert record["captured"] == "yes"
        assert (record["bot"], record["device"]) == ("false", "mobile")


# --------------------------------------------------------------------------- POST, batch, pixel

def test_post_form_body(server):
    si = "post.example"
    token = server.create_token(si)
    resp = server.post("/", f"si={si}&message=hello+world&sid=p1")
    eid = ok_eid(resp)
    assert resp.headers["access-control-allow-origin"] == "*"
    assert flat_without_ts(event_of(server, token, eid, si)["event"]) == {
        "si": si, "message": "hello world", "eid": eid, "sid": "p1", "uid": "p1"}


def test_post_text_plain_body_as_send_beacon_sends_it(server):
    si = "beacon.example"
    token = server.create_token(si)
    body = f"si={si}&event=unload&t=%C3%A9t%C3%A9".encode()
    eid = ok_eid(server.post("/", body, {"Content-Type": "text/plain;charset=UTF-8"}))
    assert flat_without_ts(event_of(server, token, eid, si)["event"]) == {
        "si": si, "event": "unload", "t": "été", "eid": eid, "sid": eid, "uid": eid}


def test_post_query_and_body_together_body_wins(server):
    si = "clash.example"
    token = server.create_token(si)
    eid = ok_eid(server.post("/?si=wrong.example&message=from+query&only_query=q",
                             f"si={si}&message=from+body&only_body=b"))
    record = event_of(server, token, eid, si)["event"]
    assert record["si"] == si
    assert record["message"] == "from body"
    assert record["only_query"] == "q" and record["only_body"] == "b"
    assert server.counts()["events"] == 1


@pytest.mark.parametrize("target, ctype", [
    ("/", "application/xml"),
    ("/", "multipart/form-data; boundary=x"),
    ("/batch", "application/xml"),
])
def test_unsupported_content_type_is_415_and_stores_nothing(server, target, ctype):
    resp = server.post(target, "si=ctype.example&message=hi", {"Content-Type": ctype})
    assert resp.status == 415, resp
    counts = server.counts()
    assert counts["events"] == 0 and counts["sessions"] == 0 and counts["users"] == 0


def test_batch_answers_one_eid_per_line_in_order_and_stores_all(server):
    si = "batch.example"
    token = server.create_token(si)
    lines = [f"si={si}&sid=b1&n={i}&message=line+{i}" for i in range(5)]
    lines[0] += "&first=only&utm_source=one"
    lines[3] += "&utm_source=four"
    lines.append(f"si={si}&uid=bu&n=5")
    resp = server.post("/batch", "\n".join(lines) + "\n")
    assert resp.status == 200, resp
    eids = resp.text.splitlines()
    assert len(eids) == 6 and all(UUID7.match(e) for e in eids)
    assert len(set(eids)) == 6
    assert sorted(server.event_ids()) == sorted(eids)
    for i, eid in enumerate(eids):
        assert event_of(server, token, eid, si)["event"]["n"] == str(i)
    session = read(server, token, "sessions", "b1", si)
    assert [e["event"]["eid"] for e in session["events"]] == eids[:5]
    assert session["session"]["message"] == "line 4"
    # the events of one batch fold into their session one after another
    assert session["event_count"] == 5
    assert session["session"]["first"] == "only"
    assert session["session"]["utm_source"] == "one"
    assert session["session"]["eid"] == eids[4]
    assert read(server, token, "users", "bu", si)["user"]["sid"] == eids[5]


def test_batch_with_crlf_lines(server):
    si = "batch-crlf.example"
    token = server.create_token(si)
    resp = server.post("/batch", f"si={si}&n=0\r\nsi={si}&n=1\r\n",
                       {"Content-Type": "text/plain"})
    eids = ok_batch(resp, 2)
    assert [event_of(server, token, e, si)["event"]["n"] for e in eids] == ["0", "1"]


def ok_batch(resp, n):
    assert resp.status == 200, resp
    eids = resp.text.splitlines()
    assert len(eids) == n and all(UUID7.match(e) for e in eids), resp
    return eids


@pytest.mark.parametrize("bad_line, name", [
    ("message=no+site", "si"),
    ("si=batch-bad.example&msg=%FF", "msg"),
    ("si=batch-bad.example&eid=x", "eid"),
])
def test_batch_one_bad_line_stores_nothing(server, bad_line, name):
    body = "\n".join(["si=batch-bad.example&sid=x&n=1", bad_line,
                      "si=batch-bad.example&sid=x&n=3"])
    resp = server.post("/batch", body)
    assert resp.status == 400, resp
    assert "line 2" in resp.text
    assert name in resp.text
    counts = server.counts()
    assert counts["events"] == 0 and counts["sessions"] == 0 and counts["users"] == 0, counts


def test_batch_refusal_names_the_physical_line(server):
    body = "si=batch-bad.example&n=1\n\nsi=batch-bad.example&eid=x\n"
    resp = server.post("/batch", body)
    assert resp.status == 400, resp
    match = re.search(r"line (\d+)", resp.text)
    assert match, resp.text
    named = body.split("\n")[int(match.group(1)) - 1]
    if "eid" in resp.text:  # the refusal is about the eid: the named line must hold it
        assert "eid=x" in named, (resp.text, named)
    assert server.counts()["events"] == 0


def test_pixel_gif(server):
    si = "pixel.example"
    token = server.create_token(si)
    resp = server.get(f"/pixel.gif?si={si}&page=%2Fhome")
    assert resp.status == 200, resp
    assert resp.headers["content-type"] == "image/gif"
    assert len(resp.body) == 43
    assert resp.body.startswith(b"GIF89a") and resp.body.endswith(b";")
    assert resp.headers["access-control-allow-origin"] == "*"
    eid = resp.headers["x-eid"]
    assert UUID7.match(eid)
    assert server.event_ids() == [eid]
    record = event_of(server, token, eid, si)["event"]
    assert record["page"] == "/home" and record["eid"] == eid


# --------------------------------------------------------------------------- property rules

LONG_NAME = "longname" + "x" * 121  # 129 characters


@pytest.mark.parametrize("target, names", [
    ("/?message=hi", ["si"]),
    ("/?si=&message=hi", ["si"]),
    ("/?si=" + "s" * 256 + "&message=hi", ["si"]),
    ("/?si=S&sid=" + "s" * 256, ["sid"]),
    ("/?si=S&uid=" + "u" * 256, ["uid"]),
    ("/?si=S&my%20name=1", ["my name"]),
    ("/?si=S&my+name=1", ["my name"]),
    ("/?si=S&caf%C3%A9=1", ["caf"]),
    ("/?si=S&" + LONG_NAME + "=1", [LONG_NAME[:30]]),
    ("/?si=S&msg=%FF", ["msg"]),
    ("/?si=S&msg=ok%C3", ["msg"]),
    ("/?si=S&msg=%zz", ["msg"]),
    ("/?si=S&msg=50%", ["msg"]),
    ("/?si=S&eid=0190a1b2-0000-7000-8000-000000000000", ["eid"]),
    ("/?si=S&eid=", ["eid"]),
    ("/?si=S&unixtimestamp=1700000000000", ["unixtimestamp"]),
    ("/?si=S&" + "&".join(f"p{i}=v" for i in range(256)), ["properties"]),
    ("/pixel.gif?si=S&msg=%FF", ["msg"]),
], ids=["missing-si", "empty-si", "long-si", "long-sid", "long-uid", "space-name-pct",
        "space-name-plus", "non-ascii-name", "long-name", "value-ff", "value-truncated-utf8",
        "value-bad-pct", "value-trailing-pct", "eid-sent", "empty-eid-sent",
        "unixtimestamp-sent", "257-properties", "pixel-bad-value"])
def test_property_rules_refuse_naming_the_property(server, target, names):
    assert_refused(server, server.get(target), *names)


def test_bad_percent_encoding_in_a_name_is_refused(server):
    assert_refused(server, server.get("/?si=S&na%zzme=1"))


def test_bad_percent_encoding_in_a_name_names_it(server):
    assert_refused(server, server.get("/?si=S&na%zzme=1"), "na%zzme")


def test_too_many_properties_counts_query_and_body_together(server):
    query = "&".join(f"q{i}=v" for i in range(200))
    body = "si=S&" + "&".join(f"b{i}=v" for i in range(56))  # 257 with si
    assert_refused(server, server.post("/?" + query, body), "properties")
    # 256 in all is fine
    ok_eid(server.post("/?" + query, "si=S&" + "&".join(f"b{i}=v" for i in range(55))))


def test_value_over_8_kib_is_refused(server):
    assert_refused(server, server.post("/", "si=S&big=" + "a" * 8193), "big")
    assert_refused(server, server.post("/", "si=S&big=" + "%C3%A9" * 4097), "big")


def test_limits_are_inclusive(server):
    token = server.create_token("s" * 255)
    si = "s" * 255
    props = [("si", si), ("sid", "d" * 255), ("uid", "u" * 255), ("n" * 128, "name")]
    props += [(f"p{i}", "v") for i in range(256 - len(props))]  # exactly 256 properties
    eid = ok_eid(server.get("/?" + urlencode(props)))
    record = event_of(server, token, eid, si)["event"]
    assert record["sid"] == "d" * 255 and record["uid"] == "u" * 255
    assert record["n" * 128] == "name"
    assert len(record) == 256 - 3 + 5  # the properties but si/sid/uid, plus the five fields
    # a value of exactly 8 KiB (bytes, after decoding), also in multi-byte characters
    e2 = ok_eid(server.post("/", f"si={si}&big=" + "a" * 8192))
    e3 = ok_eid(server.post("/", f"si={si}&big=" + "%C3%A9" * 4096))
    assert event_of(server, token, e2, si)["event"]["big"] == "a" * 8192
    assert event_of(server, token, e3, si)["event"]["big"] == "é" * 4096


def test_name_given_twice_last_wins_plus_is_space(server):
    token = server.create_token("twice.example")
    eid = ok_eid(server.get("/?si=other.example&color=red&msg=a+b%2Bc&color=blue"
                            "&si=twice.example&empty=&sp=%20x%20"))
    record = event_of(server, token, eid, "twice.example")["event"]
    assert record["color"] == "blue"
    assert record["si"] == "twice.example"
    assert record["msg"] == "a b+c"
    assert record["empty"] == ""
    assert record["sp"] == " x "
    assert server.counts()["events"] == 1


def test_percent_encoded_names_are_decoded(server):
    token = server.create_token("names.example")
    eid = ok_eid(server.get("/?si=names.example&a%5Bb%5D=1&%7Ethings%21=2&x%3Dy=3"))
    record = event_of(server, token, eid, "names.example")["event"]
    assert record["a[b]"] == "1" and record["~things!"] == "2" and record["x=y"] == "3"


@pytest.mark.parametrize("ident", ["😀" * 255, "é" * 200, "é" * 201, "a/b?c%d e+f#g&h=i"],
                         ids=["255-emoji", "400-bytes", "402-bytes", "url-specials"])
def test_ids_of_any_characters_round_trip(server, ident):
    """sid/uid of 255 characters of any width (long ones are hashed into keys) and ids holding
    URL delimiters are stored and read back under exactly that id."""
    si = f"ids-wide-{len(ident)}.example"  # one site per case: 200 and 201 é share a prefix
    token = server.create_token(si)
    uid = ident if len(ident) == 255 else ident + "!"
    eid = ok_eid(server.track(si=si, sid=ident, uid=uid))
    session = read(server, token, "sessions", ident, si)
    assert session["session"]["sid"] == ident and session["session"]["eid"] == eid
    user = read(server, token, "users", uid, si)
    assert user["user"]["uid"] == uid
    assert [s["sid"] for s in user["sessions"]] == [ident]
    # a different id with the same start is a different session
    assert server.api(f"/api/v1/sessions/{q(ident[:-1])}?si={si}", token).status == 404
