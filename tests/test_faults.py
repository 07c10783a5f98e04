"""Faults: workers killed by SIGKILL under load, a full disk, stale LMDB reader slots.

Extends test_durability.py (kill -9 of a single process, two processes sharing a store) and
test_operations.py (one idle worker killed and replaced): here workers die *under load*,
repeatedly, the filesystem under the store runs out of space (not the map cap), a process
killed inside a read transaction leaves a reader slot that would pin old pages forever, and
the writer stalls for longer than the header timeout under a pipelining client.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode

import lmdb
import pytest
from conftest import parse_responses, read_response, wait_until
from storecheck import check_consistent, log_events, wait_caught_up

SITE = "faults"
_WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


# ---------------------------------------------------------------------- helpers

def _check_consistent(data_dir, site: str = SITE) -> dict:
    """Every stored event has its session and user; each session and user record counts its
    events exactly; a session's event list has each event once, in log order; a user's list
    of sessions is exactly the sessions its events are in. Returns the stored events."""
    wait_caught_up(data_dir)
    return check_consistent(data_dir, site=site)


def _pid_is_ours(pid: int, marker: str) -> bool:
    """The pid still runs a process whose command line names `marker` (our data dir): never
    signal a pid the kernel has since given to someone else."""
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _kill_leftovers(pids, marker: str) -> list[int]:
    left = []
    for pid in pids:
        if _pid_is_ours(pid, marker):
            left.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return left


def _stale_readers(path) -> list[int]:
    """Pids in the environment's reader table that no longer run. Only meaningful while some
    other process has the environment open: the first process to open an environment nobody
    has open re-initialises its lock file, reader table included."""
    env = lmdb.open(str(path), readonly=True, max_dbs=32)
    try:
        text = env.readers()
    finally:
        env.close()
    pids = [int(line.split()[0]) for line in text.splitlines()[1:] if line.split()]
    return [pid for pid in pids if not os.path.exists(f"/proc/{pid}")]


def _reader_check(path) -> int:
    env = lmdb.open(str(path), readonly=True, max_dbs=32)
    try:
        return env.reader_check()
    finally:
        env.close()


_HOLDER = """
import sys, time, lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=32)   # open, no transaction
print("open", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    """holder(data_dir): a process that keeps the environment open (no transaction), as a
    sibling server or a long CLI command would, so the lock file is not re-initialised."""
    procs = []

    def start(data_dir):
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(data_dir)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "open"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


# ---------------------------------------------------------------------- 1. workers killed under load

class Client(threading.Thread):
    """Sends events on a keep-alive connection; each logical request `req` is retried (new
    `try`, new connection) when its answer is lost, at most 3 times. Records every send and
    every acknowledgement."""

    def __init__(self, port: int, name: str, stop: threading.Event, deadline: float):
        super().__init__(daemon=True)
        self.port = port
        self.tag = name
        self.stop = stop
        self.deadline = deadline
        self.acked: dict[tuple[str, int], str] = {}  # (req, try) -> eid
        self.sent: list[tuple[str, int]] = []
        self.refused = 0
        self.failures = 0
        self.sock = None

    def _connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            req = f"{self.tag}-{n}"
            props = {"si": SITE, "sid": f"{self.tag}-s{n % 3}" if n % 4 else "shared",
                     "uid": f"u{n % 5}", "req": req}
            for attempt in range(3):
                if self.stop.is_set():
                    break
                target = "/?" + urlencode({**props, "try": str(attempt)}, quote_via=quote)
                try:
                    if self.sock is None:
                        self._connect()
                    self.sent.append((req, attempt))
                    self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                    resp = read_response(self.sock)
                except (OSError, ConnectionError):
                    self.failures += 1
                    if self.sock is not None:
                        self.sock.close()
                        self.sock = None
                    time.sleep(0.02)
                    continue
                if resp.status == 200:
                    self.acked[(req, attempt)] = resp.text
                    break
                self.refused += 1
                time.sleep(0.05)
            n += 1
        if self.sock is not None:
            self.sock.close()


def _workers(log: str) -> dict[int, int]:
    """worker index -> its latest pid, from the supervisor's log lines."""
    latest = {}
    for index, pid in _WORKER_STARTED.findall(log):
        latest[int(index)] = int(pid)
    return latest


def _acks_grow(clients, count: int, timeout: float = 10.0) -> bool:
    """Whether the clients get `count` more answers within `timeout` s (mid-load, the kill then
    hits requests in flight): polled, not a fixed sleep, since a shared CI machine may be slow."""
    target = sum(len(c.acked) for c in clients) + count
    deadline = time.monotonic() + timeout
    while sum(len(c.acked) for c in clients) < target:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_workers_killed_repeatedly_under_load_lose_nothing_acknowledged(make_server):
    server = make_server("--workers", "2")
    marker = str(server.data_dir)
    seen_pids = set(_workers(server.log()).values())
    assert len(seen_pids) == 2
    stop = threading.Event()
    clients = [Client(server.port, f"c{i}", stop, time.monotonic() + 40) for i in range(6)]
    try:
        for client in clients:
            client.start()
        for round_ in range(3):
            assert _acks_grow(clients, 20), f"round {round_}: too little load before the kill"
            index = round_ % 2
            victim = _workers(server.log())[index]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if server.log().count("replacing it") == round_ + 1 and \
                        _workers(server.log())[index] != victim:
                    break
                time.sleep(0.05)
            log = server.log()
            assert f"(pid {victim}) exited with -9; replacing it" in log, log[-2000:]
            replacement = _workers(log)[index]
            assert replacement != victim
            seen_pids.add(replacement)
            # Service goes on after the replacement started.
            assert _acks_grow(clients, 20), f"round {round_}: stalled after the replacement"
        stop.set()
        for client in clients:
            client.join(15)
        assert not any(c.is_alive() for c in clients)
        # Killed workers' reader slots were cleared by their replacements (looked at while the
        # workers hold the environment open, see _stale_readers).
        assert _stale_readers(Path(marker, "log")) == []
        assert _stale_readers(Path(marker, "views")) == []
        assert server.stop() == 0  # SIGTERM to the supervisor: every worker drains
        assert not _kill_leftovers(seen_pids, marker), "workers outlived their supervisor"
    finally:
        stop.set()
        server.kill()
        _kill_leftovers(seen_pids, marker)

    acked = {key: eid for c in clients for key, eid in c.acked.items()}
    sent = [key for c in clients for key in c.sent]
    # Each round waited for 20 answers before its kill and 20 after its replacement: the load
    # is proven by those gates, not by a total a slow CI machine may not reach in 40 s.
    assert len(acked) >= 3 * 2 * 20
    assert sum(c.failures for c in clients) > 0, "no connection was cut: the kills hit nothing"
    events = _check_consistent(server.data_dir)
    lost = [eid for eid in acked.values() if eid not in events]
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {lost[:3]}"
    # Each send stored at most once; an acknowledged send stored exactly as the eid says.
    by_send: dict[tuple[str, int], list[str]] = {}
    for eid, value in events.items():
        props = value.props
        by_send.setdefault((props["req"], int(props["try"])), []).append(eid)
    doubles = {k: v for k, v in by_send.items() if len(v) > 1}
    assert not doubles, f"one request stored twice: {list(doubles.items())[:3]}"
    for key, eid in acked.items():
        assert by_send[key] == [eid]
    retried = {}
    for req, _try in by_send:
        retried[req] = retried.get(req, 0) + 1
    print(f"acked {len(acked)}, sends {len(sent)}, cut connections "
          f"{sum(c.failures for c in clients)}, refused {sum(c.refused for c in clients)}, "
          f"stored {len(events)}, stored but unacknowledged {len(events) - len(acked)}, "
          f"requests stored twice through a retry {sum(1 for n in retried.values() if n > 1)}")
    assert set(by_send) <= set(sent), "an event nobody sent"


# ---------------------------------------------------------------------- 2. full disk

@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs: a filesystem that really runs out of space (ENOSPC), unlike the map cap."""
    mount_dir = tmp_path / "smallfs"
    mount_dir.mkdir()
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root (euid is {os.geteuid()})")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_dir)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount_dir
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mount_dir)], capture_output=True,
                              timeout=30).returncode == 0:
                break
            time.sleep(0.25)  # a server may still hold the files open for a moment
        else:
            subprocess.run(["umount", "-l", str(mount_dir)], capture_output=True, timeout=30)


@pytest.mark.parametrize("reserve", ["512KiB", "0"], ids=["the views' reserve", "no reserve"])
def test_a_full_disk_refuses_with_503_stores_nothing_partial_and_recovers_by_itself(
        small_fs, make_server, reserve):  # small_fs first: unmounted after the server is gone
    # The filesystem under the data directory fills up, with the map cap (64 MiB) far above
    # what the disk holds, so this is the disk-full path, not MapFullError at the cap. With a
    # reserve (--min-free-disk-bytes), the writer refuses once less than it is free, and the
    # folder has room to fold everything acknowledged. With none, write(2) really fails with
    # ENOSPC while LMDB flushes a commit's pages (the views may then fall behind the log until
    # there is room again: reads wait, and catch up by themselves).
    ballast = small_fs / "ballast"
    ballast.write_bytes(b"\0" * (2 << 20))  # 2 MiB of the 4: deleted later to make room
    server = make_server("--initial-store-bytes", "1MiB", "--max-store-bytes", "64MiB",
                         "--retry-after", "2", "--min-free-disk-bytes", reserve,
                         data_dir=small_fs / "otdata")
    token = server.create_token(SITE)  # a write too: done while there is room
    pid = server.proc.pid

    acked: list[str] = []
    refused = None
    for i in range(3000):
        resp = server.track(si=SITE, sid=f"s{i % 50}", uid=f"u{i % 20}", n=str(i),
                            blob="x" * 1500)
        if resp.status != 200:
            refused = resp
            break
        acked.append(resp.text)
    assert refused is not None, "the disk never filled"
    assert refused.status == 503, refused
    assert "disk full" in refused.text, refused.text  # ENOSPC, not the map cap
    assert refused.headers.get("retry-after") == "2"
    assert refused.headers.get("access-control-allow-origin") == "*"
    assert len(acked) > 100
    print(f"disk full after {len(acked)} acknowledged events: {refused.text!r}")
    # More refusals, a batch among them: every one is 503 and nothing of any is stored. (With
    # no reserve the filesystem's last pages may still take a smaller commit or two: LMDB
    # saw a short write. Those are acknowledged and kept; then five refusals in a row.)
    more, late = [], []
    for i in range(300):
        resp = server.track(si=SITE, sid="probe", n=f"r{i}", blob="x" * 1500)
        if resp.status == 200:
            assert reserve == "0", "with the reserve, the writer refuses every append"
            late.append(resp.text)
            more.clear()
            continue
        more.append(resp)
        if len(more) == 5:
            break
    assert [r.status for r in more] == [503] * 5
    lines = "\n".join(f"sid=refused&n=b{i}&blob={'y' * 1500}" for i in range(50))
    batch = server.post(f"/batch?si={SITE}", lines)
    assert batch.status == 503 and batch.headers.get("retry-after") == "2"

    # No crash, reads keep working, nothing partial stored.
    assert server.proc.poll() is None and server.proc.pid == pid
    assert server.get("/healthz").status == 200
    logged = {entry.eid: entry for entry in log_events(server.data_dir)}
    assert set(logged) == set(acked) | set(late)
    assert not [e for e in logged.values() if e.sid == "refused"]
    for eid in (acked[0], acked[len(acked) // 2], acked[-1]):
        assert server.api(f"/api/v1/events/{eid}?si={SITE}", token).status == 200
    if reserve != "0":  # the reserve kept room for the views: they hold every acknowledged event
        assert "--min-free-disk-bytes" in refused.text
        events = _check_consistent(server.data_dir)
        assert set(events) == set(acked)
        session = server.api(f"/api/v1/sessions/s0?si={SITE}&limit=1", token)
        assert session.status == 200
        assert session.json()["event_count"] == len([i for i in range(len(acked)) if i % 50 == 0])

    # Room comes back: ingest resumes by itself, same process, no restart.
    ballast.unlink()
    resumed = None
    for _ in range(20):
        resp = server.track(si=SITE, sid="after", n="after")
        if resp.status == 200:
            resumed = resp
            break
        time.sleep(0.1)
    assert resumed is not None, "ingest did not resume after space was freed"
    later = [server.track(si=SITE, sid="after", blob="z" * 1500) for _ in range(50)]
    assert [r.status for r in later] == [200] * 50
    assert server.proc.poll() is None and server.proc.pid == pid
    wait_until(lambda: server.get("/readyz").status == 200)  # a folder that failed is back
    events = _check_consistent(server.data_dir)
    assert set(events) == set(acked) | set(late) | {resumed.text} | {r.text for r in later}
    assert server.stop() == 0


# ---------------------------------------------------------------------- 3. stale reader slots

_READER = """
import sys, time, lmdb
env = lmdb.open(sys.argv[1], max_dbs=32)
txn = env.begin()                       # a read transaction: a slot pinning this snapshot
txn.stat(env.open_db(sys.argv[2].encode(), txn=txn, create=False))
print("reading", flush=True)
time.sleep(60)
"""


def _used_bytes(server) -> int:
    """Pages in use in the log and the views together."""
    text = server.get("/metrics").text
    return sum(int(n) for n in re.findall(r'^otserver_store_used_bytes\{env="\w+"\} (\d+)',
                                          text, re.M))


def _kill_a_reader(data_dir, env: str = "log") -> int:
    """A process opens one of the store's environments, begins a read transaction and is
    SIGKILLed inside it."""
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(Path(data_dir, env)),
                               "log" if env == "log" else "sessions"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
    finally:
        reader.kill()
        reader.wait(10)
        reader.stdout.close()
    return reader.pid


def _churn(server, cycles: int) -> list[int]:
    """Each cycle ingests ~2 MB and waits until the sweeper has deleted all of it; returns
    the store's used bytes after each cycle. Pages freed by the sweep are reused, unless a
    reader pins an old snapshot: then the store grows by about a cycle each cycle."""
    used = []
    lines = "\n".join(f"sid=c{i % 40}&uid=u{i % 60}&blob={'p' * 1000}" for i in range(500))
    for cycle in range(cycles):
        for _ in range(4):
            resp = server.post(f"/batch?si={SITE}&cycle={cycle}", lines)
            assert resp.status == 200, resp
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.counts()["events"]:
            time.sleep(0.1)
        assert server.counts()["events"] == 0, f"cycle {cycle}: the sweeper did not finish"
        used.append(_used_bytes(server))
    return used


def test_a_reader_killed_inside_its_transaction_is_cleared_when_a_server_starts(
        make_server, holder):
    server = make_server()
    for i in range(20):
        assert server.track(si=SITE, sid=f"warm{i}").status == 200
    assert server.stop() == 0
    log_env = Path(server.data_dir, "log")
    holder(log_env)  # the lock file (and the dead slot in it) outlives the reader
    dead = _kill_a_reader(server.data_dir)
    assert _stale_readers(log_env) == [dead], "the setup left no stale slot"

    server.extra_args = ["--ttl", "1s", "--allow-short-ttl", "--sweep-interval", "0.3s"]
    server.start()
    assert _stale_readers(log_env) == []  # reader_check at start
    assert _reader_check(log_env) == 0

    used = _churn(server, 6)
    print("used KiB per churn cycle:", [u >> 10 for u in used])
    # Cycle 0 sizes the store; from then on the freed pages are reused. (With the dead
    # reader's snapshot pinned, each cycle adds ~4 MiB: 4044, 8036, 12028, ... KiB.)
    assert max(used[2:]) <= max(used[:2]) * 1.15, [u >> 10 for u in used]
    assert server.stop() == 0


def test_a_reader_killed_while_the_server_runs_does_not_make_the_store_grow_forever(
        make_server):
    server = make_server("--ttl", "1s", "--allow-short-ttl", "--sweep-interval", "0.3s")
    assert server.track(si=SITE, sid="warm").status == 200
    dead = [_kill_a_reader(server.data_dir, env) for env in ("log", "views")]  # held open
    for env, pid in zip(("log", "views"), dead):
        # the dead slot, unless the running sweeper (a pass every 0.3 s) cleared it already
        assert _stale_readers(Path(server.data_dir, env)) in ([pid], []), "a foreign slot"
    used = _churn(server, 5)
    print("used KiB per churn cycle:", [u >> 10 for u in used])
    # Expected: the server clears the dead slot by itself (reader_check now and then, e.g.
    # with each sweeper pass) and the store levels off as with no reader at all.
    assert max(used[2:]) <= max(used[:2]) * 1.15, [u >> 10 for u in used]


# ---------------------------------------------------------------------- 4. a stalled writer

def test_a_writer_stall_longer_than_the_header_timeout_does_not_cut_off_a_pipelining_client(
        make_server):
    server = make_server("--header-timeout", "1s")
    assert server.track(si=SITE, sid="warm").status == 200
    requests = [f"GET /?si={SITE}&sid=pipe&n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                for i in range(101)]
    # Stall the writer for real (a slow disk, a long transaction of another process): hold
    # the log's LMDB write lock from here.
    env = lmdb.open(str(Path(server.data_dir, "log")), max_dbs=32)
    txn = env.begin(write=True)
    try:
        with server.connect() as sock:
            # A well-behaved client: 100 requests and the start of the 101st in one send, the
            # rest of it 0.2 s later, long before the 1 s header timeout. The server pauses
            # reading at 64 outstanding answers, so it is the server that leaves it unread.
            sock.sendall(b"".join(requests[:100]) + requests[100][:20])
            time.sleep(0.2)
            sock.sendall(requests[100][20:])
            time.sleep(2.5)  # the stall outlasts the header timeout
            txn.abort()
            txn = None
            env.close()
            env = None
            data = _read_answers(sock, 101, 5.0)
    finally:
        if txn is not None:
            txn.abort()
        if env is not None:
            env.close()
    answers = parse_responses(data)
    deadline = time.monotonic() + 5  # let the writer finish what it accepted
    while time.monotonic() < deadline and not re.search(
            r"^otserver_queue_events 0$", server.get("/metrics").text, re.M):
        time.sleep(0.05)
    stored_now = server.counts()["events"] - 1
    print(f"{len(answers)} answers of 101; {stored_now} of the pipelined events stored")
    assert [a.status for a in answers] == [200] * 101, (
        f"{len(answers)} answers; {stored_now} events stored meanwhile")
    assert stored_now == 101


def _read_answers(sock, count: int, timeout: float) -> bytes:
    """Read until `count` answers arrived, the server closed, or timeout."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and data.count(b"HTTP/1.1 ") < count:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------- 5. the log writer process

def _writer_of(server) -> int | None:
    """The log-writer child of a server process (`otserver writer --fd N`)."""
    pid = server.proc.pid
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in Path(task, "children").read_text().split():
            args = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"otserver" in args and b"writer" in args:
                return int(child)
    return None


def test_a_killed_log_writer_is_replaced_and_loses_nothing_acknowledged(make_server):
    server = make_server()
    stop = threading.Event()
    clients = [Client(server.port, f"w{i}", stop, time.monotonic() + 30) for i in range(4)]
    for client in clients:
        client.start()
    killed = []
    try:
        for _ in range(3):
            time.sleep(0.5)  # mid-load
            victim = _writer_of(server)
            assert victim is not None, server.log()[-2000:]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _writer_of(server) in (None, victim):
                time.sleep(0.02)
            assert _writer_of(server) not in (None, victim), "no new log writer"
            during = sum(len(c.acked) for c in clients)
            wait_until(lambda: sum(len(c.acked) for c in clients) > during + 20, timeout=10)
    finally:
        stop.set()
        for client in clients:
            client.join(15)
    assert server.log().count("the log writer process exited") == 3
    assert server.get("/readyz").status == 200
    acked = {key: eid for c in clients for key, eid in c.acked.items()}
    events = _check_consistent(server.data_dir)
    lost = [eid for eid in acked.values() if eid not in events]
    assert not lost, f"{len(lost)} acknowledged events lost"
    assert server.stop() == 0


def test_a_folder_that_cannot_write_the_views_still_leaves_when_its_parent_does(tmp_path):
    """A folder retrying a full views store once looped past its parent check: killed
    servers left folders behind, each polling forever."""
    from otserver.config import Config
    from otserver.errors import StoreFull
    from otserver.folder import Folder
    from otserver.model import EidGenerator, make_event, now_ms
    from otserver.store import Store

    config = Config().replace(data_dir=str(tmp_path / "d"), fold_delay_s=0.0)  # due at once
    store = Store(config.data_dir)
    try:
        store.log.append([make_event({"si": SITE}, None, EidGenerator(), now_ms(), config).encode()])

        def full(apply, *args):
            raise StoreFull("store is at its size cap")
        store.views.write = full  # every fold fails, as at the cap with no room at all
        folder = Folder(store.log, store.views, config, sweeper=False)
        # a parent that is not ours: as if it were gone
        runner = threading.Thread(target=folder.run, kwargs={"parent": os.getppid() + 1_000_000})
        runner.start()
        runner.join(5)
        left = not runner.is_alive()
        folder.stop()
        runner.join(10)
        assert left, "the folder kept retrying with its parent gone"
        assert folder.watermark == 0
    finally:
        store.close()
