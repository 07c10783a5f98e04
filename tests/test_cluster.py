"""Beyond one machine (SPEC 7): the outbox to NATS JetStream, and nodes whose views are folded
from the stream (`--cluster`). Real nats-server processes on loopback ports (natsfixture.py),
real otserver nodes, real faults: NATS killed and brought back while a node takes events, a
node killed -9 mid-publish, a NATS cluster member killed under load through two nodes.

What each checks is the issue's promise: every acknowledged eid is in the stream exactly once;
a node's `200` never waits for NATS; cluster nodes hold equal views, record by record, equal to
a fold of the stream from scratch; an erasure on one node erases the user on all.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.parse
from pathlib import Path

from conftest import RunningServer, run_cli, wait_until
from natsfixture import nats_cluster, nats_server, stream_messages  # noqa: F401
from natsfixture import wait_stream_count
from storecheck import check_consistent, dump_views, opened, views_equal_a_refold

from otserver.model import LogEntry, key_to_eid
from otserver.views import NAMES as VIEW_NAMES

SITE = "cluster.example"
STREAM = "OTSERVER"


# ---------------------------------------------------------------------- helpers

def node(tmp_path, name: str, urls: str, *extra, cluster: bool = False) -> RunningServer:
    flags = ["--nats", urls, "--node-id", name, *extra]
    if cluster:
        flags.append("--cluster")
    return RunningServer(tmp_path / f"node-{name}", flags).start(timeout=30)


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def crash(server: RunningServer) -> None:
    """kill -9 of a whole node: its folder, relay and log writer first, then the server, so
    none of them gets to run another line (a machine losing power)."""
    for child in children_of(server.proc.pid):  # started by the server we started
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.kill()


def node_log_eids(data_dir) -> list[str]:
    """The eids of the node's own log (what it acknowledged), in its order."""
    with opened(data_dir) as store:
        with store.log.read() as txn:
            return [LogEntry(p, raw).eid for p, raw in store.log.entries_after(txn, 0, 1 << 62)
                    if LogEntry(p, raw).is_event]


def stream_eids(urls: str) -> list[str]:
    out = []
    for _, headers, data in stream_messages(urls, STREAM):
        eid = key_to_eid(data[9:25])
        assert headers.get("Nats-Msg-Id") == eid, (headers, eid)
        out.append(eid)
    return out


def copy_entries(data_dir) -> list[tuple[int, bytes]]:
    with opened(data_dir) as store:
        assert store.cluster, "not a cluster node's directory"
        with store.events.read() as txn:
            return [(p, bytes(raw)) for p, raw in store.events.entries_after(txn, 0, 1 << 62)]


def metric(server: RunningServer, name: str) -> float:
    text = server.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


class Load(threading.Thread):
    """Events to one node on a keep-alive connection until stopped (or `limit` sent);
    records each acknowledged eid. Sessions are shared between loads with the same `sids`."""

    def __init__(self, server: RunningServer, tag: str, limit: int = 10**9, sids: int = 20,
                 pause: float = 0.0):
        super().__init__(daemon=True)
        self.server, self.tag, self.limit, self.sids, self.pause = server, tag, limit, sids, pause
        self.acked: list[str] = []
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import http.client
        conn = None
        n = 0
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and n < self.limit and time.monotonic() < deadline:
            props = {"si": SITE, "sid": f"s{n % self.sids}", "uid": f"u{n % self.sids}",
                     "src": self.tag, "n": str(n)}
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
                conn.request("GET", "/?" + urllib.parse.urlencode(props))
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status == 200:
                    self.acked.append(body)
                else:
                    self.errors += 1
            except OSError:
                self.errors += 1
                conn = None
                time.sleep(0.05)
            n += 1
            if self.pause:
                time.sleep(self.pause)
        if conn is not None:
            conn.close()


def wait_copied(server: RunningServer, urls: str, timeout: float = 60.0) -> None:
    """Until the node's copy of the stream reaches the stream's last sequence and its views
    have folded it all."""
    last = stream_messages(urls, STREAM)[-1][0]

    def caught_up() -> bool:
        with opened(server.data_dir) as store:
            return (store.events.last_position() >= last
                    and store.views.watermark() >= store.events.last_position())
    wait_until(caught_up, timeout=timeout)


