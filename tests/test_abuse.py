"""Connection abuse: a thousand slowloris connections, thousands of idle keep-alive
connections, ten thousand requests pipelined on one connection. The server must keep serving
everyone else, close what its timeouts say, store nothing from half requests, and keep its
memory bounded. Loopback only; every loop is bounded in count and time.

test_http_protocol.py checks each timeout on one connection; here they hold at scale.
"""
from __future__ import annotations

import re
import resource
import selectors
import socket
import statistics
import threading
import time

import pytest
from conftest import Response, take_responses
from storecheck import log_events


@pytest.fixture(autouse=True)
def enough_descriptors():
    """Room for a few thousand sockets here and in the server (it inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 8000:
        pytest.skip(f"RLIMIT_NOFILE too low for thousands of sockets: {soft}/{hard}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_connections(server) -> int:
    text = server.get("/metrics").text
    return int(re.search(r"^otserver_connections (\d+)", text, re.M).group(1))


def stored(server) -> dict:
    """eid -> the event as logged, straight from LMDB."""
    return {entry.eid: entry for entry in log_events(server.data_dir)}


def close_all(socks) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- 4. slowloris

def test_a_thousand_slowloris_connections_neither_starve_clients_nor_outlive_the_timeout(
        make_server):
    # 4 s: long enough that 200 normal requests fit in it on a loaded CI machine
    server = make_server("--header-timeout", "4s")
    header_timeout = 4.0
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    got: dict[int, bytes] = {}
    try:
        for i in range(1000):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(f"GET /?si=slowloris&n={i}".encode())  # half a request line, then nothing
            opened[sock.fileno()] = time.monotonic()
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        all_open_at = time.monotonic()
        assert all_open_at - min(opened.values()) < header_timeout, "too slow to open 1,000"

        # Normal clients while they are all open: fresh connections, one event each.
        latencies, eids = [], []
        for i in range(200):
            started = time.perf_counter()
            resp = server.track(si="normal", sid=f"n{i % 7}", n=str(i))
            latencies.append(time.perf_counter() - started)
            assert resp.status == 200, resp
            eids.append(resp.text)
        normal_done = time.monotonic()
        connections = open_connections(server)
        median_ms = statistics.median(latencies) * 1000
        p99_ms = sorted(latencies)[int(len(latencies) * 0.99) - 1] * 1000
        print(f"1,000 slowloris open: 200 requests median {median_ms:.2f} ms, "
              f"p99 {p99_ms:.2f} ms, max {max(latencies) * 1000:.1f} ms; "
              f"{connections} connections open at the server")
        # not starved (a starved client waits for the header timeout, seconds): a bound a
        # loaded shared machine keeps; the latency itself is measured in bench/
        assert median_ms < 500, f"median latency {median_ms:.1f} ms with slowloris open"
        assert connections >= 1000, "the slowloris connections were not all open meanwhile"

        # Every slowloris connection is closed by the server within header timeout + 2 s.
        deadline = max(opened.values()) + header_timeout + 3
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except (ConnectionResetError, BlockingIOError) as exc:
                    if isinstance(exc, BlockingIOError):
                        continue
                    data = b""
                if data:
                    got[sock.fileno()] = got.get(sock.fileno(), b"") + data
                    continue
                closed[sock.fileno()] = time.monotonic()
                sel.unregister(sock)
    finally:
        sel.close()
        close_all(socks)
    assert len(closed) == 1000, f"{1000 - len(closed)} slowloris connections still open"
    lifetimes = [closed[fd] - opened[fd] for fd in closed]
    print(f"slowloris closed after {min(lifetimes):.2f}..{max(lifetimes):.2f} s "
          f"(header timeout {header_timeout} s); normal phase ended "
          f"{normal_done - all_open_at:.2f} s after the last opened")
    assert max(lifetimes) <= header_timeout + 2, max(lifetimes)
    assert min(lifetimes) >= header_timeout - 0.2, f"closed before its timeout: {min(lifetimes)}"
    assert not [d for d in got.values() if b" 200 " in d], "a half request was answered 200"
    # Nothing stored from them; everything from the normal clients.
    events = stored(server)
    assert set(events) == set(eids)
    assert all(value.si == "normal" for value in events.values())
    assert server.proc.poll() is None
    assert open_connections(server) <= 2
    assert server.stop() == 0


# ---------------------------------------------------------------------- 5. idle keep-alive

def test_thousands_of_idle_keep_alive_connections_are_closed_and_memory_stays_bounded(
        make_server):
    server = make_server("--keepalive", "4s")
    keepalive = 4.0
    count = 3000
    rss_start = rss_mb(server.proc.pid)
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    bufs: dict[int, bytes] = {}
    answered: dict[int, float] = {}
    answers: dict[int, Response] = {}
    closed: dict[int, float] = {}
    early: list[int] = []

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout=timeout):
            sock = key.fileobj
            fd = sock.fileno()
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed[fd] = time.monotonic()
                if fd not in answered:
                    early.append(fd)
                sel.unregister(sock)
                continue
            responses, bufs[fd] = take_responses(bufs.get(fd, b"") + data)
            for resp in responses:
                answered[fd] = time.monotonic()
                answers[fd] = resp

    side: dict = {}
    new_clients = None
    try:
        started = time.monotonic()
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(f"GET /?si=idle&sid=k{i % 50}&n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            socks.append(sock)
            if i % 100 == 99:
                pump(0)
        deadline = time.monotonic() + 30
        while len(answered) + len(early) < count and time.monotonic() < deadline:
            pump(0.1)
        all_answered = time.monotonic()
        assert len(answered) == count, f"{count - len(answered)} never answered ({len(early)} closed)"
        assert not early
        assert all(resp.status == 200 for resp in answers.values())

        # While they idle: new clients are served, and the server's memory is bounded.
        def newcomers() -> None:
            side["connections"] = open_connections(server)
            # Those idle for less than the keep-alive (all of them, unless a loaded machine
            # took seconds to open 3,000) must still be open.
            now = time.monotonic()
            side["young"] = sum(1 for at in answered.values() if now - at < keepalive - 0.5)
            side["rss"] = rss_mb(server.proc.pid)
            latencies, eids = [], []
            for i in range(50):
                t0 = time.perf_counter()
                resp = server.track(si="newcomer", n=str(i))
                latencies.append(time.perf_counter() - t0)
                if resp.status == 200:
                    eids.append(resp.text)
            side["latencies"], side["eids"] = latencies, eids

        new_clients = threading.Thread(target=newcomers)
        new_clients.start()
        deadline = all_answered + keepalive + 4
        while len(closed) < count and time.monotonic() < deadline:
            pump(0.1)
        new_clients.join(20)
    finally:
        sel.close()
        close_all(socks)
    assert not new_clients.is_alive()
    lifetimes = [closed[fd] - answered[fd] for fd in closed]
    median_ms = statistics.median(side["latencies"]) * 1000
    print(f"{count} keep-alive connections opened and answered in "
          f"{all_answered - started:.2f} s; {side['connections']} open at the server; RSS "
          f"{rss_start:.0f} MB at start, {side['rss']:.0f} MB with them idle; newcomers median "
          f"{median_ms:.2f} ms, max {max(side['latencies']) * 1000:.1f} ms; idle closed after "
          f"{min(lifetimes):.2f}..{max(lifetimes):.2f} s (keepalive {keepalive} s)")
    assert side["young"] > 0 and side["connections"] >= side["young"] * 0.95, \
        f"the idle connections were not kept open: {side}"
    assert len(side["eids"]) == 50, "a new client was not served while thousands idled"
    assert median_ms < 50
    assert side["rss"] < 300, f"RSS {side['rss']:.0f} MB with {count} idle connections"
    assert len(closed) == count, f"{count - len(closed)} idle connections still open"
    assert max(lifetimes) <= keepalive + 2, max(lifetimes)
    assert min(lifetimes) >= keepalive - 1.0, f"closed before the keep-alive: {min(lifetimes)}"
    events = stored(server)
    assert {resp.text for resp in answers.values()} | set(side["eids"]) == set(events)
    assert len(events) == count + 50
    assert open_connections(server) <= 2
    assert server.stop() == 0


# ---------------------------------------------------------------------- 6. pipelining

def test_ten_thousand_pipelined_requests_are_answered_in_order_with_bounded_memory(
        make_server):
    server = make_server()
    count = 10_000
    assert server.track(si="warm").status == 200
    rss_start = rss_mb(server.proc.pid)
    data = b"".join(f"GET /?si=pipe&sid=p{i % 10}&n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    for i in range(count))
    peak = [rss_start]
    done = threading.Event()
    send_error: list = []

    def sample() -> None:
        while not done.wait(0.05):
            try:
                peak[0] = max(peak[0], rss_mb(server.proc.pid))
            except (OSError, AssertionError):
                return

    responses: list[Response] = []
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)

    def send() -> None:
        try:
            sock.sendall(data)  # one call; the server pauses reading, so this blocks a while
        except OSError as exc:
            send_error.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    try:
        sampler.start()
        sender.start()
        buf = b""
        deadline = time.monotonic() + 60
        while len(responses) < count and time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 20)
            except socket.timeout:
                break
            if not chunk:
                break
            got, buf = take_responses(buf + chunk)
            responses += got
        elapsed = time.monotonic() - started
        sender.join(10)
    finally:
        done.set()
        sock.close()
        sampler.join(5)
    print(f"{count} pipelined: {len(responses)} answers in {elapsed:.2f} s; RSS {rss_start:.0f} MB "
          f"at start, peak {peak[0]:.0f} MB (+{peak[0] - rss_start:.0f} MB)")
    assert not send_error, send_error
    assert len(responses) == count, f"{len(responses)} answers of {count}"
    assert [r.status for r in responses] == [200] * count
    eids = [r.text for r in responses]
    assert len(set(eids)) == count
    events = stored(server)
    # In order: answer i carries the eid of the event stored from request i.
    assert [events[eid].props["n"] for eid in eids] == [str(i) for i in range(count)]
    assert len(events) == count + 1
    assert peak[0] - rss_start < 100, f"RSS grew {peak[0] - rss_start:.0f} MB"
    assert server.stop() == 0


# ---------------------------------------------------------------------- slow readers

def test_clients_that_pipeline_and_never_read_are_closed_and_do_not_starve_others(
        make_server):
    # The "slow read" attack: many connections pipeline thousands of requests and never read
    # an answer, so the server's answers pile up. Reading must pause (bounded memory), the
    # timeouts must still close those connections, and a normal client must keep being served.
    # 20 x 2,000 requests stay under --max-pending-events (50,000), so no normal client should
    # be answered 503 overloaded (more connections than that: see the xfail test below).
    server = make_server("--keepalive", "2s", "--header-timeout", "2s")
    CONNS = 20
    rss_start = rss_mb(server.proc.pid)
    data = b"".join(f"GET /?si=slowread&n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    for i in range(2000))
    stop = threading.Event()
    probes: list[tuple[float, int]] = []
    probe_eids: list[str] = []
    peak = [rss_start]

    def probe() -> None:
        while not stop.is_set() and len(probes) < 400:
            t0 = time.perf_counter()
            resp = server.track(si="probe")
            probes.append((time.perf_counter() - t0, resp.status))
            if resp.status == 200:
                probe_eids.append(resp.text)
            peak[0] = max(peak[0], rss_mb(server.proc.pid))
            time.sleep(0.05)

    socks: list[socket.socket] = []
    prober = threading.Thread(target=probe)
    sent = 0
    closed_after = None
    try:
        prober.start()
        flooded = time.monotonic()
        for _ in range(CONNS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
            sock.settimeout(5)
            sock.connect(("127.0.0.1", server.port))
            sock.setblocking(False)
            try:
                sent += sock.send(data)  # what the kernel takes; never a read
            except BlockingIOError:
                pass
            socks.append(sock)
        while time.monotonic() - flooded < 30:
            if open_connections(server) <= 2:  # the prober's and this one
                closed_after = time.monotonic() - flooded
                break
            time.sleep(0.2)
        time.sleep(0.3)  # a few probes after the flood is gone
    finally:
        stop.set()
        prober.join(20)
        close_all(socks)
    latencies = [t for t, _ in probes]
    statuses = {s for _, s in probes}
    print(f"slow readers: {sent / 1e6:.1f} MB pipelined on {CONNS} connections; closed by the "
          f"server after {closed_after} s; probes {len(probes)}, median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.0f} ms, "
          f"statuses {statuses}; RSS {rss_start:.0f} -> peak {peak[0]:.0f} MB")
    assert closed_after is not None, "connections that never read were never closed"
    assert closed_after < 30  # 2 s timeouts; a loaded CI machine drains 40,000 answers slowly
    assert sent > CONNS * 40_000, "the kernel took too little of the flood"
    assert statuses == {200}, statuses
    assert statistics.median(latencies) < 1.0  # not starved (bench/ measures latency)
    assert max(latencies) < 5, f"a normal client waited {max(latencies):.1f} s"
    assert peak[0] < 300, f"RSS {peak[0]:.0f} MB"
    events = stored(server)
    assert set(probe_eids) <= set(events)
    assert server.proc.poll() is None
    assert server.stop() == 0


def test_a_few_pipelining_connections_cannot_take_the_whole_pending_budget(make_server):
    import lmdb
    server = make_server("--max-pending-events", "1000")
    assert server.track(si="warm").status == 200
    data = b"".join(f"GET /?si=pipe&n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    for i in range(1000))
    env = lmdb.open(str(server.data_dir / "log"), max_dbs=32)
    txn = env.begin(write=True)  # a slow commit: the writer waits for this lock
    socks: list[socket.socket] = []
    victim: list = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(data)  # 45 KB each: taken by the kernel at once
            socks.append(sock)
        time.sleep(0.5)
        queued = int(re.search(r"^otserver_queue_events (\d+)", server.get("/metrics").text,
                               re.M).group(1))
        thread = threading.Thread(target=lambda: victim.append(server.track(si="victim")))
        thread.start()
        time.sleep(0.5)
        txn.abort()
        txn = None
        env.close()
        env = None
        thread.join(15)
        answers = []
        for sock in socks:
            buf = b""
            got: list[Response] = []
            deadline = time.monotonic() + 15
            while len(got) < 1000 and time.monotonic() < deadline:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                more, buf = take_responses(buf + chunk)
                got += more
            answers.append(got)
    finally:
        if txn is not None:
            txn.abort()
        if env is not None:
            env.close()
        close_all(socks)
    codes = [sorted({r.status for r in got}) for got in answers]
    print(f"queued while the writer waited: {queued}; victim: {victim}; pipelined answers "
          f"per connection: {[len(g) for g in answers]} with statuses {codes}")
    # 3 connections x 64 outstanding (twice that, for a read's slack) is far below 1000.
    assert queued <= 3 * 2 * 64, f"{queued} events queued from 3 connections"
    assert victim and victim[0].status == 200, victim
    assert all(len(got) == 1000 and all(r.status == 200 for r in got) for got in answers)
