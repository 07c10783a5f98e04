"""Fixtures: a real otserver process on a loopback port the OS picks, over a real LMDB store in
a temporary directory, and small clients (http.client and raw sockets) to talk to it."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from otserver.store import Store

_LISTENING = re.compile(r"listening on https?://[^:]+:(\d+)")


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class RunningServer:
    """One `otserver serve` process. Talk to it with get/post/raw; read its store with `counts`."""

    def __init__(self, data_dir: Path, extra_args=(), env=None):
        self.data_dir = Path(data_dir)
        self.extra_args = list(extra_args)
        self.env = env
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    # ------------------------------------------------------------------ process

    def start(self, timeout: float = 15.0) -> "RunningServer":
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        start_at = log.tell()
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otserver", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data-dir", str(self.data_dir), *self.extra_args],
            stdout=log, stderr=log, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[start_at:].decode(errors="replace")
            match = _LISTENING.search(text)
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"otserver exited {self.proc.returncode}:\n{text}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("otserver did not start listening in time")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain) and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL, the crash: nothing gets to run."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------------ clients

    def request(self, method: str, target: str, body: bytes | str | None = None,
                headers: dict | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()},
                            resp.read())
        finally:
            conn.close()

    def get(self, target: str, headers: dict | None = None) -> Response:
        return self.request("GET", target, headers=headers)

    def track(self, headers: dict | None = None, **props) -> Response:
        """GET /?props..., properties url-encoded in the order given."""
        return self.get("/?" + urlencode(props, quote_via=quote), headers=headers)

    def post(self, target: str, body, headers: dict | None = None) -> Response:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return self.request("POST", target, body=body, headers=headers)

    def raw(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send bytes on a fresh connection, then read until the server closes (or timeout)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return read_until_close(sock, timeout)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    # ------------------------------------------------------------------ read API

    def create_token(self, site: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "otserver", "token", "create", site,
             "--data-dir", str(self.data_dir)],
            check=True, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    def api(self, path: str, token: str | None) -> Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return self.get(path, headers=headers)

    # ------------------------------------------------------------------ the store itself

    def counts(self) -> dict:
        """What the store holds, read straight from LMDB: events in the log; sessions, users
        and sites in the views."""
        store = Store(str(self.data_dir), readonly=True)
        try:
            return store.counts()
        finally:
            store.close()

    def event_ids(self) -> list[str]:
        """Every eid in the log, in log order."""
        store = Store(str(self.data_dir), readonly=True)
        try:
            return store.event_ids()
        finally:
            store.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout`:
    instead of sleeping for a time that is too long on a fast machine, too short on a slow one."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout} s: {predicate}")
        time.sleep(interval)


def run_cli(*args, timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`otserver ARGS...` as a user runs it: its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "otserver", *args], capture_output=True,
                          text=True, timeout=timeout, input=stdin)


def read_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket, timeout: float = 5.0) -> Response:
    """Read one HTTP response (Content-Length framed) from a socket; for pipelined responses
    read everything and use parse_responses instead."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return _finish_response(sock, head, rest)


def parse_head(head: bytes) -> tuple[int, dict]:
    """A response head -> (status, headers with lower-case names)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def _finish_response(sock, head: bytes, rest: bytes) -> Response:
    status, headers = parse_head(head)
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Response(status, headers, rest[:length])


def take_responses(buf: bytes) -> tuple[list[Response], bytes]:
    """The complete (Content-Length framed) responses at the start of buf, and the rest."""
    out = []
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            return out, buf
        status, headers = parse_head(head)
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return out, buf
        out.append(Response(status, headers, rest[:length]))
        buf = rest[length:]


def parse_responses(data: bytes) -> list[Response]:
    """Split bytes read from a connection into the responses they hold (a last one cut short
    keeps the body bytes that arrived)."""
    out, rest = take_responses(data)
    head, sep, body = rest.partition(b"\r\n\r\n")
    if sep:
        status, headers = parse_head(head)
        out.append(Response(status, headers, body))
    return out


class SseReader:
    """A raw-socket Server-Sent Events client of /api/v1/live: the request is sent and the
    answer's head read at once (status, headers); then frames are read as they come."""

    def __init__(self, server, si: str, token: str | None, *, last_id: str | None = None,
                 rcvbuf: int | None = None, timeout: float = 5.0):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", server.port))
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        resume = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        sock.sendall(f"GET /api/v1/live?si={quote(si, safe='')} HTTP/1.1\r\nHost: t\r\n"
                     f"{auth}{resume}\r\n".encode())
        self.sock = sock
        self.buf = b""
        self.status, self.headers = parse_head(self._until(b"\r\n\r\n", timeout))

    def _until(self, sep: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while sep not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {sep!r} in time; have {self.buf[:300]!r}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"stream closed; have {self.buf[:300]!r}")
            self.buf += chunk
        part, _, self.buf = self.buf.partition(sep)
        return part

    def frame(self, timeout: float = 5.0) -> list[str]:
        """The lines of the next frame (comments included)."""
        return self._until(b"\n\n", timeout).decode().split("\n")

    def close(self) -> None:
        self.sock.close()


def assert_json_error(resp, status: int) -> str:
    """A read-API refusal: the status, a JSON {"error": "..."} body, no CORS header."""
    assert resp.status == status, resp
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    payload = resp.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    assert "access-control-allow-origin" not in resp.headers
    return payload["error"]


@pytest.fixture
def make_server(tmp_path):
    """Factory: make_server(*extra_flags, env=...) -> a started RunningServer; all stopped after."""
    started: list[RunningServer] = []

    def factory(*extra_args, env=None, data_dir=None, start=True) -> RunningServer:
        server = RunningServer(data_dir or tmp_path / f"otdata{len(started)}", extra_args, env)
        started.append(server)
        return server.start() if start else server

    yield factory
    for server in started:
        server.kill()


@pytest.fixture
def server(make_server) -> RunningServer:
    return make_server()


class FreshView:
    """A server shared by a module's tests, seen by one test as if it were new: `event_ids`
    and `counts()["events"]` hold only what was stored after the test began. (A sentinel
    event, awaited, marks the start: whatever earlier tests submitted is committed before it.)
    Everything else is the shared server's own."""

    def __init__(self, server: RunningServer):
        self._server = server
        assert server.proc.poll() is None, "the shared server died in an earlier test"
        assert server.track(si="fresh-view.sentinel").status == 200
        deadline = time.monotonic() + 10
        while True:  # until the views have folded the sentinel too
            store = Store(str(server.data_dir), readonly=True)
            try:
                folded = store.views.watermark() >= store.log.last_position()
                self._before_ids = len(store.event_ids())
                self._before = store.counts()
            finally:
                store.close()
            if folded or time.monotonic() > deadline:
                break
            time.sleep(0.005)

    def __getattr__(self, name):
        return getattr(self._server, name)

    def event_ids(self) -> list[str]:
        return self._server.event_ids()[self._before_ids:]

    def counts(self) -> dict:
        return {key: value - self._before.get(key, 0)
                for key, value in self._server.counts().items()}


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for a module's read-only or additive tests (faster than one per test)."""
    # Folds at once (no 50 ms gather): FreshView waits for each test's first fold.
    server = RunningServer(tmp_path_factory.mktemp("shared") / "otdata",
                           ["--fold-delay", "1ms"]).start()
    yield server
    server.kill()
