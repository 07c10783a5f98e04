"""Wiring of one serving process: open the store, start the writer, the live hub and the
reader threads, listen, handle signals, drain. (`cli.serve` starts the folder process beside
it, or the supervisor and its workers.)

SIGTERM or SIGINT drains: stop accepting, answer what was received (every event already
submitted is committed first), close connections, close the store, return 0; then the folder
catches up with the log and stops.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import ssl
import time
from collections import Counter

from .api import Api, ReadPool
from .errors import PortInUse
from . import tallies
from .folder import ViewWatch, folder_running, read_folder_snapshot
from .guards import Guards
from .handler import Handler
from .live import LiveHub
from .metrics import Metrics, read_snapshots, render, write_snapshot
from .model import entry_ts, now_ms, site_key
from .notify import Notifier
from .relay import read_relay_snapshot
from .protocol import Context, HttpProtocol
from .store import Store
from .writer import Writer

log = logging.getLogger("otserver")

class Server:
    """What every connection shares: config, handler, writer, views watch, counters."""

    def __init__(self, config, store: Store, loop, *, workers: int = 1, folder=None,
                 relay=None):
        self.config = config
        self.workers = workers
        self.metrics_dir = os.path.join(config.data_dir, "metrics")
        self.store = store
        self.loop = loop
        self.folder = folder  # this process's FolderProcess (None: the supervisor has it)
        self.relay = relay  # ... and its relay process (--nats)
        self.connections: set = set()
        self.metrics = Metrics()
        node_log = store.log if store.cluster else None
        self.watch = ViewWatch(store.events, store.views, loop, config, node_log=node_log)
        self.writer = Writer(config, loop, max_pending=config.max_pending_events,
                             on_commit=self._committed)
        self.pool = ReadPool(loop)
        self.api = Api(store.events, store.views, config, watch=self.watch, pool=self.pool,
                       writer=self.writer, node_log=node_log)
        self.live = LiveHub(store.events, loop, config.live_buffer_bytes, replay=self.api.replay)
        self.guards = Guards(config, store.log, held_of=self._held)
        self.handler = Handler(config, self.api, not_ready=self.not_ready,
                               metrics_text=self.metrics_text, watch=self.watch,
                               guards=self.guards)
        self.context = Context(config, self.handler, self.writer, loop, self.metrics, self.live,
                               self.connections)
        self._logged_refusals: Counter = Counter()
        self._next_log = 0.0

    def _committed(self, count: int, seconds: float, lock_seconds: float, last: int) -> None:
        self.metrics.observe_commit(count, seconds)
        self.watch.note_tail(last)
        self.live.committed()

    def _held(self, sites: list[str]) -> dict[str, int]:
        """Events each site holds within the TTL, as the views count them (quotas)."""
        first_day = (now_ms() - int(self.config.ttl_s * 1000)) // tallies.DAY_MS
        views = self.store.views
        with views.read() as txn:
            return {si: tallies.events_since(txn, views.db, site_key(si), first_day)
                    for si in sites}

    # ------------------------------------------------------------------ operations

    def writer_problem(self) -> str | None:
        """Why the log cannot take appends now, or None (what the watchdog pings follow)."""
        if not self.writer.alive():
            return "the log writer process is not running"
        stalled = self.writer.stalled_for()
        if stalled > self.config.writer_stall_s:
            return f"no commit has finished for {stalled:.0f} s"
        return None

    def not_ready(self) -> str | None:
        """Why the server cannot take writes or answer reads now, or None (/readyz)."""
        return self.writer_problem() or self.watch.problem() or self.relay_problem()

    def relay_problem(self) -> str | None:
        """With --nats: why this node's events are not reaching the stream, or None."""
        if not self.config.nats:
            return None
        snap = read_relay_snapshot(self.metrics_dir)
        if snap is None or time.time() - snap["at"] > 5.0:
            return "the relay to NATS is not running"
        if not snap["connected"]:
            since = snap.get("disconnected_at") or snap["at"]
            return (f"not connected to NATS for {time.time() - since:.0f} s "
                    f"({snap['error'] or 'reconnecting'}); the outbox holds "
                    f"{snap['lag_events']} events")
        behind = snap.get("stream_last", 0) - snap.get("copy_tail", 0)
        if "copy_tail" in snap and behind > self.config.max_view_lag:
            return f"catching up with the stream: {behind} messages behind"
        return None

    def metrics_text(self) -> bytes:
        own = self._snapshot()
        snapshots = read_snapshots(self.metrics_dir, os.getpid(), own)
        store = self.store
        store_info = {"max_bytes": store.max_bytes}
        for name, env in store.environments():
            store_info[name] = {"file_bytes": env.file_bytes(), "used_bytes": env.used_bytes()}
        self.watch.refresh()
        with store.events.read() as txn:
            raw = store.events.raw(txn, self.watch.watermark + 1)
        views = {"tail": self.watch.tail, "watermark": self.watch.watermark,
                 "lag_seconds": max(0.0, now_ms() - entry_ts(raw)) / 1000 if raw else 0.0,
                 "folder_up": folder_running(self.config.data_dir)}
        relay = read_relay_snapshot(self.metrics_dir) if self.config.nats else None
        return render(snapshots, store_info, read_folder_snapshot(self.metrics_dir), views,
                      relay)

    def _snapshot(self) -> dict:
        snapshot = self.metrics.snapshot(self.writer, len(self.connections), self.live)
        snapshot["guards"] = self.guards.snapshot()
        return snapshot

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
        self.watch.refresh()  # keeps the lag that ingest's back-pressure reads fresh
        self.guards.tick()
        if self.folder is not None:
            self.folder.check()
        if self.relay is not None:
            self.relay.check()
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.live_heartbeat_s
            self.live.heartbeat()
        if now >= self._next_log:
            self._next_log = now + 60
            self._log_refusals()
        if self.workers > 1 and now >= self._next_snapshot and self.writer_problem() is None:
            # Fresh only while healthy: the supervisor's watchdog reads its age.
            self._next_snapshot = now + 1.0
            write_snapshot(self.metrics_dir, self._snapshot())
        self._tick_handle = self.loop.call_later(self._tick_s, self._tick)

    def stop_clock(self) -> None:
        self._tick_handle.cancel()