# ---------------------------------------------------------------------- the outbox

def test_outbox_publishes_every_event_once_in_log_order(tmp_path, nats_server):
    server = node(tmp_path, "a", nats_server.url)
    try:
        acked = [server.track(si=SITE, sid=f"s{i % 7}", uid=f"u{i % 5}", n=str(i)).text
                 for i in range(200)]
        body = "\n".join(f"si={SITE}&sid=b{i}&n={i}" for i in range(100))
        batch = server.post("/batch", body)
        assert batch.status == 200, batch.text
        acked += batch.text.split()
        wait_stream_count(nats_server.url, STREAM, 300)
        messages = stream_messages(nats_server.url, STREAM)
        assert [key_to_eid(data[9:25]) for _, _, data in messages] == node_log_eids(
            server.data_dir) == acked
        assert all(set(headers) == {"Nats-Msg-Id"} for _, headers, _ in messages)
        assert [seq for seq, _, _ in messages] == list(range(1, 301))
        # The payload is the log entry itself: the stream holds everything a node folds.
        with opened(server.data_dir) as store, store.log.read() as txn:
            assert [data for _, _, data in messages] == [
                bytes(raw) for _, raw in store.log.entries_after(txn, 0, 1000)]
        wait_until(lambda: metric(server, "otserver_outbox_lag_events") == 0, timeout=10)
        assert metric(server, "otserver_nats_connected") == 1
        assert server.get("/readyz").status == 200
        with opened(server.data_dir) as store:
            assert store.log.outbox_cursor() == (300, 300)
    finally:
        assert server.stop() == 0


def test_events_acknowledged_while_nats_is_down_reach_the_stream_once(tmp_path, nats_server):
    server = node(tmp_path, "a", nats_server.url)
    try:
        first = [server.track(si=SITE, sid="s", n=str(i)).text for i in range(50)]
        wait_stream_count(nats_server.url, STREAM, 50)
        nats_server.kill()
        # Ingest goes on: every 200 is the local synced append, NATS or not.
        started = time.monotonic()
        during = [server.track(si=SITE, sid="s", n=str(50 + i)) for i in range(200)]
        took = time.monotonic() - started
        assert all(r.status == 200 for r in during), [r.status for r in during][:5]
        assert took < 20, f"200 events took {took:.1f} s with NATS down"
        during = [r.text for r in during]

        def says_nats() -> bool:
            ready = server.get("/readyz")
            return ready.status == 503 and "NATS" in ready.text
        wait_until(says_nats, timeout=15)
        wait_until(lambda: metric(server, "otserver_outbox_lag_events") >= 200, timeout=10)
        assert metric(server, "otserver_nats_connected") == 0
        nats_server.restart()
        wait_stream_count(nats_server.url, STREAM, 250, timeout=60)
        wait_until(lambda: metric(server, "otserver_outbox_lag_events") == 0, timeout=30)
        eids = stream_eids(nats_server.url)
        assert eids == first + during  # each once, in log order
        wait_until(lambda: server.get("/readyz").status == 200, timeout=15)
    finally:
        assert server.stop() == 0


def test_a_node_killed_mid_publish_and_restarted_publishes_each_event_once(tmp_path,
                                                                          nats_server):
    server = node(tmp_path, "a", nats_server.url)
    acked: list[str] = []
    duplicates = 0  # sent again by a restarted relay (its cursor behind what was stored)
    for round_ in range(3):
        load = Load(server, f"r{round_}")
        load.start()
        wait_until(lambda: len(load.acked) > 300 + 100 * round_, timeout=30)
        crash(server)  # mid-load: entries in flight to the stream, the cursor behind them
        load.stop.set()
        load.join(15)
        acked += load.acked
        server.start(timeout=30)
        wait_until(lambda: metric(server, "otserver_outbox_lag_events") == 0, timeout=30)
        duplicates += metric(server, "otserver_outbox_duplicates_total")
    try:
        stored = node_log_eids(server.data_dir)
        assert set(acked) <= set(stored)  # acknowledged: on disk
        wait_stream_count(nats_server.url, STREAM, len(stored), timeout=60)
        wait_until(lambda: metric(server, "otserver_outbox_lag_events") == 0, timeout=30)
        eids = stream_eids(nats_server.url)
        assert len(eids) == len(set(eids)), "an event is in the stream twice"
        assert eids == stored  # every stored event once, nothing else, in log order
        print(f"acked {len(acked)}, stored {len(stored)}, in the stream {len(eids)}, "
              f"sent again after the kills and stored once: {duplicates:.0f}")
    finally:
        assert server.stop() == 0


