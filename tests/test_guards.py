"""Who may send: registered sites, allowed origins, rate limits and quotas, over real sockets.

Every refusal is checked twice: the answer the client gets, and that the store holds exactly
the events that were answered 200 (nothing of a refused request).
"""
from __future__ import annotations

import http.client
import json
import re
import threading
import time
import tracemalloc
import weakref

import pytest

from otserver.guards import Buckets, parse_origin, parse_origins

from conftest import run_cli, wait_until

ALLOWED = "https://www.shop.example"


def metric(server, name: str) -> float:
    text = server.get("/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def site(server, *args) -> "subprocess.CompletedProcess":  # noqa: F821
    return run_cli("site", *args, "--data-dir", str(server.data_dir))


def registered(server, si: str, origin: str | None = None) -> None:
    """Wait until the running server has picked up a registration (it looks once a second):
    a probe site `si` answers 200 (with `origin`'s CORS answer when given). The probe's events
    are stored: tests account for them by their site."""
    headers = {"Origin": origin} if origin else {}

    def taken():
        resp = server.track(headers, si=si, ev="probe")
        return resp.status == 200 and (
            origin is None or resp.headers.get("access-control-allow-origin") == origin)
    wait_until(taken, timeout=10, interval=0.1)


def stored_sites(server) -> list[str]:
    """The si of every event in the store, in log order."""
    from otserver.model import LogEntry
    from otserver.store import Store
    store = Store(str(server.data_dir), readonly=True)
    try:
        with store.log.read() as txn:
            return [LogEntry(position, raw).si for position, raw in store.log.scan(txn, 1)]
    finally:
        store.close()


# ---------------------------------------------------------------------- registered sites

def test_require_site_refuses_unregistered_sites_and_stores_nothing(make_server):
    server = make_server("--require-site")
    for resp in (server.track(si="stranger.example", ev="a"),
                 server.post("/", "si=stranger.example&ev=b"),
                 server.get("/pixel.gif?si=stranger.example"),
                 server.post("/batch", "si=stranger.example\nsi=other.example\n")):
        assert resp.status == 403, resp
        assert '"stranger.example" is not registered' in resp.text
        assert "otserver site add" in resp.text
        assert resp.headers["access-control-allow-origin"] == "*"  # a page can read why
    assert server.event_ids() == []
    assert metric(server, 'otserver_guard_refusals_total{guard="unregistered_site"}') == 4

    out = site(server, "add", "shop.example")
    assert out.returncode == 0, out.stderr
    assert "registered" in out.stderr
    registered(server, "shop.example")
    assert server.track(si="shop.example", ev="page").status == 200
    # A batch is taken whole or not at all: one unregistered line refuses every line.
    refused = metric(server, 'otserver_guard_refusals_total{guard="unregistered_site"}')
    resp = server.post("/batch", "si=shop.example&ev=1\nsi=stranger.example&ev=2\n")
    assert resp.status == 403 and '"stranger.example"' in resp.text
    assert set(stored_sites(server)) == {"shop.example"}
    before = len(server.event_ids())
    assert metric(server, 'otserver_guard_refusals_total{guard="unregistered_site"}') == \
        refused + 1

    assert site(server, "remove", "shop.example").returncode == 0
    probes = []
    wait_until(lambda: probes.append(server.track(si="shop.example").status) or probes[-1] == 403,
               timeout=10, interval=0.1)
    assert len(server.event_ids()) == before + probes.count(200)  # until the removal was seen
    out = site(server, "remove", "shop.example")
    assert out.returncode == 1 and "no registered site" in out.stderr


def test_without_require_site_every_site_is_taken(server):
    """The quick start keeps the seed's examples working: no registration needed."""
    resp = server.track(si="test.opentracker.net", ev="seed")
    assert resp.status == 200
    assert server.event_ids() == [resp.text]


def test_site_add_list_and_origins_are_normalised(tmp_path, make_server):
    server = make_server()
    out = site(server, "add", "a.example", "--origins",
               "https://WWW.A.example:443/, http://localhost:8080,https://*.cdn.example")
    assert out.returncode == 0, out.stderr
    out = site(server, "add", "b.example")
    assert out.returncode == 0
    out = site(server, "list", "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["si"], r["origins"]) for r in rows] == [
        ("a.example", ["https://www.a.example", "http://localhost:8080", "https://*.cdn.example"]),
        ("b.example", [])]
    text = site(server, "list").stdout
    assert "a.example" in text and "origins *" in text  # b.example takes any origin
    # add again: keeps origins unless given; "" clears them
    created = rows[0]["created"]
    assert site(server, "add", "a.example").returncode == 0
    again = json.loads(site(server, "list", "--json").stdout.splitlines()[0])
    assert again["origins"] == rows[0]["origins"] and again["created"] == created
    assert "updated" in site(server, "add", "a.example", "--origins", "").stderr
    assert json.loads(site(server, "list", "--json").stdout.splitlines()[0])["origins"] == []
    for bad in ("www.a.example", "ftp://a.example", "https://a.example/path",
                "https://a.example:99999", "https://*.[::1]"):
        out = site(server, "add", "c.example", "--origins", bad)
        assert out.returncode != 0 and "not an origin" in out.stderr, (bad, out.stderr)
    assert site(server, "add", "x" * 300).returncode != 0
    assert "c.example" not in site(server, "list").stdout


def test_site_needs_an_existing_store(tmp_path):
    out = run_cli("site", "list", "--data-dir", str(tmp_path / "nothing"))
    assert out.returncode != 0 and "holds no otserver store" in out.stderr


@pytest.mark.parametrize("text, expected", [
    ("https://Shop.Example", "https://shop.example"),
    ("http://shop.example:80", "http://shop.example"),
    ("https://shop.example:8443/", "https://shop.example:8443"),
    ("https://*.shop.example", "https://*.shop.example"),
    ("http://[::1]:8080", "http://[::1]:8080"),
])
def test_parse_origin(text, expected):
    assert parse_origin(text) == expected


def test_parse_origins_keeps_each_once():
    assert parse_origins("https://a.example, https://A.example:443,,") == ["https://a.example"]


# ---------------------------------------------------------------------- origins

def test_allowed_origins(make_server):
    server = make_server("--require-site")
    assert site(server, "add", "shop.example", "--origins",
                f"{ALLOWED},https://*.cdn.example").returncode == 0
    assert site(server, "add", "open.example").returncode == 0
    registered(server, "shop.example", ALLOWED)
    registered(server, "open.example")
    probes = len(server.event_ids())

    answered = []
    for origin in (ALLOWED, "https://eu.cdn.example", "https://a.b.cdn.example"):
        resp = server.track({"Origin": origin}, si="shop.example", ev="ok")
        assert resp.status == 200, resp
        assert resp.headers["access-control-allow-origin"] == origin
        assert resp.headers["vary"] == "Origin"
        answered.append(resp.text)
    resp = server.post("/batch", "si=shop.example&ev=1\nsi=open.example&ev=2\n",
                       headers={"Origin": ALLOWED})
    assert resp.status == 200 and resp.headers["access-control-allow-origin"] == ALLOWED
    answered += resp.text.split()
    # No Origin (a server, curl, the pixel): unaffected, the usual answer.
    resp = server.track(si="shop.example", ev="server-side")
    assert resp.status == 200 and resp.headers["access-control-allow-origin"] == "*"
    answered.append(resp.text)
    # A site registered without origins takes any.
    resp = server.track({"Origin": "https://anywhere.example"}, si="open.example")
    assert resp.status == 200 and resp.headers["access-control-allow-origin"] == "*"
    answered.append(resp.text)

    refused = ("https://evil.example", "http://www.shop.example", "https://www.shop.example:8443",
               "https://cdn.example", "https://evil-cdn.example", "null")
    for origin in refused:
        for resp in (server.track({"Origin": origin}, si="shop.example", ev="refused"),
                     server.post("/", "si=shop.example&ev=refused", headers={"Origin": origin}),
                     server.post("/batch", "si=open.example\nsi=shop.example\n",
                                 headers={"Origin": origin})):
            assert resp.status == 403, (origin, resp)
            assert f'origin "{origin}" may not send events for site "shop.example"' in resp.text
    assert server.event_ids()[probes:] == answered
    assert metric(server, 'otserver_guard_refusals_total{guard="origin"}') == 3 * len(refused)


def test_preflight_answers_as_the_site_will(make_server):
    server = make_server()
    assert site(server, "add", "shop.example", "--origins", ALLOWED).returncode == 0
    registered(server, "shop.example", ALLOWED)
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "idempotency-key"}
    resp = server.request("OPTIONS", "/?si=shop.example", headers={"Origin": ALLOWED, **ask})
    assert resp.status == 204
    assert resp.headers["access-control-allow-origin"] == ALLOWED
    assert "Idempotency-Key" in resp.headers["access-control-allow-headers"]
    resp = server.request("OPTIONS", "/?si=shop.example",
                          headers={"Origin": "https://evil.example", **ask})
    assert resp.status == 403
    # A preflight that names no site cannot be judged: the POST it precedes is.
    resp = server.request("OPTIONS", "/", headers={"Origin": "https://evil.example", **ask})
    assert resp.status == 204 and resp.headers["access-control-allow-origin"] == "*"


