"""Idempotent retries over real sockets (SPEC 2.7): an `Idempotency-Key` header for a request, an
`idempotency_key` property for an event. A repeat answers 200 with the original eids and stores
nothing; the same key with another body answers 422 and stores nothing; it holds across two
workers, and across a kill -9 between the commit and the answer."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import lmdb
import pytest
from conftest import FreshView, wait_until

SITE = "idem.example"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def server(shared_server) -> FreshView:
    return FreshView(shared_server)


@pytest.fixture(scope="module")
def token(shared_server) -> str:
    return shared_server.create_token("*")


def stored(server, token: str, si: str = SITE) -> list[dict]:
    """Every event of the site as the read API lists it (read your writes: all acknowledged)."""
    resp = server.api(f"/api/v1/events?si={si}", token)
    assert resp.status == 200, resp
    return [json.loads(line)["event"] for line in resp.text.splitlines()]


def settled(server, token: str) -> dict:
    """The store's counts once the views hold everything acknowledged (a read waits for it)."""
    stored(server, token)
    return server.counts()


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


# ---------------------------------------------------------------------- replays

def test_a_repeated_header_key_answers_the_original_eid_and_stores_nothing(server, token):
    key = unique("hdr")
    first = server.track(si=SITE, ev="signup", headers={"Idempotency-Key": key})
    again = server.track(si=SITE, ev="signup", headers={"Idempotency-Key": key})
    assert first.status == again.status == 200, (first, again)
    assert again.text == first.text
    assert server.counts()["events"] == 1
    assert [e["eid"] for e in stored(server, token) if e.get("ev") == "signup"][-1] == first.text
    # counted as a replay: the shared server has replayed this one and maybe earlier tests'
    assert re.search(r"^otserver_events_replayed_total [1-9]\d*$",
                     server.get("/metrics").text, re.M)


def test_an_event_key_is_kept_out_of_the_stored_properties(server, token):
    key = unique("prop")
    first = server.track(si=SITE, sid="s-prop", page="/a", idempotency_key=key)
    again = server.track(si=SITE, sid="s-prop", page="/a", idempotency_key=key)
    assert first.status == again.status == 200 and again.text == first.text
    event = server.api(f"/api/v1/events/{first.text}?si={SITE}", token).json()["event"]
    assert "idempotency_key" not in event and event["page"] == "/a"
    session = server.api(f"/api/v1/sessions/s-prop?si={SITE}", token).json()
    assert session["event_count"] == 1, session
    assert server.counts()["events"] == 1


def test_a_pixel_and_a_post_replay_like_a_get(server):
    key = unique("pix")
    pixel = [server.get(f"/pixel.gif?si={SITE}&idempotency_key={key}") for _ in range(2)]
    assert pixel[0].headers["x-eid"] == pixel[1].headers["x-eid"]
    key = unique("post")
    posts = [server.post("/", f"si={SITE}&ev=buy", {"Idempotency-Key": key}) for _ in range(2)]
    assert posts[0].text == posts[1].text
    assert server.counts()["events"] == 2


def test_a_batch_retried_with_its_item_keys_stores_only_the_new_events(server, token):
    keys = [unique(f"item{n}") for n in range(3)]
    first = server.post("/batch", "\n".join(f"si={SITE}&n={n}&idempotency_key={k}"
                                            for n, k in enumerate(keys[:2])))
    # The retry carries the two sent before and one new event, in another order.
    lines = [f"si={SITE}&n=2&idempotency_key={keys[2]}", f"si={SITE}&n=0&idempotency_key={keys[0]}",
             f"si={SITE}&n=1&idempotency_key={keys[1]}"]
    again = server.post("/batch", "\n".join(lines))
    assert first.status == again.status == 200, (first, again)
    old = first.text.split()
    new = again.text.split()
    assert new[1:] == old and new[0] not in old
    assert sorted(e["n"] for e in stored(server, token) if e["eid"] in new) == ["0", "1", "2"]
    assert server.counts()["events"] == 3


