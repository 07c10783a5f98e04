"""JSON ingest over real sockets: POST / with an object of properties, POST /batch with an array
of them; the same id rules, limits and refusals as url-encoded events, each refusal storing
nothing; and the headers a browser page needs to read the eid."""
from __future__ import annotations

import json

import pytest
from conftest import FreshView

SITE = "json.example"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def server(shared_server) -> FreshView:
    return FreshView(shared_server)


@pytest.fixture
def token(shared_server) -> str:
    return shared_server.create_token("*")


def post_json(server, target: str, body, headers: dict | None = None):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return server.post(target, data, {**JSON, **(headers or {})})


def event(server, token: str, eid: str, si: str = SITE) -> dict:
    resp = server.api(f"/api/v1/events/{eid}?si={si}", token)
    assert resp.status == 200, resp
    return resp.json()["event"]


def assert_refused(server, resp, status: int, *words: str) -> None:
    assert resp.status == status, resp
    assert resp.headers.get("access-control-allow-origin") == "*"
    for word in words:
        assert word in resp.text, (word, resp.text)
    counts = server.counts()
    assert counts["events"] == 0 and counts["sessions"] == 0 and counts["users"] == 0, counts


def test_an_object_is_one_event_numbers_and_booleans_kept_as_their_json_text(server, token):
    resp = post_json(server, "/", '{"si": "json.example", "sid": "j1", "page": "/\\u00e4", '
                                  '"price": 1.50, "qty": 3, "big": 12345678901234567890, '
                                  '"member": true, "trial": false, "note": ""}')
    assert resp.status == 200, resp
    stored = event(server, token, resp.text)
    assert {k: v for k, v in stored.items() if k not in ("eid", "unixtimestamp")} == {
        "si": SITE, "sid": "j1", "uid": "j1", "page": "/ä", "price": "1.50", "qty": "3",
        "big": "12345678901234567890", "member": "true", "trial": "false", "note": ""}
    assert server.counts()["events"] == 1


def test_query_properties_and_the_json_body_together_the_body_wins(server, token):
    resp = post_json(server, f"/?si={SITE}&sid=q&page=from-query&ref=q",
                     {"page": "from-body", "charset": "utf-8"})
    assert resp.status == 200, resp
    stored = event(server, token, resp.text)
    assert (stored["page"], stored["ref"], stored["charset"], stored["sid"]) == (
        "from-body", "q", "utf-8", "q")


def test_a_charset_parameter_on_the_type_is_fine(server):
    resp = post_json(server, "/", {"si": SITE}, {"Content-Type": "application/json; charset=utf-8"})
    assert resp.status == 200, resp


@pytest.mark.parametrize("body, words", [
    ({"si": SITE, "gone": None}, ("property gone: null is not a property value",)),
    ({"si": SITE, "tags": ["a", "b"]}, ("property tags: an array",)),
    ({"si": SITE, "ctx": {"a": 1}}, ("property ctx: an object",)),
    ({"si": SITE, "eid": "0190a1b2-0000-7000-8000-000000000000"}, ("property eid",)),
    ({"si": SITE, "unixtimestamp": 1700000000000}, ("property unixtimestamp",)),
    ({"page": "/no-site"}, ("si",)),
    ({"si": SITE, "bad name": "x"}, ("bad property name 'bad name'",)),
    ({"si": SITE, "näme": "x"}, ("bad property name",)),
    ({"si": SITE, "v": "x" * 8193}, ("property v: value longer than 8192 bytes",)),
    ({"si": SITE, **{f"p{i}": "x" for i in range(256)}}, ("too many properties",)),
    ([{"si": SITE}], ("a JSON event is an object of properties",)),
    ("a string", ("a JSON event is an object of properties",)),
], ids=["null", "array", "object", "eid", "unixtimestamp", "no si", "space in name",
        "non-ascii name", "long value", "too many", "an array on /", "a string"])
def test_a_refused_object_names_the_property_and_stores_nothing(server, body, words):
    assert_refused(server, post_json(server, "/", json.dumps(body)), 400, *words)


@pytest.mark.parametrize("raw, words", [
    (b'{"si": "json.example", "a": 1,}', ("not valid JSON", "line 1 column")),
    (b'{"si": "json.example", "n": NaN}', ("NaN is not JSON",)),
    (b'{"si": "json.example", "n": "\xff"}', ("not valid UTF-8",)),
    (b"", ("not valid JSON",)),
], ids=["trailing comma", "NaN", "bad utf-8", "empty"])
def test_a_body_that_is_not_json_is_400_and_stores_nothing(server, raw, words):
    assert_refused(server, post_json(server, "/", raw), 400, *words)


def test_a_json_batch_stores_every_object_in_order_with_the_id_rules(server, token):
    items = [{"sid": "b1", "n": i} for i in range(4)] + [{"uid": "bu", "n": 4}]
    resp = post_json(server, f"/batch?si={SITE}&src=batch", items)
    assert resp.status == 200, resp
    eids = resp.text.split()
    assert len(eids) == 5 and server.event_ids() == eids
    first = event(server, token, eids[0])
    assert (first["sid"], first["uid"], first["n"], first["src"]) == ("b1", "b1", "0", "batch")
    session = server.api(f"/api/v1/sessions/b1?si={SITE}", token).json()
    assert session["event_count"] == 4
    last = event(server, token, eids[4])
    assert (last["uid"], last["sid"]) == ("bu", eids[4])  # a known user: a new session


@pytest.mark.parametrize("body, words", [
    ([{"n": 1}, {"n": 2, "bad": None}, {"n": 3}], ("item 2: property bad: null",)),
    ([{"n": 1}, "not an object"], ("item 2: a JSON event is an object",)),
    ([], ("empty batch",)),
    ({"si": SITE}, ("a JSON batch is an array of event objects",)),
], ids=["a bad item", "a string item", "empty", "an object"])
def test_a_json_batch_is_atomic_and_names_the_item(server, body, words):
    assert_refused(server, post_json(server, f"/batch?si={SITE}", body), 400, *words)


def test_a_json_batch_over_the_event_limit_is_refused(make_server):
    small = make_server("--max-batch-events", "3")
    resp = post_json(small, f"/batch?si={SITE}", [{"n": i} for i in range(4)])
    assert resp.status == 400 and "at most 3" in resp.text, resp
    assert small.counts()["events"] == 0


def test_a_json_body_over_the_body_limit_is_413(server):
    resp = post_json(server, "/", {"si": SITE, "v": "x" * (64 * 1024)})
    assert_refused(server, resp, 413)


def test_the_page_may_read_the_eid_and_send_json_and_an_idempotency_key(server):
    resp = server.track(si=SITE)
    assert resp.headers.get("access-control-expose-headers") == "X-Eid, Retry-After"
    pixel = server.get(f"/pixel.gif?si={SITE}")
    assert pixel.headers.get("access-control-expose-headers") == "X-Eid, Retry-After" and pixel.headers["x-eid"]
    preflight = server.request("OPTIONS", "/batch", headers={
        "Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, idempotency-key"})
    assert preflight.status == 204
    allowed = {h.strip().lower() for h in
               preflight.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "idempotency-key"} <= allowed