# ---------------------------------------------------------------------- rate limits

class Client:
    """One keep-alive connection sending as one client address (X-Forwarded-For, believed
    from 127.0.0.1 with --trusted-proxies)."""

    def __init__(self, server, address: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        weakref.finalize(self, self.conn.close)
        self.address = address
        self.answers: list[tuple[int, str, dict]] = []

    def send(self, target: str, method: str = "GET", body: str | None = None) -> int:
        headers = {"X-Forwarded-For": self.address}
        if body is not None:
            headers["Content-Type"] = "text/plain"
        self.conn.request(method, target, body=body, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read().decode()
        self.answers.append((resp.status, text, {k.lower(): v for k, v in resp.getheaders()}))
        return resp.status

    def eids(self) -> list[str]:
        return [eid for status, text, _ in self.answers if status == 200 for eid in text.split()]


def test_per_ip_limit_holds_a_flood_while_another_client_keeps_its_rate(make_server):
    rate, burst = 20, 20
    server = make_server("--trusted-proxies", "127.0.0.1", "--rate-limit-per-ip", str(rate),
                         "--rate-limit-per-ip-burst", str(burst))
    flood, polite = Client(server, "203.0.113.7"), Client(server, "198.51.100.9")
    stop = time.monotonic() + 2.0
    started = time.monotonic()

    def flooding():
        while time.monotonic() < stop:
            flood.send("/?si=flood.example&ev=f")
    thread = threading.Thread(target=flooding)
    thread.start()
    while time.monotonic() < stop:  # 10 a second: under its limit, never refused
        polite.send("/?si=polite.example&ev=p")
        time.sleep(0.1)
    thread.join()
    elapsed = time.monotonic() - started

    polite_status = [status for status, _, _ in polite.answers]
    assert polite_status and set(polite_status) == {200}, polite_status
    statuses = [status for status, _, _ in flood.answers]
    admitted = statuses.count(200)
    assert statuses.count(429) > 100, "the flood was not refused"
    assert set(statuses) == {200, 429}
    assert burst <= admitted <= burst + rate * elapsed + 2, (admitted, elapsed)
    refusal = next((text, headers) for status, text, headers in flood.answers if status == 429)
    assert "too many events from this address" in refusal[0]
    assert int(refusal[1]["retry-after"]) >= 1
    # Stored: exactly what was answered 200, nothing of a refusal.
    assert server.event_ids() == sorted(flood.eids() + polite.eids(),
                                        key=server.event_ids().index)
    assert len(server.event_ids()) == admitted + len(polite_status)
    assert metric(server, 'otserver_guard_refusals_total{guard="rate_limit_ip"}') == \
        statuses.count(429)
    assert metric(server, 'otserver_requests_total{endpoint="/",status="429"}') == \
        statuses.count(429)


def test_a_batch_pays_for_every_event(make_server):
    """A batch bigger than the burst passes once, and its debt holds the client back."""
    server = make_server("--rate-limit-per-ip", "10", "--rate-limit-per-ip-burst", "5")
    client = Client(server, "ignored: no trusted proxies")
    body = "".join(f"si=batch.example&n={n}\n" for n in range(50))
    assert client.send("/batch", "POST", body) == 200
    assert client.send("/?si=batch.example") == 429
    status, text, headers = client.answers[-1]
    assert int(headers["retry-after"]) >= 4  # 45 events of debt at 10 a second
    assert len(server.event_ids()) == 50


def test_per_site_limit_leaves_other_sites_alone(make_server):
    server = make_server("--rate-limit-per-site", "5", "--rate-limit-per-site-burst", "10")
    client = Client(server, "-")
    for _ in range(30):
        client.send("/?si=busy.example")
    statuses = [status for status, _, _ in client.answers]
    assert statuses[:10] == [200] * 10 and statuses.count(429) >= 15, statuses
    assert 'too many events for site "busy.example"' in \
        next(text for status, text, _ in client.answers if status == 429)
    assert client.send("/?si=calm.example") == 200
    # A batch touching the busy site is refused whole.
    assert client.send("/batch", "POST", "si=calm.example\nsi=busy.example\n") == 429
    assert len(server.event_ids()) == statuses.count(200) + 1
    assert sorted(client.eids()) == sorted(server.event_ids())
    assert metric(server, 'otserver_guard_refusals_total{guard="rate_limit_site"}') == \
        statuses.count(429) + 1


def test_limiter_memory_is_bounded_over_sockets(make_server):
    server = make_server("--trusted-proxies", "127.0.0.1", "--rate-limit-per-ip", "1000",
                         "--rate-limit-clients", "500")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    weakref.finalize(conn, conn.close)
    for n in range(3000):
        conn.request("GET", f"/?si=many.example&n={n}",
                     headers={"X-Forwarded-For": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    wait_until(lambda: metric(server, "otserver_rate_limit_clients") > 0)
    clients = metric(server, "otserver_rate_limit_clients")
    assert 500 - 500 // 8 <= clients <= 500
    assert metric(server, "otserver_rate_limit_clients_dropped_total") == 3000 - clients
    assert len(server.event_ids()) == 3000


def test_buckets_stay_within_capacity_under_100000_addresses():
    buckets = Buckets(rate=10, burst=100, capacity=10_000)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        now = 1000.0
        for n in range(100_000):
            assert buckets.take(f"2001:db8::{n:x}", 1, now) == 0
            now += 0.0001
            if n % 1000 == 0:  # one old address that keeps sending is never forgotten
                assert buckets.take("198.51.100.1", 1, now) == 0
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 10_000 - 10_000 // 8 <= len(buckets) <= 10_000
    assert buckets.dropped + len(buckets) == 100_001
    assert held - base < 10_000 * 400, held - base  # bytes per remembered address
    # The least recently seen went first: the newest and the busy old one are still known.
    for kept in ("2001:db8::1869f", "198.51.100.1"):
        assert buckets.take(kept, 500, now) == 0
        assert buckets.take(kept, 1, now) > 0  # in debt: remembered, not a fresh bucket
    assert buckets.take("2001:db8::0", 1, now) == 0  # forgotten: a fresh full bucket


def test_buckets_hold_the_rate_on_average():
    buckets = Buckets(rate=5, burst=10, capacity=10)
    admitted, now = 0, 0.0
    for _ in range(10_000):  # 100 tries a second for 100 s
        if buckets.take("a", 1, now) == 0:
            admitted += 1
        now += 0.01
    assert 10 + 5 * 100 - 1 <= admitted <= 10 + 5 * 100 + 1
    # seen again after a long pause: a full burst, not more
    now += 3600
    assert sum(1 for _ in range(20) if buckets.take("a", 1, now) == 0) == 10
    # a batch pays for every event: 40 events of debt hold it back 8 s at 5 a second
    now += 3600
    assert buckets.take("a", 1, now) == 0
    buckets.charge("a", 49)
    assert buckets.take("a", 1, now) == pytest.approx(41 / 5)  # from -40 to one token


# ---------------------------------------------------------------------- quotas

def test_quota_per_site(make_server):
    server = make_server("--max-events-per-site", "20")
    client = Client(server, "-")
    assert client.send("/batch", "POST", "si=big.example\n" * 15) == 200
    # A batch that would pass the quota is refused whole.
    assert client.send("/batch", "POST", "si=big.example\n" * 6) == 429
    status, text, headers = client.answers[-1]
    assert 'site "big.example" is at its quota of 20 events held (--max-events-per-site)' in text
    assert int(headers["retry-after"]) >= 1
    for _ in range(5):
        assert client.send("/?si=big.example") == 200
    assert client.send("/?si=big.example") == 429
    assert client.send("/?si=small.example") == 200  # the others go on
    assert len(server.event_ids()) == 21
    assert sorted(client.eids()) == sorted(server.event_ids())
    assert metric(server, 'otserver_guard_refusals_total{guard="quota"}') == 2


def test_quota_counts_what_the_store_holds_after_a_restart(make_server, tmp_path):
    server = make_server("--max-events-per-site", "10")
    assert server.post("/batch", "si=q.example\n" * 10).status == 200
    assert server.stop() == 0
    server.start()
    resp = server.track(si="q.example")
    assert resp.status == 429 and "quota of 10" in resp.text
    assert len(server.event_ids()) == 10