def test_a_json_batch_with_a_header_key_replays_whole(server):
    key = unique("jb")
    body = json.dumps([{"si": SITE, "ev": "a", "price": 1.50}, {"si": SITE, "ev": "b"}])
    answers = [server.post("/batch", body, {**JSON, "Idempotency-Key": key}) for _ in range(3)]
    assert [a.status for a in answers] == [200] * 3
    assert answers[0].text == answers[1].text == answers[2].text
    assert len(answers[0].text.split()) == 2
    assert server.counts()["events"] == 2


def test_the_same_key_twice_in_one_batch_is_one_event(server):
    key = unique("twice")
    resp = server.post("/batch", json.dumps([{"si": SITE, "n": 1, "idempotency_key": key}] * 2),
                       JSON)
    assert resp.status == 200, resp
    first, second = resp.text.split()
    assert first == second
    assert server.counts()["events"] == 1


def test_keys_are_per_site(server):
    key = unique("site")
    a = server.track(si="idem-a.example", idempotency_key=key)
    b = server.track(si="idem-b.example", idempotency_key=key)
    assert a.status == b.status == 200 and a.text != b.text
    assert server.counts()["events"] == 2


def test_a_header_key_and_an_event_key_of_the_same_text_are_two_keys(server):
    key = unique("both")
    a = server.track(si=SITE, ev="x", headers={"Idempotency-Key": key})
    b = server.track(si=SITE, ev="y", idempotency_key=key)
    assert a.status == b.status == 200 and a.text != b.text


# ---------------------------------------------------------------------- conflicts: 422, nothing stored

def test_a_key_with_another_body_is_refused_with_422_and_stores_nothing(server, token):
    key = unique("conflict")
    assert server.track(si=SITE, ev="a", idempotency_key=key).status == 200
    before = settled(server, token)
    resp = server.track(si=SITE, ev="b", idempotency_key=key)
    assert resp.status == 422, resp
    assert f"idempotency_key {key} was used with another event" in resp.text
    assert resp.headers["access-control-allow-origin"] == "*"
    assert settled(server, token) == before


def test_a_conflicting_item_refuses_the_whole_batch_naming_it(server, token):
    key = unique("bconf")
    assert server.track(si=SITE, ev="a", idempotency_key=key).status == 200
    before = settled(server, token)
    body = json.dumps([{"si": SITE, "ev": "new"}, {"si": SITE, "ev": "b", "idempotency_key": key}])
    resp = server.post("/batch", body, JSON)
    assert resp.status == 422, resp
    assert resp.text.startswith(f"item 2: idempotency_key {key}")
    lines = f"si={SITE}&ev=new\nsi={SITE}&ev=c&idempotency_key={key}"
    resp = server.post("/batch", lines)
    assert resp.status == 422 and resp.text.startswith("line 2: "), resp
    assert settled(server, token) == before


def test_a_header_key_with_another_body_is_refused(server, token):
    key = unique("hconf")
    assert server.post("/batch", f"si={SITE}&n=1", {"Idempotency-Key": key}).status == 200
    before = settled(server, token)
    resp = server.post("/batch", f"si={SITE}&n=1\nsi={SITE}&n=2", {"Idempotency-Key": key})
    assert resp.status == 422, resp
    assert f"Idempotency-Key {key} was used with another request body" in resp.text
    assert settled(server, token) == before


def test_the_server_added_fields_are_not_the_body(server):
    """A retry from another address or browser version is still a retry."""
    key = unique("ua")
    a = server.track(si=SITE, ev="x", idempotency_key=key, headers={"User-Agent": "one/1"})
    b = server.track(si=SITE, ev="x", idempotency_key=key, headers={"User-Agent": "two/2",
                                                                     "Referer": "http://r/"})
    assert a.status == b.status == 200 and a.text == b.text


@pytest.mark.parametrize("target,headers,reason", [
    ("/?si=idem.example&idempotency_key=" + "k" * 256, {}, "property idempotency_key"),
    ("/?si=idem.example&idempotency_key=", {}, "property idempotency_key"),
    ("/?si=idem.example", {"Idempotency-Key": "k" * 256}, "the Idempotency-Key header"),
])
def test_a_bad_key_is_refused_with_400_and_stores_nothing(server, target, headers, reason):
    resp = server.get(target, headers=headers)
    assert resp.status == 400, resp
    assert reason in resp.text and "1 to 255 printable ASCII" in resp.text
    assert server.counts()["events"] == 0


