"""Crashes around the folder: kill -9 of the server, of its folder process, of a worker, in the
middle of fold batches and erasures; then the log keeps every acknowledged event, the views are
an exact fold of it (storecheck.check_consistent) and equal a fold from scratch record by record
(storecheck.views_equal_a_refold). And `otserver rebuild-views` on a stopped store changes no
record, and refuses (changing nothing) while a folder runs on the directory.

Real processes, real sockets on 127.0.0.1, real LMDB. The load is realistic: ~40 sessions over
15 users (some sessions shared by two users), pages, titles, utm_ first-touch properties,
increment=false now and then, user agents and referers (captured), single events and small
POST /batch bodies from 8 keep-alive connections. A kill lands while the views lag: a burst
(one POST /batch of a few thousand events) is acknowledged first, so the folder, at
--fold-batch-events 50, has many batches to go when the signal arrives (at a moment
varied by a few random milliseconds).

Process handling: a pid is signalled only after /proc shows it is still ours (its command line
or its OTSERVER_DATA_DIR names our data directory: the folder process gets its settings through
the environment, its command line is `python -m otserver fold --parent <pid>`). Checks read a
store only once no process runs on it any more.
"""
from __future__ import annotations

import http.client
import os
import random
import re
import shutil
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
from conftest import RunningServer, read_response
from storecheck import (catch_up, check_consistent, dump_views, log_events, opened, otserver,
                        views_equal_a_refold)

from otserver.model import LogEntry, unpackb

SITE = "crash.example"
SESSIONS = [f"s{n:02d}" for n in range(40)]
USERS = [f"u{n:02d}" for n in range(15)]
PAGES = ["/", "/pricing", "/docs/start", "/docs/api", "/blog/crash-safety", "/cart",
         "/checkout", "/account", "/search", "/blog/ünïcode-ok"]
TITLES = ["Home", "Pricing", "Getting started", "API", "Crash safety", "Cart",
          "Checkout", "Account", "Search", "Ünïcode ✓"]
AGENTS = ["Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
          "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15",
          "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/126.0",
          "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) Mobile/15E148"]
REFERERS = ["https://www.google.com/", "https://news.ycombinator.com/item?id=1",
            "https://crash.example/pricing", ""]
UTM = [{"utm_source": "google", "utm_medium": "cpc", "utm_campaign": "spring"},
       {"utm_source": "newsletter", "utm_medium": "email"},
       {"utm_source": "hn", "utm_campaign": "launch"}]
FOLD_BATCH = "50"  # many transaction boundaries for a kill to land near


# ---------------------------------------------------------------------- processes

def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _runs_on(pid: int, data_dir) -> bool:
    """The pid runs a process of ours on `data_dir`: its command line has the directory as
    an argument, or it is an otserver process (`python -m otserver ...`) whose environment
    sets OTSERVER_DATA_DIR to it (the folder process)."""
    target = str(data_dir).encode()
    args = _read_proc(pid, "cmdline").split(b"\0")
    if target in args:
        return True
    if b"otserver" not in args:  # only an otserver process's environment is looked at
        return False
    return b"OTSERVER_DATA_DIR=" + target in _read_proc(pid, "environ").split(b"\0")


def _processes_on(data_dir) -> list[int]:
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me and _runs_on(int(name), data_dir):
            out.append(int(name))
    return out


def _wait_none_on(data_dir, timeout: float = 15.0) -> None:
    """Until no process runs on data_dir (a killed server's folder leaves within ~1 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _processes_on(data_dir)
        if not left:
            return
        time.sleep(0.05)
    described = {pid: _read_proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
                 for pid in left}
    raise AssertionError(f"processes still run on {data_dir} after {timeout} s: {described}")


def _kill_leftovers(data_dir) -> None:
    """Teardown: give stragglers a moment to leave by themselves, then SIGKILL what is ours."""
    deadline = time.monotonic() + 3
    while _processes_on(data_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in _processes_on(data_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = _read_proc(pid, f"task/{task.name}/children").decode()
        out += [int(p) for p in text.split()]
    return out


def _wait_settled(server, starts: int, timeout: float = 15.0) -> int:
    """Until the server's own folder is the one folding: the previous server's orphaned
    folder (and log writer) have left, and this one took the lock (its `starts`-th "folding"
    line). -> its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folder = _folder_of(server.proc.pid, server.data_dir)
        ours = {server.proc.pid, *_children(server.proc.pid)}  # its folder and its writer
        if folder is not None and set(_processes_on(server.data_dir)) <= ours \
                and server.log().count("folder: folding ") >= starts:
            return folder
        time.sleep(0.02)
    raise AssertionError(f"the folder of a restarted server did not take over: {server.log()[-2000:]}")


def _folder_of(parent: int, data_dir) -> int | None:
    """The folder process the server (or supervisor) `parent` started on data_dir."""
    for pid in _children(parent):
        args = _read_proc(pid, "cmdline").split(b"\0")
        if b"fold" in args and b"--parent" in args and str(parent).encode() in args \
                and _runs_on(pid, data_dir):
            return pid
    return None


def _wait_folder(parent: int, data_dir, not_pid: int | None = None, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _folder_of(parent, data_dir)
        if pid is not None and pid != not_pid:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"no folder process under pid {parent} (other than {not_pid})")


def _sigkill(pid: int, data_dir, server=None) -> None:
    """SIGKILL pid if it still runs on data_dir (else fail, with the server's log)."""
    if not _runs_on(pid, data_dir):
        log = server.log()[-4000:] if server is not None else ""
        raise AssertionError(f"pid {pid} no longer runs on {data_dir}: not signalling it\n{log}")
    os.kill(pid, signal.SIGKILL)