# ---------------------------------------------------------------------- cluster views

def test_two_nodes_fold_the_same_views_through_a_nats_node_failure(tmp_path, nats_cluster):
    urls = nats_cluster.urls
    a = node(tmp_path, "a", urls, "--nats-replicas", "3", cluster=True)
    b = node(tmp_path, "b", urls, "--nats-replicas", "3", cluster=True)
    loads = [Load(a, "a"), Load(b, "b"), Load(a, "a2"), Load(b, "b2")]  # sessions shared
    try:
        for load in loads:
            load.start()
        wait_until(lambda: sum(len(load.acked) for load in loads) > 1500, timeout=60)
        nats_cluster.servers[1].kill()  # a NATS node, maybe the stream's leader, mid-load
        before = sum(len(load.acked) for load in loads)
        wait_until(lambda: sum(len(load.acked) for load in loads) > before + 1500, timeout=60)
        for load in loads:
            load.stop.set()
        for load in loads:
            load.join(15)
        acked = [eid for load in loads for eid in load.acked]
        assert all(load.errors == 0 for load in loads), [load.errors for load in loads]

        # Read your writes on the node that acknowledged; any node answers any read.
        token_a, token_b = a.create_token(SITE), b.create_token(SITE)
        mine = b.track(si=SITE, sid="s0", uid="u0", src="last").text
        answers = []  # a 503 (past --max-read-wait while the relay recovers) says retry

        def answered() -> bool:
            answers.append(b.api(f"/api/v1/sessions/s0?si={SITE}&limit=1000", token_b))
            return answers[-1].status != 503
        wait_until(answered, timeout=30, interval=0.5)
        assert answers[-1].status == 200 and mine in answers[-1].text
        wait_copied(a, urls)
        wait_copied(b, urls)
        on_a = a.api(f"/api/v1/sessions/s0?si={SITE}&limit=1000", token_a).json()
        on_b = b.api(f"/api/v1/sessions/s0?si={SITE}&limit=1000", token_b).json()
        assert on_a == on_b
        assert {e["event"]["src"] for e in on_a["events"]} >= {"a", "b"}  # one session, two nodes
        acked.append(mine)
    finally:
        for load in loads:
            load.stop.set()
        assert a.stop() == 0
        assert b.stop() == 0

    eids = stream_eids(urls)
    assert len(eids) == len(set(eids)), "an eid is in the stream twice"
    assert set(acked) <= set(eids), f"{len(set(acked) - set(eids))} acknowledged events lost"
    assert set(eids) == set(node_log_eids(a.data_dir)) | set(node_log_eids(b.data_dir))
    # Both copies are the stream, message for message; both views are exact folds of it.
    stream = [(seq, data) for seq, _, data in stream_messages(urls, STREAM)]
    assert copy_entries(a.data_dir) == stream == copy_entries(b.data_dir)
    check_consistent(a.data_dir, site=SITE)
    check_consistent(b.data_dir, site=SITE)
    views_a, views_b = dump_views(a.data_dir), dump_views(b.data_dir)
    for name in (*VIEW_NAMES, "watermark"):
        assert views_a[name] == views_b[name], f"view {name} differs between the nodes"
    views_equal_a_refold(a.data_dir, tmp_path)  # = a fold of the stream from scratch
    print(f"acked {len(acked)}, in the stream {len(eids)}")


