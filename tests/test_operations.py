"""Operations: sd_notify and the watchdog, graceful drain, --workers, TLS, /readyz, /metrics,
logging. Real processes, real sockets; a fake NOTIFY_SOCKET is a datagram socket we bind."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import lmdb
import pytest
from conftest import read_response, wait_until


@pytest.fixture
def notify(tmp_path):
    """A fake service manager: the datagram socket NOTIFY_SOCKET names."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def receive(sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram that arrives within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096).decode())
        except socket.timeout:
            continue
    return out


def test_ready_watchdog_and_stopping_reach_the_service_manager(make_server, tmp_path, notify):
    sock = notify
    server = make_server(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                              "WATCHDOG_USEC": "400000"})
    messages = receive(sock, 1.5)
    assert any(m.startswith("READY=1") and "STATUS=listening on" in m for m in messages), messages
    pings = [m for m in messages if m == "WATCHDOG=1"]
    assert len(pings) >= 3, messages  # every 0.2 s
    assert any(m.startswith("STATUS=") and "events stored" in m for m in messages)
    assert server.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in receive(sock, 0.5) + messages)


def test_a_wedged_writer_stops_the_watchdog_pings(make_server, tmp_path, notify):
    sock = notify
    server = make_server("--writer-stall", "1s",
                         env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                              "WATCHDOG_USEC": "400000"})
    assert server.get("/readyz").status == 200
    receive(sock, 0.5)
    # Wedge the writer for real: hold LMDB's write lock from this process, then send an event
    # whose commit must wait for it.
    env = lmdb.open(str(server.data_dir / "log"), max_dbs=32)
    txn = env.begin(write=True)
    answers = []
    sender = threading.Thread(target=lambda: answers.append(server.track(si="s", sid="w")))
    try:
        sender.start()
        time.sleep(1.5)
        receive(sock, 0.3)  # what was sent before the stall passed --writer-stall
        wedged = receive(sock, 1.5)
        assert "WATCHDOG=1" not in wedged, wedged
        assert any("not pinging the watchdog" in m for m in wedged), wedged
        ready = server.get("/readyz")
        assert ready.status == 503 and "no commit has finished" in ready.text
        assert server.get("/healthz").status == 200  # the process itself still answers
    finally:
        txn.abort()
        env.close()
    sender.join(10)
    assert answers and answers[0].status == 200
    assert "WATCHDOG=1" in receive(sock, 1.0)
    assert server.get("/readyz").status == 200


def hammer(port: int, acked: list, stop: threading.Event) -> None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return
    with sock:
        while not stop.is_set():
            try:
                sock.sendall(b"GET /?si=drain&sid=d HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = read_response(sock)
            except (OSError, ConnectionError):
                return
            if resp.status != 200:
                return
            acked.append(resp.text)
            if resp.headers.get("connection") == "close":
                return


def test_sigterm_under_load_drains_loses_nothing_and_exits_0(make_server):
    server = make_server()
    acked: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=hammer, args=(server.port, acked, stop)) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: len(acked) > 50)  # under load: a fixed 0.5 s got 10 on a busy host
    assert server.stop() == 0
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) > 50
    assert "otserver stopped:" in server.log()
    server.start()
    stored = set(server.event_ids())
    assert set(acked) <= stored


def test_two_workers_serve_one_port_replace_a_killed_worker_and_add_up_metrics(make_server):
    server = make_server("--workers", "2")
    log = server.log()
    pids = [int(p) for p in re.findall(r"worker \d started \(pid (\d+)\)", log)]
    assert len(pids) == 2
    for i in range(40):  # fresh connections: the kernel spreads them over both workers
        assert server.track(si="w", sid=f"s{i}").status == 200
    def counted_40() -> str | None:  # each worker writes its snapshot once a second
        text = server.get("/metrics").text
        match = re.search(r'otserver_requests_total\{endpoint="/",status="200"\} (\d+)', text)
        return text if match and int(match.group(1)) == 40 else None
    text = wait_until(counted_40, timeout=5)
    assert re.search(r"^otserver_events_stored_total 40$", text, re.M), text
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "replacing it" not in server.log():
        time.sleep(0.1)
    assert f"(pid {pids[0]}) exited with -9; replacing it" in server.log()
    started = r"worker \d started \(pid (\d+)\)"
    while time.monotonic() < deadline and len(re.findall(started, server.log())) < 3:
        time.sleep(0.1)  # the replacement logs its start just after the line above
    assert len(re.findall(started, server.log())) == 3
    for i in range(20):
        assert server.track(si="w", sid=f"again{i}").status == 200
    assert server.counts()["events"] == 60
    assert server.stop() == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a cert")
def test_https_with_a_self_signed_certificate(make_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    server = make_server("--tls-cert", str(cert), "--tls-key", str(key))
    assert "listening on https://" in server.log()
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /?si=tls&sid=t HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = read_response(tls)
    assert resp.status == 200
    assert server.event_ids() == [resp.text]
    # Plain HTTP on the TLS port is not served.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        raw.sendall(b"GET /?si=tls HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            data = raw.recv(100)
        except ConnectionError:
            data = b""
    assert not data.startswith(b"HTTP/1.1 200")
    assert server.counts()["events"] == 1


def test_a_tls_handshake_on_the_plain_port_is_refused(server):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            context.wrap_socket(raw)
    assert server.counts()["events"] == 0


def test_metrics_readyz_and_refusal_counts(server):
    assert server.get("/readyz").status == 200
    server.track(si="m", sid="x")
    server.get("/?nosite=1")
    server.get("/nowhere")
    text = server.get("/metrics").text
    assert 'otserver_requests_total{endpoint="/",status="200"} 1' in text
    assert 'otserver_requests_total{endpoint="/",status="400"} 1' in text
    assert 'otserver_refusals_total{reason="bad_request"} 1' in text
    assert 'otserver_refusals_total{reason="not_found"} 1' in text
    assert re.search(r'^otserver_commit_events_bucket\{le="\+Inf"\} [1-9]', text, re.M)
    assert re.search(r'^otserver_store_file_bytes\{env="log"\} [1-9]', text, re.M)
    assert re.search(r'^otserver_store_file_bytes\{env="views"\} [1-9]', text, re.M)
    assert "otserver_folder_up 1" in text
    assert re.search(r"^otserver_view_lag_events [01]$", text, re.M), text
    deadline = time.monotonic() + 5  # the folder gathers for up to --fold-delay, then folds
    while "otserver_view_lag_events 0" not in text and time.monotonic() < deadline:
        time.sleep(0.05)
        text = server.get("/metrics").text
    assert "otserver_view_lag_events 0" in text
    assert "otserver_queue_events 0" in text


def test_access_log_escapes_request_data(make_server):
    server = make_server("--access-log")
    server.raw(b'GET /x"y%0a\\ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n')
    server.track(si="a", sid="b")
    wait_until(lambda: server.log().count(" access ") >= 2)
    lines = [line for line in server.log().splitlines() if " access " in line]
    # client as stored (anonymised), method, path (escaped), status, bytes, duration
    assert any(re.search(r' access 127\.0\.0\.0 GET /x"y%0a\\x5c 404 \d+ \d+\.\d\dms$', line)
               for line in lines), lines
    assert any(re.search(r" access 127\.0\.0\.0 GET / 200 294 \d+\.\d\dms$", line)
               for line in lines), lines
