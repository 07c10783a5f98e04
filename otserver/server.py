"""Wiring: open the store, start the writer, listen, handle signals, drain.

SIGTERM or SIGINT drains: stop accepting, answer what was received (every event already
submitted is committed first), close connections, close the store, return 0.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import time
from collections import Counter

import uvloop

from .api import Api
from .model import now_ms
from .handler import Handler
from .live import LiveHub
from .metrics import Metrics, read_snapshots, render, write_snapshot
from .notify import Notifier
from .protocol import HttpProtocol
from .store import Store
from .writer import Writer

log = logging.getLogger("otserver")

SWEEP_SHARE = 0.2  # of the writer's time, at most, while ingest is busy
ENDPOINTS = {path: path.decode() for path in
             (b"/", b"/batch", b"/pixel.gif", b"/healthz", b"/readyz", b"/metrics")}
REFUSAL_CLASSES = {
    b"400": "bad_request", b"401": "unauthorized", b"403": "forbidden", b"404": "not_found",
    b"405": "method_not_allowed", b"413": "body_too_large", b"414": "url_too_long",
    b"415": "unsupported_media_type", b"431": "headers_too_large", b"500": "internal_error",
    b"503": "unavailable", b"505": "http_version",
}


def _api_endpoint(path: bytes) -> str:
    parts = path.split(b"/")
    if len(parts) >= 4 and parts[1] == b"api" and parts[2] == b"v1":
        name = parts[3].decode("ascii", "replace")
        if name in ("events", "sessions", "users", "stats", "live"):
            return f"/api/v1/{name}" + ("/{id}" if len(parts) > 4 else "")
    return "other"


def escape(raw: bytes, limit: int = 200) -> str:
    """Request bytes made safe for a log line: printable ASCII only, the rest as \\xNN."""
    text = "".join(c if " " < c <= "~" and c != "\\" else f"\\x{ord(c):02x}"
                   for c in raw[:limit].decode("latin-1"))
    return text + ("..." if len(raw) > limit else "")


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Server:
    """What every connection shares: config, handler, writer, counters."""

    def __init__(self, config, store, loop, *, workers: int = 1):
        self.config = config
        self.workers = workers
        self.metrics_dir = os.path.join(config.data_dir, "metrics")
        self.store = store
        self.loop = loop
        self.connections: set = set()
        self.metrics = Metrics()
        self.live = LiveHub(config.live_buffer_bytes)
        self.writer = Writer(store, loop, max_pending=config.max_pending_events,
                             on_commit=self._committed)
        self.api = Api(store, config)
        self.handler = Handler(config, self.writer, self.api, ops=self)
        self.swept = {"events": 0, "sessions": 0, "users": 0, "passes": 0}
        self._sweep_handle = None
        self._sweeping = False
        self._logged_refusals: Counter = Counter()
        self._next_log = 0.0

    def _committed(self, events, seconds: float) -> None:
        self.metrics.observe_commit(events, seconds)
        self.live.publish(events)

    # ------------------------------------------------------------------ operations

    def count(self, path: bytes, status: bytes, peer: str | None = None) -> None:
        """One answer sent (or refused at the transport): by endpoint and status."""
        if self.config.access_log and peer is not None:
            log.info("access %s %s %s", peer, escape(path), status.decode())
        endpoint = ENDPOINTS.get(path)
        if endpoint is None:
            endpoint = _api_endpoint(path)
        self.metrics.requests[endpoint + " " + status.decode()] += 1
        if status[0] >= 0x34:  # 4xx and 5xx
            self.metrics.refusals[REFUSAL_CLASSES.get(status, status.decode())] += 1

    def count_timeout(self) -> None:
        self.metrics.refusals["timeout"] += 1

    def not_ready(self) -> str | None:
        """Why the store cannot take writes now, or None."""
        if not self.writer.alive():
            return "the writer thread has stopped"
        stalled = self.writer.stalled_for()
        if stalled > self.config.writer_stall_s:
            return f"no commit has finished for {stalled:.0f} s"
        return None

    def metrics_text(self) -> bytes:
        own = self.metrics.snapshot(self)
        snapshots = read_snapshots(self.metrics_dir, os.getpid(), own)
        info = self.store.env.info()
        store_info = {
            "file_bytes": _file_size(os.path.join(self.config.data_dir, "data.mdb")),
            "used_bytes": (info["last_pgno"] + 1) * self.store.page_size,
            "max_bytes": self.store.max_bytes,
        }
        return render(snapshots, store_info)

    def _log_refusals(self) -> None:
        """A line a minute at most with the refusals since the last one, by class."""
        fresh = self.metrics.refusals - self._logged_refusals
        if fresh:
            log.warning("refused in the last minute: %s",
                        ", ".join(f"{name}={n}" for name, n in sorted(fresh.items())))
            self._logged_refusals = Counter(self.metrics.refusals)

    def start_clock(self) -> None:
        """Check every connection's deadline a few times per shortest timeout."""
        config = self.config
        shortest = min(config.header_timeout_s, config.body_timeout_s, config.keepalive_s)
        self._tick_s = max(0.05, min(1.0, shortest / 4, self.config.live_heartbeat_s))
        self._next_heartbeat = self.loop.time() + self.config.live_heartbeat_s
        self._next_snapshot = 0.0
        self._next_log = self.loop.time() + 60
        self._tick()

    def _tick(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            connection.check_deadline(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.live_heartbeat_s
            self.live.heartbeat()
        if now >= self._next_log:
            self._next_log = now + 60
            self._log_refusals()
        if self.workers > 1 and now >= self._next_snapshot and self.not_ready() is None:
            # Fresh only while healthy: the supervisor's watchdog reads its age.
            self._next_snapshot = now + 1.0
            write_snapshot(self.metrics_dir, self.metrics.snapshot(self))
        self._tick_handle = self.loop.call_later(self._tick_s, self._tick)

    def stop_clock(self) -> None:
        self._tick_handle.cancel()

    # ------------------------------------------------------------------ retention

    def start_sweeper(self, clock=now_ms) -> None:
        """Sweep soon after start, then every sweep_interval_s; each step is one writer job
        (a bounded transaction) taking turns with ingest batches."""
        self._clock = clock
        self._sweeping = True
        self._pass = dict.fromkeys(("events", "sessions", "users"), 0)
        self._sweep_handle = self.loop.call_later(1.0, self._sweep_step)

    def _sweep_step(self) -> None:
        self._sweep_handle = None
        ttl_ms = int(self.config.ttl_s * 1000)
        self._step_started = time.monotonic()
        self.writer.run_job(self.store.sweep_step,
                            (self._clock(), ttl_ms, self.config.sweep_step_limit), self._swept)

    def _swept(self, result, error) -> None:
        if not self._sweeping:
            return
        if error is not None:
            log.error("sweeper step failed: %s", error)
        else:
            for name in self._pass:
                self._pass[name] += result[name]
                self.swept[name] += result[name]
            if result["more"]:
                # While ingest is busy, the sweeper takes at most SWEEP_SHARE of the writer's
                # time: after a step of t seconds it waits t * (1 - share) / share.
                if self.writer.busy_recently():
                    took = time.monotonic() - self._step_started
                    self._sweep_handle = self.loop.call_later(
                        took * (1 - SWEEP_SHARE) / SWEEP_SHARE, self._sweep_step)
                else:
                    self._sweep_step()
                return
            self.swept["passes"] += 1
            # A reader killed while we run (a backup, an export) would pin old pages, and the
            # file would grow by everything swept until a restart: clear dead readers' slots.
            cleared = self.store.env.reader_check()
            if cleared:
                log.warning("cleared %d stale reader slot(s) left by dead processes", cleared)
            if any(self._pass.values()):
                log.info("sweeper: deleted %(events)d events, %(sessions)d sessions, "
                         "%(users)d users", self._pass)
            self._pass = dict.fromkeys(self._pass, 0)
        self._sweep_handle = self.loop.call_later(self.config.sweep_interval_s, self._sweep_step)

    def stop_sweeper(self) -> None:
        self._sweeping = False
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()


    def log_exception(self, message: str, exc: BaseException | None) -> None:
        log.error("%s: %r", message, exc, exc_info=exc)


def open_store(config, *, readonly: bool = False) -> Store:
    return Store(config.data_dir, initial_bytes=config.initial_store_bytes,
                 max_bytes=config.max_store_bytes, readonly=readonly)


async def serve(config, *, workers: int = 1, sweeper: bool = True, notifier=None) -> int:
    """One serving process. `workers` > 1: a worker of a supervisor (metrics shared by file);
    `sweeper`: whether this process runs the retention sweeper."""
    loop = asyncio.get_running_loop()
    notifier = notifier or Notifier.from_env()
    store = open_store(config)
    server = Server(config, store, loop, workers=workers)
    tls = tls_context(config)
    listener = await loop.create_server(
        lambda: HttpProtocol(server), config.host, config.port, ssl=tls,
        backlog=4096, reuse_address=True, reuse_port=hasattr(socket, "SO_REUSEPORT"))
    server.start_clock()
    if sweeper:
        server.start_sweeper()
    if workers > 1:
        server.live.follow_commit_log(store, loop)
    address = listener.sockets[0].getsockname()
    log.info("otserver listening on %s://%s:%d data_dir=%s", "https" if tls else "http",
             address[0], address[1], config.data_dir)
    notifier.ready(f"listening on {address[0]}:{address[1]}")
    watchdog = _Watchdog(server, notifier)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        notifier.stopping(f"draining {len(server.connections)} connections")
        log.info("otserver stopping: draining %d connections", len(server.connections))
        watchdog.stop()
        server.live.stop()
        listener.close()
        server.stop_sweeper()
        for connection in list(server.connections):
            connection.shutdown()
        await server.writer.drain()
        for _ in range(100):  # up to 5 s for answers to leave
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        server.stop_clock()
        server.writer.close()
        store.close()
        log.info("otserver stopped: %d events stored in %d commits",
                 server.writer.events_stored, server.writer.commits)
    return 0


class _Watchdog:
    """WATCHDOG=1 at half of WATCHDOG_USEC, only while the loop runs (this callback is proof)
    and the writer is not wedged (`not_ready`); STATUS= with a summary every ping."""

    def __init__(self, server, notifier):
        self.server = server
        self.notifier = notifier
        self.interval = notifier.watchdog_interval_s
        self.handle = None
        if self.interval:
            self.handle = server.loop.call_later(self.interval, self.ping)

    def ping(self) -> None:
        server = self.server
        problem = server.not_ready()
        if problem is None:
            self.notifier.watchdog()
            self.notifier.status(f"{server.writer.events_stored} events stored, "
                                 f"{len(server.connections)} connections")
        else:
            self.notifier.status(f"not pinging the watchdog: {problem}")
            log.error("watchdog withheld: %s", problem)
        self.handle = server.loop.call_later(self.interval, self.ping)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def tls_context(config):
    """An SSL context when --tls-cert is set (the same protocol code serves HTTPS)."""
    if not config.tls_cert:
        if config.tls_key:
            raise ValueError("--tls-key needs --tls-cert")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key or None)
    return context


def run(config, workers: int = 1) -> int:
    if workers <= 1:
        return uvloop.run(serve(config))
    from .supervisor import supervise
    return supervise(config, workers)