def test_an_erasure_on_one_node_erases_the_user_on_both(tmp_path, nats_server):
    urls = nats_server.url
    a = node(tmp_path, "a", urls, cluster=True)
    b = node(tmp_path, "b", urls, cluster=True)
    try:
        for i in range(10):
            assert a.track(si=SITE, sid="gone-1", uid="gone", n=str(i)).status == 200
            assert b.track(si=SITE, sid="gone-2", uid="gone", n=str(i)).status == 200
            assert b.track(si=SITE, sid="kept", uid="kept", n=str(i)).status == 200
        token_a, token_b = a.create_token(SITE), b.create_token(SITE)
        wait_until(lambda: b.api(f"/api/v1/users/gone?si={SITE}", token_b).status == 200 and
                   b.api(f"/api/v1/users/gone?si={SITE}", token_b).json()["event_count"] == 20,
                   timeout=15)
        erased = a.request("DELETE", f"/api/v1/users/gone?si={SITE}",
                           headers={"Authorization": f"Bearer {token_a}"})
        assert erased.status == 200, erased.text
        assert erased.json()["erased"]["events"] == 20
        assert a.api(f"/api/v1/users/gone?si={SITE}", token_a).status == 404
        wait_until(lambda: b.api(f"/api/v1/users/gone?si={SITE}", token_b).status == 404,
                   timeout=15)
        for sid in ("gone-1", "gone-2"):
            assert b.api(f"/api/v1/sessions/{sid}?si={SITE}", token_b).status == 404
            assert a.api(f"/api/v1/sessions/{sid}?si={SITE}", token_a).status == 404
        assert b.api(f"/api/v1/users/kept?si={SITE}", token_b).json()["event_count"] == 10
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    for server in (a, b):  # no erased event left in a node's own log nor in its copy
        with opened(server.data_dir) as store:
            for part in (store.log, store.events):
                with part.read() as txn:
                    uids = {LogEntry(p, raw).uid for p, raw in part.entries_after(txn, 0, 1 << 62)
                            if LogEntry(p, raw).is_event}
                assert "gone" not in uids, (server.data_dir, part.path, uids)
                if part is store.events:
                    assert uids == {"kept"}
        check_consistent(server.data_dir, site=SITE)
    assert dump_views(a.data_dir)["users"] == dump_views(b.data_dir)["users"]


def test_retention_and_rebuild_views_on_a_cluster_node(tmp_path, nats_server):
    urls = nats_server.url
    a = node(tmp_path, "a", urls, cluster=True)
    try:
        for i in range(30):
            assert a.track(si=SITE, sid=f"s{i % 3}", n=str(i)).status == 200
        wait_stream_count(urls, STREAM, 30)
        wait_copied(a, urls)
    finally:
        assert a.stop() == 0
    # rebuild-views on a stopped node folds its copy of the stream again: the same views.
    views_equal_a_refold(a.data_dir, tmp_path)
    before = dump_views(a.data_dir)
    done = run_cli("rebuild-views", "--data-dir", str(a.data_dir))
    assert done.returncode == 0, done.stderr
    assert dump_views(a.data_dir)["sessions"] == before["sessions"]
    # Retention: the copy, the views and the node's published entries all expire.
    time.sleep(1.1)
    done = run_cli("sweep", "--ttl", "1s", "--allow-short-ttl", "--data-dir", str(a.data_dir))
    assert done.returncode == 0, done.stderr
    assert "swept 30 events, 3 sessions, 3 users" in done.stdout, done.stdout
    with opened(a.data_dir) as store:
        assert store.events.event_count() == 0
        assert store.log.event_count() == 0
        assert store.views.counts()["sessions"] == 0


# ---------------------------------------------------------------------- settings

def test_cluster_settings_that_cannot_be_meant_are_refused(tmp_path, nats_server):
    done = run_cli("serve", "--cluster", "--data-dir", str(tmp_path / "x"), "--port", "0")
    assert done.returncode != 0 and "--cluster" in done.stderr and "--nats" in done.stderr
    done = run_cli("serve", "--nats", nats_server.url, "--node-id", "a.b", "--port", "0",
                   "--data-dir", str(tmp_path / "x"))
    assert done.returncode != 0 and "--node-id" in done.stderr
    a = node(tmp_path, "a", nats_server.url, cluster=True)
    assert a.stop() == 0
    # A cluster node's directory stays one: served alone, its views would name the wrong log.
    done = run_cli("serve", "--port", "0", "--data-dir", str(a.data_dir))
    assert done.returncode != 0 and "--cluster" in done.stderr, done.stderr
    assert not Path(tmp_path / "x").exists()