def _wait_exit(pid: int, timeout: float = 10.0) -> None:
    """Until the pid is gone (or a zombie: its command line reads empty)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _read_proc(pid, "cmdline"):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not exit")


_WORKER_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def _workers(log: str) -> dict[int, int]:
    latest = {}
    for index, pid in _WORKER_STARTED.findall(log):
        latest[int(index)] = int(pid)
    return latest


# ---------------------------------------------------------------------- the store and the server

def _metric(server, name: str) -> int:
    text = server.get("/metrics").text
    return int(float(re.search(rf"^{name} (\S+)", text, re.MULTILINE).group(1)))


def _lag_on_disk(data_dir) -> tuple[int, int]:
    """(log tail, views watermark), read straight from LMDB."""
    with opened(data_dir) as store:
        return store.log.last_position(), store.views.watermark()


def _erasure_positions(data_dir) -> dict[tuple[str, str], list[int]]:
    """(si, uid) -> log positions of its erasure entries."""
    out: dict[tuple[str, str], list[int]] = {}
    with opened(data_dir) as store, store.log.read() as txn:
        for position, raw in store.log.entries_after(txn, 0, 1 << 62):
            entry = LogEntry(position, raw)
            if not entry.is_event:
                out.setdefault((entry.si, entry.uid), []).append(position)
    return out


def _final_checks(server, acked: dict, scratch: Path) -> dict:
    """After the last round: the server stopped, every process on the directory gone; every
    acknowledged eid in the log; the views an exact fold of it, equal to a refold."""
    if server.proc is not None and server.proc.poll() is None:
        assert server.stop(30) == 0, server.log()[-3000:]
    _wait_none_on(server.data_dir)
    stored = server.event_ids()
    assert len(stored) == len(set(stored)), "an eid twice in the log"
    stored_set = set(stored)
    lost = [eid for eid in acked if eid not in stored_set]
    assert not lost, f"{len(lost)} acknowledged events not in the log, e.g. {lost[:3]}"
    assert {e.eid for e in log_events(server.data_dir)} == stored_set
    catch_up(server.data_dir)
    events = check_consistent(server.data_dir, site=SITE)
    assert set(events) == stored_set
    views_equal_a_refold(server.data_dir, scratch)
    return events


# ---------------------------------------------------------------------- the load

def _event(rng: random.Random, n: int, retired: set) -> dict:
    """One realistic event: a session, its user (now and then another one: a shared session),
    a page, sometimes utm_ properties (first touch) or increment=false."""
    index = rng.randrange(len(SESSIONS))
    sid = SESSIONS[index]
    uid = USERS[index % len(USERS)] if rng.random() < 0.85 else rng.choice(USERS)
    if uid in retired:
        choices = [u for u in USERS if u not in retired]
        uid = rng.choice(choices)
    page = rng.randrange(len(PAGES))
    props = {"sid": sid, "uid": uid, "ev": rng.choice(("view", "view", "view", "click",
                                                        "scroll", "purchase")),
             "page": PAGES[page], "title": TITLES[page], "n": str(n)}
    if rng.random() < 0.25:
        props.update(rng.choice(UTM))
    if rng.random() < 0.08:
        props["increment"] = "false"
    if props["ev"] == "purchase":
        props["value"] = f"{rng.uniform(1, 500):.2f}"
        props["currency"] = "EUR"
    if rng.random() < 0.1:
        props["plan"] = rng.choice(("free", "pro", "team"))
    return props


def _qs(props: dict) -> str:
    return urlencode(props, quote_via=quote)


class LoadThread(threading.Thread):
    """Events on one keep-alive connection, reconnecting when it is cut (a kill): every eid
    answered 200 is recorded with the event's (sid, uid)."""

    def __init__(self, load: Load, index: int, batches: bool):
        super().__init__(daemon=True, name=f"load-{index}")
        self.load = load
        self.index = index
        self.batches = batches
        self.rng = random.Random(f"{load.seed}-{index}")
        self.acked: dict[str, tuple[str, str]] = {}
        self.sent_at: dict[str, float] = {}  # eid -> when its request was sent (monotonic)
        self.failures = 0
        self.refused = 0
        self.sock = None
        self.n = 0

    def _request(self) -> tuple[bytes, list[tuple[str, str]]]:
        rng, retired = self.rng, self.load.retired
        agent = AGENTS[self.index % len(AGENTS)]
        if self.batches and rng.random() < 0.6:
            events = [_event(rng, self.n + k, retired) for k in range(rng.randrange(10, 41))]
            self.n += len(events)
            body = "\n".join(_qs(e) for e in events).encode()
            head = (f"POST /batch?si={quote(SITE)} HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n"
                    "Content-Type: application/x-www-form-urlencoded\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            return head + body, [(e["sid"], e["uid"]) for e in events]
        event = _event(rng, self.n, retired)
        self.n += 1
        referer = rng.choice(REFERERS)
        head = (f"GET /?si={quote(SITE)}&{_qs(event)} HTTP/1.1\r\nHost: x\r\n"
                f"User-Agent: {agent}\r\n" + (f"Referer: {referer}\r\n" if referer else "")
                + "\r\n")
        return head.encode(), [(event["sid"], event["uid"])]

    def run(self) -> None:
        stop = self.load.stop
        while not stop.is_set():
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(("127.0.0.1", self.load.port), timeout=5)
                data, ids = self._request()
                sent_at = time.monotonic()
                self.sock.sendall(data)
                resp = read_response(self.sock, timeout=10)
            except (OSError, ConnectionError):
                self.failures += 1
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                stop.wait(0.02)
                continue
            if resp.status == 200:
                eids = resp.text.split()
                assert len(eids) == len(ids), resp
                self.acked.update(zip(eids, ids))
                self.sent_at.update(dict.fromkeys(eids, sent_at))
            else:
                self.refused += 1
                stop.wait(0.05)
            if self.batches:
                stop.wait(0.02)  # the batch connections add bursts, not a flood
        if self.sock is not None:
            self.sock.close()


class Load:
    """8 connections (2 of them sending small batches too) against one port, until stop()."""

    def __init__(self, port: int, seed, retired: set | None = None, threads: int = 8):
        self.port = port
        self.seed = seed
        self.retired = retired if retired is not None else set()
        self.stop = threading.Event()
        self.threads = [LoadThread(self, i, batches=i < 2) for i in range(threads)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def acked_count(self) -> int:
        return sum(len(t.acked) for t in self.threads)

    def wait_acked(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.acked_count() < count:
            assert time.monotonic() < deadline, f"only {self.acked_count()} events acknowledged"
            time.sleep(0.02)

    def finish(self) -> dict[str, tuple[str, str]]:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)
        assert not any(t.is_alive() for t in self.threads), "a load thread hung"
        out = {}
        for thread in self.threads:
            out.update(thread.acked)
        return out

    def sent_at(self) -> dict[str, float]:
        out = {}
        for thread in self.threads:
            out.update(dict(thread.sent_at))
        return out

    @property
    def failures(self) -> int:
        return sum(t.failures for t in self.threads)

    @property
    def refused(self) -> int:
        return sum(t.refused for t in self.threads)


def _burst(server, rng: random.Random, count: int, retired: set = frozenset()) -> dict:
    """One POST /batch of `count` events, acknowledged: a backlog of fold batches for the
    folder. -> {eid: (sid, uid)}."""
    events = [_event(rng, k, retired) for k in range(count)]
    resp = server.post(f"/batch?si={quote(SITE)}&burst=1", "\n".join(_qs(e) for e in events))
    assert resp.status == 200, resp
    eids = resp.text.split()
    assert len(eids) == count
    return dict(zip(eids, [(e["sid"], e["uid"]) for e in events]))


def _lag_now(server) -> int:
    return _metric(server, "otserver_view_lag_events")


def _hold_between_batches(data_dir) -> _Env:
    """Take the views' write lock from this process: the folder finishes the transaction it
    is in and waits at the start of its next write, with entries left to fold: a kill then
    lands at a boundary between fold transactions, not inside one. -> the handle holding it."""
    views = _Env(Path(data_dir) / "views", ("meta",))
    try:
        views.hold()
        tail, mark = _lag_on_disk_from(views, data_dir)
        assert tail > mark, "the folder had nothing left to fold"
        time.sleep(0.005)  # it reaches the lock
    except BaseException:
        views.close()
        raise
    return views


def _lag_on_disk_from(views: _Env, data_dir) -> tuple[int, int]:
    """(log tail, views watermark) while this process holds the views' write lock."""
    raw = views.txn.get(b"watermark", db=views.db["meta"])
    mark = int.from_bytes(raw, "big") if raw is not None else 0
    log = _Env(Path(data_dir) / "log", ("log",))
    try:
        txn = log.begin()
        cur = txn.cursor(db=log.db["log"])
        tail = int.from_bytes(cur.key(), "big") if cur.last() else 0
        txn.abort()
    finally:
        log.close()
    return tail, mark


# ---------------------------------------------------------------------- 1. kill -9 of the server

@pytest.mark.slow
def test_server_killed_during_fold_batches_keeps_every_ack_and_views_equal_a_refold(
        make_server, tmp_path):
    server = make_server("--fold-batch-events", FOLD_BATCH)
    data_dir = server.data_dir
    acked: dict[str, tuple[str, str]] = {}
    rng = random.Random("server-kill")
    lags, behind_after_kill, unacked_stored = [], [], 0
    try:
        for round_ in range(6):
            folder = _wait_settled(server, round_ + 1)
            load = Load(server.port, f"server-kill-{round_}").start()
            load.wait_acked(1500)
            acked.update(_burst(server, rng, 3000))
            lag = _lag_now(server)  # the folder is working through the burst
            time.sleep(rng.uniform(0, 0.02))
            # Odd rounds: the whole service dies at once, the folder too: in the middle of a
            # batch (round 1), or between two batches (rounds 3 and 5); even rounds: the
            # server alone, its folder left to notice and leave by itself.
            held = _hold_between_batches(data_dir) if round_ in (3, 5) else None
            try:
                if round_ % 2:
                    _sigkill(folder, data_dir, server)
                server.kill()
                if round_ % 2:
                    _wait_exit(folder)
            finally:
                if held is not None:
                    held.close()
            if round_ % 2:
                behind_after_kill.append(_lag_on_disk(data_dir))
            lags.append(lag)
            round_acked = load.finish()
            assert len(round_acked) > 300, f"round {round_}: too little load"
            assert load.failures > 0, f"round {round_}: the kill cut no connection"
            acked.update(round_acked)
            # Restart at once on the same directory (the orphaned folder may still hold the
            # folder lock: the new one waits for it, then resumes from the watermark).
            server.start()
            stored = set(server.event_ids())
            lost = [eid for eid in acked if eid not in stored]
            assert not lost, f"round {round_}: {len(lost)} acknowledged events lost: {lost[:3]}"
            unacked_stored = len(stored) - len(acked)
        # The views catch up behind a live server, too.
        deadline = time.monotonic() + 20
        while _lag_now(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _lag_now(server) == 0, "the views did not catch up after the restarts"
        events = _final_checks(server, acked, tmp_path)
    finally:
        server.kill()
        _kill_leftovers(data_dir)
    print(f"acked {len(acked)}, stored {len(events)} ({unacked_stored} stored unacknowledged); "
          f"view lag at the kills {lags}; (tail, watermark) after killing both {behind_after_kill}")
    assert any(lag > int(FOLD_BATCH) for lag in lags), f"no kill landed with batches to go: {lags}"
    assert any(tail > mark for tail, mark in behind_after_kill), \
        f"no kill of the folder landed while the views lagged: {behind_after_kill}"
    log = server.log()
    assert len(re.findall(r"folder: folding .* from position [1-9]", log)) >= 3, \
        "a restarted folder did not resume from a watermark"


# ---------------------------------------------------------------------- 2. kill -9 of the folder

@pytest.mark.slow
def test_folder_killed_mid_batch_is_replaced_and_reads_see_every_acknowledged_event(
        make_server, tmp_path):
    server = make_server("--fold-batch-events", FOLD_BATCH)
    data_dir = server.data_dir
    parent = server.proc.pid
    rng = random.Random("folder-kill")
    acked: dict[str, tuple[str, str]] = {}
    behind, killed = [], []
    load = Load(server.port, "folder-kill")
    try:
        load.start()
        load.wait_acked(500)
        folder = _wait_folder(parent, data_dir)
        for round_ in range(6):
            before = load.acked_count()
            acked.update(_burst(server, rng, 3000))
            time.sleep(rng.uniform(0, 0.02))
            # Rounds 0-3 in the middle of a batch, 4 and 5 between two batches.
            held = _hold_between_batches(data_dir) if round_ >= 4 else None
            try:
                _sigkill(folder, data_dir, server)  # thousands of entries to fold
                _wait_exit(folder)
            finally:
                if held is not None:
                    held.close()
            behind.append(_lag_on_disk(data_dir))
            killed.append(folder)
            replacement = _wait_folder(parent, data_dir, not_pid=folder)
            assert replacement != folder
            folder = replacement
            deadline = time.monotonic() + 10
            while not (server.get("/readyz").status == 200
                       and _metric(server, "otserver_folder_up") == 1):
                assert time.monotonic() < deadline, "not ready again after the folder's restart"
                time.sleep(0.02)
            # Ingest went on meanwhile, and goes on.
            load.wait_acked(before + 300)
            # Reads wait for the new folder to catch up with the log.
            deadline = time.monotonic() + 20
            while _lag_now(server) > 1000 and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(0.3)
        acked.update(load.finish())
        assert load.failures == 0 and load.refused == 0, \
            f"ingest was disturbed: {load.failures} cut, {load.refused} refused"
        log = server.log()
        for pid in killed:
            assert f"folder process (pid {pid}) exited with -9; starting another" in log, log[-3000:]

        # Through the API: each session and each user counts exactly what was acknowledged.
        token = server.create_token(SITE)
        per_session: dict[str, set] = {}
        per_user: dict[str, int] = {}
        user_sessions: dict[str, set] = {}
        for eid, (sid, uid) in acked.items():
            per_session.setdefault(sid, set()).add(eid)
            per_user[uid] = per_user.get(uid, 0) + 1
            user_sessions.setdefault(uid, set()).add(sid)
        for sid, eids in per_session.items():
            seen, after = [], None
            for _ in range(100):
                target = f"/api/v1/sessions/{sid}?si={quote(SITE)}&limit=1000" + \
                    (f"&after={after}" if after else "")
                body = _api_ok(server, target, token)
                assert body["event_count"] == len(eids), \
                    f"session {sid}: event_count {body['event_count']}, acknowledged {len(eids)}"
                seen += [e["event"]["eid"] for e in body["events"]]
                after = body["next_after"]
                if after is None:
                    break
            assert len(seen) == len(set(seen)) and set(seen) == eids, f"session {sid}"
        for uid, count in per_user.items():
            body = _api_ok(server, f"/api/v1/users/{uid}?si={quote(SITE)}&limit=1000", token)
            assert body["event_count"] == count, \
                f"user {uid}: event_count {body['event_count']}, acknowledged {count}"
            assert {s["sid"] for s in body["sessions"]} == user_sessions[uid], uid
        events = _final_checks(server, acked, tmp_path)
        assert set(events) == set(acked), "an event stored that was not acknowledged"
    finally:
        load.stop.set()
        server.kill()
        _kill_leftovers(data_dir)
    print(f"acked {len(acked)}; (tail, watermark) right after each folder kill: {behind}")
    assert any(tail > mark for tail, mark in behind), f"no kill landed while folding: {behind}"


def _api_ok(server, target: str, token: str, timeout: float = 20.0) -> dict:
    """A read answered 200 (503 while the views catch up is retried)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = server.api(target, token)
        if resp.status == 200:
            return resp.json()
        assert resp.status == 503 and time.monotonic() < deadline, (target, resp)
        time.sleep(0.1)


# ---------------------------------------------------------------------- 3. kill -9 of a worker

@pytest.mark.slow
def test_worker_killed_under_load_with_two_workers_keeps_acks_and_views_exact(
        make_server, tmp_path):
    server = make_server("--workers", "2", "--fold-batch-events", FOLD_BATCH)
    data_dir = server.data_dir
    supervisor = server.proc.pid
    rng = random.Random("worker-kill")
    acked: dict[str, tuple[str, str]] = {}
    lags: list = []
    cut = 0
    load = Load(server.port, "worker-kill")
    try:
        assert len(_workers(server.log())) == 2
        folder = _wait_folder(supervisor, data_dir)
        load.start()
        load.wait_acked(500)
        for round_ in range(3):
            before = load.acked_count()
            acked.update(_burst(server, rng, 2000))
            lags.append(_lag_now(server))
            index = round_ % 2
            victim = _workers(server.log())[index]
            _sigkill(victim, data_dir, server)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                log = server.log()
                if f"(pid {victim}) exited with -9; replacing it" in log and \
                        _workers(log)[index] != victim:
                    break
                time.sleep(0.05)
            log = server.log()
            assert f"worker {index} (pid {victim}) exited with -9; replacing it" in log, log[-3000:]
            replacement = _workers(log)[index]
            assert replacement != victim and _runs_on(replacement, data_dir)
            load.wait_acked(before + 1500)  # service goes on
        # The folder was not disturbed by the workers' deaths. Now it dies, mid-batch: the
        # supervisor replaces it and the workers' ingest goes on.
        assert _folder_of(supervisor, data_dir) == folder
        before = load.acked_count()
        acked.update(_burst(server, rng, 2000))
        _sigkill(folder, data_dir, server)
        _wait_exit(folder)
        lags.append(_lag_on_disk(data_dir))
        replacement = _wait_folder(supervisor, data_dir, not_pid=folder)
        load.wait_acked(before + 1000)
        log = server.log()
        assert f"folder process (pid {folder}) exited with -9; starting another" in log, log[-3000:]
        assert _folder_of(supervisor, data_dir) == replacement
        # Last, the supervisor itself killed under load: its workers (SIGTERM when it dies)
        # drain and leave, so does its folder; a new supervisor serves the directory on.
        acked.update(_burst(server, rng, 2000))
        server.kill()
        acked.update(load.finish())
        cut = load.failures
        assert cut > 0
        _wait_none_on(data_dir)
        stored = set(server.event_ids())
        lost = [eid for eid in acked if eid not in stored]
        assert not lost, f"{len(lost)} acknowledged events lost with the supervisor: {lost[:3]}"
        server.start()
        fresh = _workers(server.log())  # the latest line of each index: this supervisor's
        assert len(fresh) == 2 and all(_runs_on(pid, data_dir) for pid in fresh.values())
        load = Load(server.port, "worker-kill-after")
        load.start()
        load.wait_acked(1000)
        acked.update(load.finish())
        _final_checks(server, acked, tmp_path)
    finally:
        load.stop.set()
        server.kill()
        _kill_leftovers(data_dir)
    print(f"acked {len(acked)}, connections cut {cut}, view lag at the worker kills and "
          f"(tail, watermark) after the folder's {lags}")


# ---------------------------------------------------------------------- 4. erasures and kills

def _erase(server, token: str, uid: str):
    headers = {"Authorization": f"Bearer {token}"}
    return server.request("DELETE", f"/api/v1/users/{uid}?si={quote(SITE)}", headers=headers)


class _Eraser(threading.Thread):
    """A DELETE on its own connection; its answer (or the exception, a cut connection)
    lands in `answers`."""

    def __init__(self, server, token: str, uid: str, answers: list):
        super().__init__(daemon=True)
        self.args_ = (server, token, uid)
        self.answers = answers

    def run(self) -> None:
        try:
            self.answers.append(_erase(*self.args_))
        except (OSError, http.client.HTTPException) as exc:  # the server was killed under it
            self.answers.append(exc)


def _wait_erasure_done(data_dir, position: int, timeout: float = 15.0) -> None:
    """Until the erasure at `position` has its result stored (its purge of the log done)."""
    deadline = time.monotonic() + timeout
    while True:
        with opened(data_dir) as store:
            if store.log.erasure_result(position)[0]:
                return
        assert time.monotonic() < deadline, f"the erasure at log position {position} not done"
        time.sleep(0.02)


def _wait_user_gone(server, token: str, uid: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        resp = server.api(f"/api/v1/users/{uid}?si={quote(SITE)}", token)
        if resp.status == 404:
            assert resp.json() == {"error": "no such user"}
            return
        assert resp.status in (200, 503) and time.monotonic() < deadline, (uid, resp)
        time.sleep(0.05)


def _retire(load: Load, uid: str) -> None:
    """No more events for uid (the load picks other users), and none still in flight."""
    load.retired.add(uid)
    time.sleep(0.3)


class _Env:
    """One LMDB environment of the store, opened from this process to hold its write lock (a
    write transaction: the folder's next write to that environment waits) and to read it.
    One handle per environment and process (LMDB's advisory locks do not survive a second
    handle being closed), begun and aborted in the test's main thread."""

    def __init__(self, path: Path, names: tuple[str, ...]):
        self.env = lmdb.open(str(path), map_size=max(64 << 20, os.path.getsize(path / "data.mdb")),
                             max_dbs=16, readahead=False, create=False)
        self.db = {name: self.env.open_db(name.encode(), create=False) for name in names}
        self.txn = None

    def begin(self, write: bool = False):
        while True:
            try:
                return self.env.begin(write=write)
            except lmdb.MapResizedError:  # a server grew the map
                self.env.set_mapsize(0)

    def hold(self) -> None:
        self.txn = self.begin(write=True)

    def release(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None

    def close(self) -> None:
        self.release()
        self.env.close()


def _pending(views: _Env) -> list:
    txn = views.begin()
    try:
        raw = txn.get(b"purge", db=views.db["meta"])
        return unpackb(raw) if raw is not None else []
    finally:
        txn.abort()


def _logged_erasure(log: _Env, uid: str) -> int | None:
    """The position of the last erasure entry of uid among the log's last 5,000 entries."""
    txn = log.txn or log.begin()
    try:
        cur = txn.cursor(db=log.db["log"])
        if not cur.last():
            return None
        for n, (key, raw) in enumerate(cur.iterprev()):
            if n > 5000:
                return None
            entry = LogEntry(int.from_bytes(key, "big"), raw)
            if not entry.is_event and entry.si == SITE and entry.uid == uid:
                return entry.position
        return None
    finally:
        if txn is not log.txn:
            txn.abort()


def _in_log(log: _Env, positions) -> int:
    txn = log.txn or log.begin()
    try:
        return sum(1 for p in positions if txn.get(p.to_bytes(8, "big"), db=log.db["log"]))
    finally:
        if txn is not log.txn:
            txn.abort()


def _result_stored(log: _Env, position: int) -> bool:
    txn = log.begin()
    try:
        return txn.get(position.to_bytes(8, "big"), db=log.db["erasures"]) is not None
    finally:
        txn.abort()


def _poll(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _erase_into_window(server, admin: str, uid: str, answers: list, *, purged: bool):
    """Stop the folder inside an erasure, deterministically, with the environments' write
    locks: the views erased and the purge recorded, the log not purged yet (purged=False:
    the folder waits for the log's lock), or the log purged and the result stored, the
    pending record not cleared yet (purged=True: it waits for the views' lock).
    -> (open handles (views, log), erasure position, positions to purge)."""
    data_dir = server.data_dir
    views, log = _Env(data_dir / "views", ("meta",)), _Env(data_dir / "log", ("log", "erasures"))
    try:
        views.hold()  # no fold can start: the erasure entry waits in the log
        _Eraser(server, admin, uid, answers).start()
        position = _poll(lambda: _logged_erasure(log, uid), 10, f"the erasure of {uid} logged")
        log.hold()  # no purge (and no append) can start
        views.release()  # the folder folds the erasure, then waits for the log's lock
        record = _poll(lambda: [p for p in _pending(views) if p[0] == position], 10,
                       f"the erasure of {uid} folded")
        _, result, purge = record[0]
        assert result is not None and result["events"] == len(purge) > 0, record
        assert _in_log(log, purge) == len(purge), "purged before the log's lock was released"
        assert not _result_stored(log, position)
        if purged:
            views.hold()  # the folder's clearing of the record will wait for this
            log.release()  # the folder purges the log and stores the result
            _poll(lambda: _result_stored(log, position), 10, f"the purge of {uid}")
            assert _in_log(log, purge) == 0
            assert [p for p in _pending(views) if p[0] == position], "cleared under our lock"
    except BaseException:
        views.close()
        log.close()
        raise
    return (views, log), position, purge


@pytest.mark.slow
def test_kill_9_around_erasures_leaves_no_erased_event_and_views_equal_a_refold(
        make_server, tmp_path):
    # 10 s for an answer: an erasure counts its user's hours again, here under load
    server = make_server("--fold-batch-events", FOLD_BATCH, "--max-read-wait", "10s")
    data_dir = server.data_dir
    admin = server.create_token("*")
    rng = random.Random("erasures")
    retired: set[str] = set()
    acked: dict[str, tuple[str, str]] = {}
    erased: dict[str, str] = {}  # uid -> how its erasure went
    load = None
    handles = ()
    try:
        # A: an erasure acknowledged, then at once the whole service killed (its folder may
        # not have cleared the pending record yet).
        load = Load(server.port, "erase-a", retired).start()
        load.wait_acked(1500)
        _retire(load, "u03")
        acked_u03 = sum(1 for _, u in _snapshot(load).values() if u == "u03")
        folder = _folder_of(server.proc.pid, data_dir)
        resp = _erase(server, admin, "u03")
        _sigkill(folder, data_dir, server)
        server.kill()
        assert resp.status == 200, resp
        body = resp.json()
        assert set(body) == {"erased"}, body
        assert set(body["erased"]) == {"events", "sessions_removed", "sessions_refolded"}
        assert body["erased"]["events"] == acked_u03 > 0, (body, acked_u03)
        results = {"u03": body["erased"]}
        erased["u03"] = "acknowledged, then killed"
        acked.update(load.finish())
        server.start()
        _wait_user_gone(server, admin, "u03")

        # B: an erasure in flight (behind a backlog of fold batches) when the server and its
        # folder are killed; after the restart it is finished if it was logged, and a client
        # retrying it gets 200 (it was not logged) or 404 (done already).
        load = Load(server.port, "erase-b", retired).start()
        load.wait_acked(1500)
        _retire(load, "u07")
        acked.update(_burst(server, rng, 3000, retired))
        answers: list = []
        folder = _folder_of(server.proc.pid, data_dir)
        _Eraser(server, admin, "u07", answers).start()
        time.sleep(0.02)
        _sigkill(folder, data_dir, server)
        server.kill()
        acked.update(load.finish())
        in_flight = not answers or isinstance(answers[0], Exception) or answers[0].status != 200
        logged = _erasure_positions(data_dir).get((SITE, "u07"))
        server.start()
        if logged:
            _wait_user_gone(server, admin, "u07")  # the new folder carries it out by itself
            _wait_erasure_done(data_dir, logged[0])
            retry = _erase(server, admin, "u07")
            assert retry.status == 404, retry
        else:
            retry = _erase(server, admin, "u07")
            assert retry.status == 200 and retry.json()["erased"]["events"] > 0, retry
            _wait_user_gone(server, admin, "u07")
        erased["u07"] = f"in flight {in_flight}, logged before the kill {logged}"

        # C: the folder alone killed while an erasure (behind a backlog) is carried out; the
        # server replaces it and the DELETE is answered (200, or 202 when that takes longer
        # than --max-read-wait), then done.
        load = Load(server.port, "erase-c", retired).start()
        load.wait_acked(1500)
        _retire(load, "u11")
        acked.update(_burst(server, rng, 3000, retired))
        answers = []
        folder = _folder_of(server.proc.pid, data_dir)
        eraser = _Eraser(server, admin, "u11", answers)
        eraser.start()
        time.sleep(0.02)
        _sigkill(folder, data_dir, server)
        eraser.join(15)
        assert answers and not isinstance(answers[0], Exception), answers
        assert answers[0].status in (200, 202), answers
        if answers[0].status == 200:
            results["u11"] = answers[0].json()["erased"]
        _wait_user_gone(server, admin, "u11")
        erased["u11"] = f"folder killed, answered {answers[0].status}"

        # D: the folder killed between erasing from the views and purging the log; the
        # replacement purges at its start, the DELETE is answered.
        _retire(load, "u05")
        answers = []
        folder = _folder_of(server.proc.pid, data_dir)
        handles, position, purge = _erase_into_window(server, admin, "u05", answers, purged=False)
        _sigkill(folder, data_dir, server)
        _wait_exit(folder)
        for handle in handles:
            handle.close()
        handles = ()
        _wait_folder(server.proc.pid, data_dir, not_pid=folder)
        _wait_erasure_done(data_dir, position)  # by the replacement, at its start
        _poll(lambda: answers, 15, "the answer to the DELETE of u05")
        assert not isinstance(answers[0], Exception) and answers[0].status in (200, 202), answers
        if answers[0].status == 200:
            assert answers[0].json()["erased"]["events"] == len(purge), answers[0]
        _wait_user_gone(server, admin, "u05")
        erased["u05"] = f"folder killed before the purge of {len(purge)} events"

        # E: the same window, the whole service killed; the next server's folder purges.
        _retire(load, "u09")
        answers = []
        folder = _folder_of(server.proc.pid, data_dir)
        handles, position, purge = _erase_into_window(server, admin, "u09", answers, purged=False)
        _sigkill(folder, data_dir, server)
        server.kill()
        _wait_exit(folder)
        for handle in handles:
            handle.close()
        handles = ()
        acked.update(load.finish())
        server.start()
        _wait_erasure_done(data_dir, position)  # by the next server's folder, at its start
        _wait_user_gone(server, admin, "u09")
        again = _erase(server, admin, "u09")  # the client retries its cut DELETE
        assert again.status == 404 and again.json() == {"error": "no such user"}, again
        erased["u09"] = f"service killed before the purge of {len(purge)} events"

        # F: the folder killed after purging the log, before clearing the pending record:
        # the replacement repeats the purge (nothing left to delete; the stored result kept).
        load = Load(server.port, "erase-f", retired).start()
        load.wait_acked(1000)
        _retire(load, "u12")
        answers = []
        folder = _folder_of(server.proc.pid, data_dir)
        handles, position, purge = _erase_into_window(server, admin, "u12", answers, purged=True)
        _poll(lambda: answers, 10, "the answer to the DELETE of u12")  # the result is stored
        _sigkill(folder, data_dir, server)
        _wait_exit(folder)
        for handle in handles:
            handle.close()
        handles = ()
        assert not isinstance(answers[0], Exception) and answers[0].status == 200, answers
        results["u12"] = answers[0].json()["erased"]
        assert results["u12"]["events"] == len(purge)
        _wait_folder(server.proc.pid, data_dir, not_pid=folder)
        _wait_user_gone(server, admin, "u12")
        erased["u12"] = f"folder killed before clearing the purge record of {len(purge)} events"

        # G: a user erased while still active: what it sent before the DELETE goes, what it
        # sends after the answer stays (an erasure erases what was logged before it).
        before_delete = {eid for eid, (_, uid) in _snapshot(load).items() if uid == "u01"}
        resp = _erase(server, admin, "u01")
        answered_at = time.monotonic()
        assert resp.status == 200 and resp.json()["erased"]["events"] >= len(before_delete) > 0, \
            (resp, len(before_delete))
        results["u01"] = resp.json()["erased"]
        count = load.acked_count()
        load.wait_acked(count + 1000)

        # A last erasure on the live server, and one of a user that never existed.
        _retire(load, "u14")
        resp = _erase(server, admin, "u14")
        assert resp.status == 200 and resp.json()["erased"]["events"] > 0, resp
        results["u14"] = resp.json()["erased"]
        erased["u14"] = "plain"
        nobody = _erase(server, admin, "nobody-here")
        assert nobody.status == 404 and nobody.json() == {"error": "no such user"}, nobody
        acked_g = load.finish()
        sent_at = load.sent_at()
        acked.update(acked_g)
        after_answer = {eid for eid, (_, uid) in acked_g.items()
                        if uid == "u01" and sent_at[eid] > answered_at}
        assert after_answer, "u01 sent nothing after its erasure"
        for uid in erased:
            _wait_user_gone(server, admin, uid)
        back = server.api(f"/api/v1/users/u01?si={quote(SITE)}", admin)
        assert back.status == 200 and back.json()["event_count"] >= len(after_answer), back
        # Sessions the erased users shared with others are still there, refolded.
        token = server.create_token(SITE)
        for sid in ("s03", "s07", "s11", "s05", "s09", "s12", "s14"):
            resp = server.api(f"/api/v1/sessions/{sid}?si={quote(SITE)}&limit=1", token)
            assert resp.status in (200, 404), resp
            if resp.status == 200:
                assert resp.json()["session"]["uid"] not in erased

        assert server.stop(30) == 0
        _wait_none_on(data_dir)
        positions = _erasure_positions(data_dir)
        remaining = log_events(data_dir)
        for uid in erased:
            assert (SITE, uid) in positions, f"no erasure entry of {uid} in the log"
            first = min(positions[(SITE, uid)])
            kept = [e for e in remaining if e.uid == uid and e.position < first]
            assert not kept, f"{uid}: {len(kept)} events logged before its erasure remain"
            assert not [e for e in remaining if e.uid == uid], f"{uid}: events left"
        g_position = positions[(SITE, "u01")]
        assert len(g_position) == 1
        assert not [e for e in remaining if e.uid == "u01" and e.position < g_position[0]]
        stored_u01 = {e.eid for e in remaining if e.uid == "u01"}
        assert not before_delete & stored_u01, "u01's events from before the DELETE remain"
        assert after_answer <= stored_u01, "u01's events sent after the erasure are gone"
        with opened(data_dir) as store:
            with store.views.read() as txn:
                assert store.views.pending_purges(txn) == []
            for uid, result in results.items():  # the stored result is what was answered
                first = min(positions[(SITE, uid)])
                assert store.log.erasure_result(first) == (True, result), uid
            for uid in erased:
                for position in positions[(SITE, uid)]:
                    assert store.log.erasure_result(position)[0], f"{uid}: no result stored"
        erased_acked = {eid for eid, (_, uid) in acked.items() if uid in erased}
        assert erased_acked, "the erased users had no acknowledged events"
        server.start()  # read them through the API: no such event
        for eid in sorted(erased_acked)[::max(1, len(erased_acked) // 40)]:
            resp = server.api(f"/api/v1/events/{eid}?si={quote(SITE)}", admin)
            assert resp.status == 404 and resp.json() == {"error": "no such event"}, (eid, resp)
        kept_sample = [eid for eid, (_, uid) in acked.items()
                       if uid not in erased and uid != "u01"][:20] + sorted(after_answer)[:5]
        for eid in kept_sample:
            assert server.api(f"/api/v1/events/{eid}?si={quote(SITE)}", admin).status == 200
        kept_acked = {eid: ids for eid, ids in acked.items() if ids[1] not in erased
                      and (ids[1] != "u01" or eid in after_answer)}
        stored = {e.eid for e in remaining}
        assert not erased_acked & stored, "an erased user's acknowledged event is in the log"
        _final_checks(server, kept_acked, tmp_path)
    finally:
        if load is not None:
            load.stop.set()
        for handle in handles:
            handle.close()
        server.kill()
        _kill_leftovers(data_dir)
    print(f"erased: {erased}; acked {len(acked)}, of erased users {len(erased_acked)}; "
          f"u01 erased while active: {len(before_delete)} before, {len(after_answer)} after")


def _snapshot(load: Load) -> dict:
    out = {}
    for thread in load.threads:
        out.update(dict(thread.acked))
    return out


# ---------------------------------------------------------------------- 5. rebuild-views

def _recovered_result(data_dir, position: int):
    with opened(data_dir) as store:
        done, result = store.log.erasure_result(position)
    assert done and result is not None and result["events"] == 150, result
    return result


def _batch(server, lines: list[dict], **query) -> list[str]:
    resp = server.post("/batch?" + _qs({"si": SITE, **query}), "\n".join(_qs(p) for p in lines))
    assert resp.status == 200, resp
    return resp.text.split()


def test_rebuild_views_on_a_stopped_store_changes_no_record_and_refuses_while_a_folder_runs(
        make_server, tmp_path):
    server = make_server("--fold-batch-events", "50")
    data_dir = server.data_dir
    admin = server.create_token("*")
    rng = random.Random("rebuild")
    try:
        # Long sessions (past the 64 positions of a record's tail: chunks), shared by users;
        # utm_ first touches, increment=false, captured agents and referers.
        for round_ in range(3):
            lines = []
            for k in range(150):
                lines.append({"sid": "long-shared", "uid": ("alice", "bob", "carol")[k % 3],
                              "page": PAGES[k % len(PAGES)], "k": str(k),
                              **(UTM[round_] if k % 50 == 0 else {}),
                              **({"increment": "false"} if k % 13 == 0 else {})})
            _batch(server, lines, round=str(round_))
            _batch(server, [{"sid": "long-alice", "uid": "alice", "n": str(i)} for i in range(70)])
            for _ in range(5):
                assert server.track({"User-Agent": rng.choice(AGENTS),
                                     "Referer": "https://ref.example/"}, si=SITE,
                                    **_event(rng, 0, set())).status == 200
        _batch(server, [_event(rng, i, set()) for i in range(600)])
        _batch(server, [{"sid": f"solo{i}", "n": str(i)} for i in range(30)])  # uid = sid
        _batch(server, [{"n": str(i)} for i in range(10)])  # sid = uid = eid
        _batch(server, [_event(rng, i, set()) for i in range(6000)], bulk="1")
        # A site whose only user is erased: the site goes from the listing too.
        resp = server.post("/batch?si=other.example", "\n".join(
            f"sid=o{i % 3}&uid=olga&page=/o{i}" + ("&increment=false" if i % 4 == 0 else "")
            for i in range(20)))
        assert resp.status == 200, resp
        resp = server.request("DELETE", "/api/v1/users/olga?si=other.example",
                              headers={"Authorization": f"Bearer {admin}"})
        assert resp.status == 200 and resp.json() == {"erased": {
            "events": 20, "sessions_removed": 3, "sessions_refolded": 0}}, resp
        # Erasures: a user of the long shared session (refolded from the others' events), a
        # user whose sessions all go, and a user of the load.
        for uid, at_least in (("alice", 3 * 50 + 3 * 70), ("u02", 1), ("solo3", 1)):
            resp = _erase(server, admin, uid)
            assert resp.status == 200 and resp.json()["erased"]["events"] >= at_least, resp
        _batch(server, [{"sid": "long-shared", "uid": "dave", "n": str(i)} for i in range(80)])

        # The service dies inside an erasure: bob erased from the views, the purge of the
        # log not done. rebuild-views, run before any restart, must purge it too, and give
        # the views an ordinary recovery (the next folder's start) gives.
        answers: list = []
        folder = _folder_of(server.proc.pid, data_dir)
        handles, position, purge = _erase_into_window(server, admin, "bob", answers,
                                                      purged=False)
        try:
            _sigkill(folder, data_dir, server)
            server.kill()
            _wait_exit(folder)
        finally:
            for handle in handles:
                handle.close()
        _wait_none_on(data_dir)
        assert len(purge) == 150
        recovered = tmp_path / "recovered"
        shutil.copytree(data_dir, recovered, ignore=shutil.ignore_patterns("lock.mdb", "metrics"))
        catch_up(recovered)  # the ordinary way: `fold --once`, as a restarted folder would
        done = otserver("rebuild-views", "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        with opened(data_dir) as store:
            assert store.log.erasure_result(position) == (True, _recovered_result(recovered,
                                                                                 position))
        assert [e for e in log_events(data_dir) if e.uid == "bob"] == []
        assert dump_views(data_dir) == dump_views(recovered)
        assert server.event_ids() == RunningServer(recovered).event_ids()
        check_consistent(data_dir, site=SITE)
        catch_up(data_dir)
        before = dump_views(data_dir)
        assert before["pending purges"] == []
        assert len(before["session_chunks"]) >= 3 and before["watermark"] > 1300
        ids_before = server.event_ids()
        check_consistent(data_dir, site=SITE)

        done = otserver("rebuild-views", "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        assert "rebuilt the views from" in done.stderr, done.stderr
        after = dump_views(data_dir)
        for name in before:
            assert after[name] == before[name], f"{name} differs after rebuild-views"
        assert server.event_ids() == ids_before
        check_consistent(data_dir, site=SITE)
        assert len(after["sites"]) == 1, after["sites"]  # other.example went with olga

        # rebuild-views killed half-way (views emptied, partly refolded): the next folder
        # resumes from the watermark the rebuild reached and ends where a whole fold ends.
        tail = before["watermark"]
        rebuild = subprocess.Popen(
            [sys.executable, "-m", "otserver", "rebuild-views", "--data-dir", str(data_dir),
             "--fold-batch-events", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                with opened(data_dir) as store:
                    mark = store.views.watermark()
                if 0 < mark < tail // 2:
                    _sigkill(rebuild.pid, data_dir)
                    break
                assert rebuild.poll() is None, "rebuild-views ended before it could be killed"
                assert time.monotonic() < deadline, "rebuild-views made no progress"
                time.sleep(0.001)
        finally:
            rebuild.kill()
            rebuild.wait(10)
            rebuild.stderr.close()
        assert rebuild.returncode == -signal.SIGKILL
        half = dump_views(data_dir)
        assert 0 < half["watermark"] < tail and half["sessions"] != before["sessions"]
        catch_up(data_dir)
        assert dump_views(data_dir) == before
        check_consistent(data_dir, site=SITE)

        # With a server (and so its folder) running on the directory: refused, nothing changed.
        server.start()
        _wait_folder(server.proc.pid, data_dir)
        deadline = time.monotonic() + 10
        while _lag_now(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        running = dump_views(data_dir)
        refused = otserver("rebuild-views", "--data-dir", str(data_dir))
        assert refused.returncode == 1, (refused.returncode, refused.stderr)
        assert f"a folder is running on {data_dir}" in refused.stderr, refused.stderr
        assert dump_views(data_dir) == running
        for name in before:
            assert running[name] == before[name], f"{name} changed"
        assert server.event_ids() == ids_before
        token = server.create_token(SITE)
        body = _api_ok(server, f"/api/v1/sessions/long-shared?si={quote(SITE)}&limit=1", token)
        assert body["event_count"] == 3 * 50 + 80  # carol's and dave's
        for uid in ("alice", "bob", "u02", "solo3"):
            assert server.api(f"/api/v1/users/{uid}?si={quote(SITE)}", token).status == 404
        assert server.stop() == 0
        _wait_none_on(data_dir)
        views_equal_a_refold(data_dir, tmp_path)
    finally:
        server.kill()
        _kill_leftovers(data_dir)