async def serve(config, *, workers: int = 1, notifier=None, folder=None, relay=None) -> int:
    """One serving process. `workers` > 1: a worker of a supervisor (metrics shared by file);
    `folder`: the folder process this one started and looks after (single-process mode)."""
    from .agents import warm
    from .store import open_store
    loop = asyncio.get_running_loop()
    notifier = notifier or Notifier.from_env()
    store = open_store(config)
    server = Server(config, store, loop, workers=workers, folder=folder, relay=relay)
    await server.writer.start()
    tls = tls_context(config)
    stop = asyncio.Event()  # before anyone can learn the port: a SIGTERM from then on drains
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # The read API tells what each User-Agent is: build that before listening (after the
    # store is open, so a replaced worker clears its predecessor's reader slots at once, and
    # after the signal handlers, so a SIGTERM meanwhile drains).
    warm()
    try:
        # Only a supervisor's workers share a port; a lone server must own it.
        listener = await loop.create_server(
            lambda: HttpProtocol(server.context), config.host, config.port, ssl=tls,
            backlog=4096, reuse_address=True, reuse_port=workers > 1)
    except OSError as exc:
        await server.writer.close()
        server.pool.close()
        store.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(config.host, config.port) from None
        raise
    server.start_clock()
    server.live.start()
    address = listener.sockets[0].getsockname()
    log.info("otserver listening on %s://%s:%d data_dir=%s", "https" if tls else "http",
             address[0], address[1], config.data_dir)
    if config.require_site and not server.guards.registry.sites:
        log.warning("--require-site is on and no site is registered: every event is refused "
                    "(403) until one is added with `otserver site add SITE`")
    notifier.ready(f"listening on {address[0]}:{address[1]}")
    watchdog = _Watchdog(server, notifier)
    try:
        await stop.wait()
    finally:
        notifier.stopping(f"draining {len(server.connections)} connections")
        log.info("otserver stopping: draining %d connections", len(server.connections))
        watchdog.stop()
        server.live.stop()
        listener.close()
        for connection in list(server.connections):
            connection.shutdown()
        await server.writer.drain()
        for _ in range(100):  # up to 5 s for answers to leave
            if not server.connections:
                break
            await asyncio.sleep(0.05)
        server.watch.stop()
        server.stop_clock()
        await server.writer.close()
        server.pool.close()
        store.close()
        log.info("otserver stopped: %d events stored in %d commits",
                 server.writer.events_stored, server.writer.commits)
    return 0


class _Watchdog:
    """WATCHDOG=1 at half of WATCHDOG_USEC, only while the loop runs (this callback is proof)
    and the writer is not wedged (`writer_problem`); STATUS= with a summary every ping."""

    def __init__(self, server, notifier):
        self.server = server
        self.notifier = notifier
        self.interval = notifier.watchdog_interval_s
        self.handle = None
        if self.interval:
            self.handle = server.loop.call_later(self.interval, self.ping)

    def ping(self) -> None:
        server = self.server
        problem = server.writer_problem()
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
