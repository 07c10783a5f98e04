"""Durability and sharing: an acknowledged event survives kill -9; two processes writing one
environment keep every session and user fold exact."""
from __future__ import annotations

import socket
import threading
import time

from conftest import read_response
from storecheck import check_consistent, wait_caught_up

from otserver.model import eid_to_key


def _hammer(port: int, count: int, acked: list, stop: threading.Event, sid: str | None = None):
    """Send up to `count` events on one keep-alive connection; record every eid answered 200."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    with sock:
        for i in range(count):
            if stop.is_set():
                return
            target = f"/?si=durable&n={i}" + (f"&sid={sid}" if sid else "")
            try:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                resp = read_response(sock)
            except (OSError, ConnectionError):
                return
            if resp.status == 200:
                acked.append(resp.text)


def _check_consistent(data_dir) -> None:
    """Every stored event has its session and user, and each session counts its events."""
    wait_caught_up(data_dir)
    check_consistent(data_dir, site="durable")


def test_acknowledged_events_survive_kill_9(make_server):
    server = make_server()
    data_dir = server.data_dir
    for round_ in range(3):
        acked: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_hammer, args=(server.port, 5000, acked, stop))
                   for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10  # mid-load: past 50 answers (polled: CI may be slow)
        while len(acked) <= 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()
        stop.set()
        for t in threads:
            t.join(10)
        assert len(acked) > 50, f"round {round_}: too little load before the kill ({len(acked)})"
        server.start()  # same data directory
        stored = set(server.event_ids())
        lost = [eid for eid in acked if eid not in stored]
        assert not lost, f"round {round_}: {len(lost)} acknowledged events lost, e.g. {lost[:3]}"
        _check_consistent(data_dir)


def test_two_processes_share_one_store_and_keep_folds_exact(make_server):
    first = make_server()
    second = make_server(data_dir=first.data_dir)
    acked: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_hammer, args=(port, 300, acked, stop, "shared-session"))
               for port in (first.port, second.port) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(acked) == 6 * 300
    token = first.create_token("durable")
    body = first.api("/api/v1/sessions/shared-session?si=durable&limit=1", token).json()
    assert body["event_count"] == 6 * 300
    user = second.api("/api/v1/users/shared-session?si=durable", token).json()
    assert user["event_count"] == 6 * 300
    assert len(user["sessions"]) == 1
    # The session's last eid is one of the acknowledged ones: the folds ran in log order.
    assert set(first.event_ids()) == set(acked)
    assert body["session"]["eid"] in acked
    _check_consistent(first.data_dir)
    assert eid_to_key(body["session"]["eid"]) is not None
