"""The smallest end-to-end proof: one event in, its eid out, the event stored."""
import re

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_one_event_is_stored_and_its_eid_returned(server):
    resp = server.track(si="test.opentracker.net", message="Please track me")
    assert resp.status == 200
    assert UUID7.match(resp.text)
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["cache-control"] == "no-store"
    assert server.event_ids() == [resp.text]


def test_healthz(server):
    resp = server.get("/healthz")
    assert resp.status == 200 and resp.text == "ok\n"