def test_a_bad_key_in_a_batch_names_its_line(server):
    resp = server.post("/batch", f"si={SITE}\nsi={SITE}&idempotency_key=caf%C3%A9")
    assert resp.status == 400 and resp.text.startswith("line 2: property idempotency_key"), resp
    assert server.counts()["events"] == 0


# ---------------------------------------------------------------------- across workers and crashes

def test_concurrent_duplicates_on_two_workers_store_one_event(make_server):
    """Twenty connections (spread over both workers by the kernel) send the same keyed event
    at once, while the test holds the log's write lock so that every copy waits in a writer:
    when the lock is released, both workers' writers commit, and the key decides."""
    server = make_server("--workers", "2")
    token = server.create_token("*")
    assert server.track(si=SITE, ev="warm").status == 200
    env = lmdb.open(str(Path(server.data_dir, "log")), max_dbs=32)
    answers: list = []
    try:
        txn = env.begin(write=True)
        barrier = threading.Barrier(20)

        def send():
            barrier.wait()
            answers.append(server.track(si=SITE, ev="dup", n="1", idempotency_key="dup-1"))

        threads = [threading.Thread(target=send) for _ in range(20)]
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # every copy read and waiting for the lock
        txn.abort()
        for thread in threads:
            thread.join(15)
    finally:
        env.close()
    assert [a.status for a in answers] == [200] * 20, answers
    assert len({a.text for a in answers}) == 1
    events = [e for e in stored(server, token) if e.get("ev") == "dup"]
    assert [e["eid"] for e in events] == [answers[0].text]
    # /metrics adds up both workers: nineteen answers were replays (snapshots lag a little)
    wait_until(lambda: re.search(r"^otserver_events_replayed_total 19$",
                                 server.get("/metrics").text, re.M), timeout=10)


def _entries(env, name: bytes) -> int:
    with env.begin() as txn:
        return txn.stat(env.open_db(name, txn=txn, create=False))["entries"]


def test_kill_9_between_the_commit_and_the_answer_then_a_retry_stores_one_event(make_server):
    """The answer is lost for real: the test holds the log's write lock, the request reaches
    the writer, the server's event loop is stopped (SIGSTOP) and the lock released, so the
    writer commits and the answer waits in a socket no one reads; then kill -9. The client
    got nothing; its retry to the restarted server must find the stored event."""
    server = make_server()
    token = server.create_token("*")
    env = lmdb.open(str(server.data_dir / "log"), max_dbs=32)
    before = _entries(env, b"log")
    txn = env.begin(write=True)
    sock = server.connect()
    try:
        sock.sendall(f"GET /?si={SITE}&ev=paid&idempotency_key=order-7 HTTP/1.1\r\n"
                     f"Host: x\r\n\r\n".encode())
        time.sleep(0.3)  # read by the loop, sent to the writer, which waits for the lock
        os.kill(server.proc.pid, signal.SIGSTOP)
        txn.abort()
        txn = None
        wait_until(lambda: _entries(env, b"log") == before + 1, timeout=10)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # closed, no answer: the client must retry
    finally:
        if txn is not None:
            txn.abort()
        env.close()
        sock.close()
    server.start()
    retry = server.track(si=SITE, ev="paid", idempotency_key="order-7")
    assert retry.status == 200, retry
    events = [e for e in stored(server, token) if e.get("ev") == "paid"]
    assert [e["eid"] for e in events] == [retry.text]


def test_a_key_older_than_the_window_is_new_and_is_swept(make_server):
    server = make_server("--idempotency-window", "1s", "--sweep-interval", "1s")
    first = server.track(si=SITE, ev="a", idempotency_key="old")
    assert server.track(si=SITE, ev="a", idempotency_key="old").text == first.text
    time.sleep(1.2)
    # Past the window the key is new again: another body is no conflict, and is stored.
    later = server.track(si=SITE, ev="b", idempotency_key="old")
    assert later.status == 200 and later.text != first.text
    assert server.counts()["events"] == 2

    env = lmdb.open(str(server.data_dir / "log"), readonly=True, max_dbs=32)
    try:
        assert _entries(env, b"keys") == 1
        wait_until(lambda: _entries(env, b"keys") == 0, timeout=10)
    finally:
        env.close()
