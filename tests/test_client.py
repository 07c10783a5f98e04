"""otserver.client: the policy alone (its steps driven by hand, a fake clock), then Tracker and
AsyncTracker against a real server: events arrive with their properties and the seed's ids, in
few requests; flush, close and the context managers; a bounded queue that drops, never blocks;
refusals at track(); a refused item dropped alone; retries through a restart (kill -9 or
SIGTERM) and through an answer lost on the way, with every event stored exactly once.

The exactly-once assertions after a kill -9 and after a lost answer hold only with the server's
idempotency keys (SPEC 2.7): the retry resends the keys of an attempt that was stored."""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import uuid
from urllib.parse import quote

import pytest
from conftest import read_response, wait_until

from otserver.client import (AsyncTracker, DeliveryError, Tracker, _NetError, _Pipeline,
                             _Reply, _Send, _Sleep)

TEST_BOUND_S = 90


@pytest.fixture(autouse=True)
def time_bound():
    """Every test ends within TEST_BOUND_S, whatever hangs."""
    def expire(signum, frame):
        raise TimeoutError(f"the test ran past {TEST_BOUND_S} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_BOUND_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def token(shared_server) -> str:
    return shared_server.create_token("*")


def new_site() -> str:
    return f"client-{uuid.uuid4().hex[:12]}.test"


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def stored(server, token: str, site: str) -> list[dict]:
    """Every event of the site, from the read API, in log order."""
    events, after = [], None
    while True:
        target = f"/api/v1/events?si={quote(site)}&limit=10000"
        resp = server.api(target + (f"&after={after}" if after else ""), token)
        assert resp.status == 200, resp
        page = [json.loads(line)["event"] for line in resp.text.splitlines() if line]
        if not page:
            return events
        events += page
        after = resp.headers["x-next-after"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the policy alone

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pipeline(**options) -> _Pipeline:
    """The shared policy with no I/O under it (the base class opens nothing)."""
    class Bare(_Pipeline):
        def _setup_io(self):
            pass
    errors, sent = [], []
    p = Bare("http://127.0.0.1:9", "policy.test", on_error=errors.append, on_sent=sent.extend,
             **options)
    p.clock, p.jitter = FakeClock(), (lambda: 1.0)
    p.errors, p.sent_pairs = errors, sent
    return p


def queue(p: _Pipeline, count: int) -> list:
    for n in range(count):
        p._offer(*p._encode(None, {"n": n}))
    return p._take()


def numbers(body: bytes) -> list[int]:
    return [int(item["n"]) for item in json.loads(body)]


def run(p: _Pipeline, batch: list, replies) -> list:
    """Drive p._deliver(batch): each _Send is answered with the next reply; each _Sleep moves
    the fake clock. -> the steps, in order."""
    replies, steps = iter(replies), []
    gen, back = p._deliver(batch), None
    try:
        while True:
            step = gen.send(back)
            steps.append(step)
            if type(step) is _Send:
                back = next(replies)
            else:
                p.clock.now += step.seconds
                back = None
    except StopIteration:
        return steps


def ok(count: int) -> _Reply:
    return _Reply(200, None, "".join(f"eid-{n}\n" for n in range(count)).encode())


def test_a_503_waits_its_retry_after_then_the_batch_is_sent():
    p = pipeline()
    steps = run(p, queue(p, 3), [_Reply(503, "2", b"busy"), ok(3)])
    assert [type(s) for s in steps] == [_Send, _Sleep, _Send]
    assert 2.0 <= steps[1].seconds <= 2.21 and steps[0].body == steps[2].body
    assert (p.sent, p.failed, p.retries, p.requests, p._settled) == (3, 0, 1, 2, 3)
    assert [eid for _, eid in p.sent_pairs] == ["eid-0", "eid-1", "eid-2"]


def test_backoff_doubles_with_jitter_up_to_its_cap_then_gives_up_past_max_retry_seconds():
    p = pipeline(max_retry_seconds=20)
    p.jitter = lambda: 0.0  # the low end of each step: half of it
    refused = _NetError(ConnectionRefusedError("refused"), False)
    steps = run(p, queue(p, 2), [refused] * 100)
    sleeps = [s.seconds for s in steps if type(s) is _Sleep]
    assert sleeps[:4] == [0.025, 0.05, 0.1, 0.2] and max(sleeps) == 2.5  # half of 5 s
    assert sum(sleeps) <= 20 and p.clock.now - 1000 <= 20
    assert (p.sent, p.failed, p.retries, p._settled) == (0, 2, len(sleeps), 2)
    [error] = p.errors
    assert error.status is None and "gave up" in error.reason and "refused" in error.reason
    assert len(error.keys) == 2 and [e["n"] for e in error.events] == [0, 1]


def test_a_reused_connection_that_fails_is_resent_at_once_once():
    p = pipeline()
    reset = _NetError(ConnectionResetError("idle close"), True)
    steps = run(p, queue(p, 1), [reset, reset, ok(1)])
    assert [type(s) for s in steps] == [_Send, _Send, _Sleep, _Send]
    assert (p.sent, p.retries, p.requests) == (1, 1, 3)


def test_a_400_naming_an_item_fails_it_alone_and_resends_the_rest():
    p = pipeline()
    steps = run(p, queue(p, 4), [_Reply(400, None, b"item 2: property x: too long"), ok(3)])
    assert numbers(steps[0].body) == [0, 1, 2, 3] and numbers(steps[1].body) == [0, 2, 3]
    assert (p.sent, p.failed, p.retries) == (3, 1, 0)
    [error] = p.errors
    assert error.status == 400 and error.reason.startswith("item 2:") and \
        [e["n"] for e in error.events] == [1]


def test_a_422_naming_an_item_fails_it_alone_other_4xx_fail_the_batch_unretried():
    p = pipeline()
    run(p, queue(p, 2), [_Reply(422, None, b"item 1: idempotency key reused"), ok(1)])
    run(p, queue(p, 2), [_Reply(400, None, b"the body is not valid JSON")])
    assert (p.sent, p.failed, p.retries) == (1, 3, 0)
    assert [e.status for e in p.errors] == [422, 400] and len(p.errors[1].keys) == 2


def test_a_413_splits_the_batch_in_order():
    p = pipeline()
    steps = run(p, queue(p, 5), [_Reply(413, None, b"too large"), ok(2), ok(3)])
    assert [numbers(s.body) for s in steps] == [[0, 1, 2, 3, 4], [0, 1], [2, 3, 4]]
    assert p.sent == 5 and p.failed == 0 and len(p.sent_pairs) == 5


def test_a_close_out_of_time_fails_what_is_left():
    p = pipeline()
    gen = p._deliver(queue(p, 3))
    assert type(next(gen)) is _Send
    assert type(gen.send(_Reply(503, "1", b"busy"))) is _Sleep
    p._aborted = True
    with pytest.raises(StopIteration):
        gen.send(None)
    assert (p.sent, p.failed, p._settled) == (0, 3, 3) and "closed" in p.errors[0].reason


def test_batches_respect_batch_size_and_max_batch_bytes():
    p = pipeline(batch_size=4, max_batch_bytes=1024)
    for n in range(10):
        p._offer(*p._encode(None, {"n": n, "pad": "x" * 300}))
    sizes = []
    while p._queue:
        batch = p._take()
        body = b"[" + b",".join(item[2] for item in batch) + b"]"
        assert len(body) <= 1024
        sizes.append(len(batch))
    assert sum(sizes) == 10 and max(sizes) < 4  # the bytes bound before the count


# --------------------------------------------------------------------------- validation

def test_track_refuses_at_once_what_the_server_would_refuse(shared_server):
    with Tracker(url(shared_server), new_site(), flush_interval=60) as tracker:
        for bad in (None, [1], {"a": 1}, b"bytes", object()):
            with pytest.raises(TypeError, match="property v"):
                tracker.track(v=bad)
        with pytest.raises(TypeError):
            tracker.track({1: "x"})
        with pytest.raises(TypeError):
            tracker.track("page=/x")
        for props in ({"eid": "x"}, {"unixtimestamp": 1}, {"a b": 1}, {"": 1}, {"ä": 1},
                      {"n" * 129: 1}, {"v": "x" * 8193}, {"v": "é" * 4097}, {"v": "\ud800"},
                      {"v": float("nan")}, {"v": float("inf")}, {"si": ""}, {"sid": "s" * 256},
                      {f"p{n}": n for n in range(255)}, {"idempotency_key": ""},
                      {"idempotency_key": "k" * 256}, {"idempotency_key": "ключ"}):
            with pytest.raises(ValueError):
                tracker.track(props)
        # the limits themselves pass: 254 properties, si and the key make 256
        tracker.track({"n" * 128: "x" * 8192, "v": "é" * 4096},
                      **{f"p{n}": n for n in range(252)}, idempotency_key="k" * 255)
        assert tracker.pending == 1 and tracker.requests == 0
    assert (tracker.sent, tracker.failed) == (1, 0)  # and the server agrees
    for args, options in ((("ftp://h", "s"), {}), (("http://h/?si=s", "s"), {}),
                          (("http://h", ""), {}), (("http://h", "s"), {"batch_size": 0}),
                          (("http://h", "s"), {"batch_size": 10_001}),
                          (("http://h", "s"), {"max_queue": 0})):
        with pytest.raises(ValueError):
            Tracker(*args, **options)


# --------------------------------------------------------------------------- a real server

def test_events_arrive_with_their_properties_and_the_seeds_ids(shared_server, token):
    site, pairs = new_site(), []
    with Tracker(url(shared_server), site, on_sent=pairs.extend) as tracker:
        keys = [tracker.track({"page": "/a", "price": 1.5, "qty": 3, "member": True}),
                tracker.track(page="/b", sid="s1"),
                tracker.track(page="/c", uid="u1"),
                tracker.track({"page": "/d"}, sid="s2", uid="u2", note="é ü")]
    assert (tracker.sent, tracker.failed, tracker.dropped) == (4, 0, 0)
    assert [key for key, _ in pairs] == keys and all(len(key) == 32 for key in keys)
    events = stored(shared_server, token, site)
    assert [e["eid"] for e in events] == [eid for _, eid in pairs]
    a, b, c, d = events
    assert (a["page"], a["price"], a["qty"], a["member"]) == ("/a", "1.5", "3", "true")
    assert a["sid"] == a["uid"] == a["eid"]  # si only
    assert (b["sid"], b["uid"]) == ("s1", "s1")  # si, sid: uid = sid
    assert (c["sid"], c["uid"]) == (c["eid"], "u1")  # si, uid: a new session
    assert (d["sid"], d["uid"], d["note"]) == ("s2", "u2", "é ü")
    assert all(e["si"] == site for e in events)
    # SPEC 2.7: the key is kept out of the stored properties
    assert not any("idempotency_key" in e for e in events)


def test_many_events_go_in_few_requests(shared_server, token):
    site = new_site()
    with Tracker(url(shared_server), site, batch_size=500, flush_interval=30) as tracker:
        for n in range(2500):
            tracker.track(n=n)
        assert tracker.flush(timeout=20)
        assert (tracker.sent, tracker.requests) == (2500, 5)
    assert [int(e["n"]) for e in stored(shared_server, token, site)] == list(range(2500))


def test_a_partial_batch_goes_out_after_flush_interval(shared_server):
    tracker = Tracker(url(shared_server), new_site(), batch_size=1000, flush_interval=0.2)
    started = time.monotonic()
    for n in range(3):
        tracker.track(n=n)
    wait_until(lambda: tracker.sent == 3, timeout=10)
    assert 0.15 <= time.monotonic() - started and tracker.requests == 1
    assert tracker.close(timeout=10)


def test_flush_close_and_the_context_manager(shared_server, token):
    site = new_site()
    tracker = Tracker(url(shared_server), site, flush_interval=30)
    assert tracker.flush(timeout=1) and tracker.requests == 0  # nothing to flush
    tracker.track(n=1)
    assert tracker.flush(timeout=10) and tracker.sent == 1 and tracker.pending == 0
    tracker.track(n=2)
    assert tracker.close(timeout=10) and tracker.sent == 2
    assert tracker.close() and tracker.close(timeout=0)  # idempotent
    assert not tracker._thread.is_alive()
    with pytest.raises(RuntimeError):
        tracker.track(n=3)
    with Tracker(url(shared_server), site, flush_interval=30) as other:
        other.track(n=3)
    assert other.sent == 1 and not other._thread.is_alive()
    assert sorted(int(e["n"]) for e in stored(shared_server, token, site)) == [1, 2, 3]


def test_a_callers_own_key_stores_the_event_once(shared_server, token):
    site, pairs = new_site(), []
    for _ in range(2):  # two trackers, as two processes replaying the same outbox
        with Tracker(url(shared_server), site, on_sent=pairs.extend) as tracker:
            assert tracker.track(order=17, idempotency_key="order-17") == "order-17"
    [first, second] = pairs
    assert first == second and first[0] == "order-17"
    assert [e["eid"] for e in stored(shared_server, token, site)] == [first[1]]


def test_a_full_queue_drops_the_newest_and_track_never_blocks(make_server):
    server = make_server()
    server.stop()  # nothing listens: every attempt fails, the queue fills
    errors = []
    tracker = Tracker(url(server), new_site(), batch_size=5, max_queue=10, flush_interval=60,
                      max_retry_seconds=30, on_error=errors.append)
    slowest, keys = 0.0, []
    for n in range(100):
        started = time.monotonic()
        keys.append(tracker.track(n=n))
        slowest = max(slowest, time.monotonic() - started)
    accepted = sum(key is not None for key in keys)
    assert slowest < 0.05, slowest
    assert 10 <= accepted <= 15 and all(keys[:10])  # the queue, and one batch in flight
    assert tracker.dropped == 100 - accepted and keys[-1] is None
    started = time.monotonic()
    assert tracker.close(timeout=0.5) is False  # the server is still down
    assert time.monotonic() - started < 3
    assert (tracker.sent, tracker.failed, tracker.pending) == (0, accepted, 0)
    assert sum(len(e.keys) for e in errors) == accepted
    assert all(isinstance(e, DeliveryError) and e.status is None for e in errors)


def test_a_refused_item_is_dropped_alone_and_the_rest_is_stored(make_server):
    server = make_server("--max-value-bytes", "1KiB")  # stricter than the client's 8 KiB
    token, site, errors = server.create_token("*"), new_site(), []
    with Tracker(url(server), site, on_error=errors.append) as tracker:
        for n in range(5):
            tracker.track(n=n, text="x" * (2000 if n == 2 else 10))
    assert (tracker.sent, tracker.failed, tracker.retries) == (4, 1, 0)
    [error] = errors
    assert error.status == 400 and error.reason.startswith("item 3: property text")
    assert [e["n"] for e in error.events] == [2]
    assert [int(e["n"]) for e in stored(server, token, site)] == [0, 1, 3, 4]


@pytest.mark.parametrize("crash", ["kill -9", "SIGTERM"])
def test_every_event_is_stored_exactly_once_through_a_restart(make_server, crash):
    port = free_port()
    server = make_server("--port", str(port))  # the same port again after the restart
    token, site, count = server.create_token("*"), new_site(), 3000
    tracker = Tracker(url(server), site, batch_size=50, flush_interval=0.02, timeout=5,
                      max_retry_seconds=40)

    def produce():
        for n in range(count):
            tracker.track(n=n, sid=f"s{n % 7}")
            if n % 2:
                time.sleep(0.001)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    wait_until(lambda: tracker.sent >= count // 4, timeout=20)
    if crash == "kill -9":
        server.kill()
    else:
        server.stop()
    sent_before = tracker.sent
    time.sleep(0.3)  # the tracker meets a closed port for a while
    server.start()
    producer.join(30)
    assert tracker.close(timeout=60)
    assert sent_before < count, "the restart came after the last event: nothing was tested"
    assert (tracker.sent, tracker.failed, tracker.dropped) == (count, 0, 0)
    assert tracker.retries >= 1
    found = sorted(int(e["n"]) for e in stored(server, token, site))
    assert found == list(range(count)), (len(found), len(set(found)))


class LosingProxy:
    """A TCP relay to the server, except for its first connection: the request there is passed
    on and answered, but the answer is swallowed and the connection closed, as when a network
    drops an answer after the server committed."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.swallowed: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target, timeout=10)
        if not self.swallowed:
            self.swallowed.append(None)
            upstream.sendall(read_request(client))
            self.swallowed[0] = read_response(upstream, timeout=10)
            client.close()
            upstream.close()
            return
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=relay, args=(src, dst), daemon=True).start()

    def close(self) -> None:
        self.listener.close()


def read_request(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def relay(src: socket.socket, dst: socket.socket) -> None:
    """One direction of a relayed connection; each side's socket is closed by the thread
    reading it, once it has ended."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        src.close()


@pytest.mark.parametrize("kind", ["thread", "asyncio"])
def test_a_lost_answer_is_retried_and_the_event_stored_once(shared_server, token, kind):
    proxy, site, pairs = LosingProxy(shared_server.port), new_site(), []
    options = dict(on_sent=pairs.extend, max_retry_seconds=20, timeout=5)
    try:
        if kind == "thread":
            with Tracker(f"http://127.0.0.1:{proxy.port}", site, **options) as tracker:
                key = tracker.track(page="/once")
        else:
            async def main():
                async with AsyncTracker(f"http://127.0.0.1:{proxy.port}", site,
                                        **options) as tracker:
                    return tracker, tracker.track(page="/once")
            tracker, key = asyncio.run(main())
    finally:
        proxy.close()
    assert proxy.swallowed[0].status == 200  # the first attempt was stored
    assert (tracker.sent, tracker.failed, tracker.retries, tracker.requests) == (1, 0, 1, 2)
    [(sent_key, eid)] = pairs
    assert sent_key == key
    assert proxy.swallowed[0].text.split() == [eid]  # the original eid, answered again
    assert [e["eid"] for e in stored(shared_server, token, site)] == [eid]


def test_async_tracker_batches_flushes_and_closes(shared_server, token):
    site, pairs = new_site(), []

    async def main():
        async with AsyncTracker(url(shared_server), site, batch_size=500, flush_interval=30,
                                on_sent=pairs.extend) as tracker:
            for n in range(1200):
                tracker.track({"n": n}, sid="a1")
            assert await tracker.flush(timeout=20)
            assert (tracker.sent, tracker.requests) == (1200, 3)
            tracker.track(n=1200, sid="a1")
        assert tracker.sent == 1201 and tracker.pending == 0
        assert await tracker.aclose() and await tracker.aclose(timeout=0)  # idempotent
        with pytest.raises(RuntimeError):
            tracker.track(n=0)
    asyncio.run(main())
    events = stored(shared_server, token, site)
    assert [int(e["n"]) for e in events] == list(range(1201))
    assert [e["eid"] for e in events] == [eid for _, eid in pairs]
    assert {(e["sid"], e["uid"]) for e in events} == {("a1", "a1")}


def test_async_tracker_against_a_stopped_server_drops_and_gives_up_in_time(make_server):
    server = make_server()
    server.stop()
    errors = []

    async def main():
        tracker = AsyncTracker(url(server), new_site(), batch_size=5, max_queue=10,
                               max_retry_seconds=30, on_error=errors.append)
        keys = [tracker.track(n=n) for n in range(30)]
        assert keys[:10] == [k for k in keys if k is not None]  # the loop had no turn yet
        assert tracker.dropped == 20
        started = time.monotonic()
        assert await tracker.aclose(timeout=0.5) is False
        assert time.monotonic() - started < 3
        return tracker
    tracker = asyncio.run(main())
    assert (tracker.sent, tracker.failed) == (0, 10) and tracker.retries >= 1
    assert sum(len(e.keys) for e in errors) == 10
