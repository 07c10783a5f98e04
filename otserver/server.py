"""Wiring: open the store, start the writer, listen, handle signals, drain.

SIGTERM or SIGINT drains: stop accepting, answer what was received (every event already
submitted is committed first), close connections, close the store, return 0.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections import Counter

import uvloop

from .api import Api
from .model import now_ms
from .handler import Handler
from .live import LiveHub
from .protocol import HttpProtocol
from .store import Store
from .writer import Writer

log = logging.getLogger("otserver")


class Server:
    """What every connection shares: config, handler, writer, counters."""

    def __init__(self, config, store, loop):
        self.config = config
        self.store = store
        self.loop = loop
        self.connections: set = set()
        self.refusals: Counter = Counter()
        self.live = LiveHub(config.live_buffer_bytes)
        self.writer = Writer(store, loop, max_pending=config.max_pending_events,
                             on_commit=self.live.publish)
        self.api = Api(store, config)
        self.handler = Handler(config, self.writer, self.api)

    def start_clock(self) -> None:
        """Check every connection's deadline a few times per shortest timeout."""
        config = self.config
        shortest = min(config.header_timeout_s, config.body_timeout_s, config.keepalive_s)
        self._tick_s = max(0.05, min(1.0, shortest / 4, self.config.live_heartbeat_s))
        self._next_heartbeat = self.loop.time() + self.config.live_heartbeat_s
        self._tick()

    def _tick(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            connection.check_deadline(now)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.live_heartbeat_s
            self.live.heartbeat()
        self._tick_handle = self.loop.call_later(self._tick_s, self._tick)

    def stop_clock(self) -> None:
        self._tick_handle.cancel()

    # ------------------------------------------------------------------ retention

    def start_sweeper(self, clock=now_ms) -> None:
        """Sweep soon after start, then every sweep_interval_s; each step is one writer job
        (a bounded transaction) taking turns with ingest batches."""
        self._clock = clock
        self._sweeping = True
        self.swept = {"events": 0, "sessions": 0, "users": 0, "passes": 0}
        self._pass = dict.fromkeys(("events", "sessions", "users"), 0)
        self._sweep_handle = self.loop.call_later(1.0, self._sweep_step)

    def _sweep_step(self) -> None:
        self._sweep_handle = None
        ttl_ms = int(self.config.ttl_s * 1000)
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
                self._sweep_step()
                return
            self.swept["passes"] += 1
            if any(self._pass.values()):
                log.info("sweeper: deleted %(events)d events, %(sessions)d sessions, "
                         "%(users)d users", self._pass)
            self._pass = dict.fromkeys(self._pass, 0)
        self._sweep_handle = self.loop.call_later(self.config.sweep_interval_s, self._sweep_step)

    def stop_sweeper(self) -> None:
        self._sweeping = False
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()

    def count_refusal(self, status: int) -> None:
        self.refusals[status] += 1

    def log_exception(self, message: str, exc: BaseException | None) -> None:
        log.error("%s: %r", message, exc, exc_info=exc)


def open_store(config, *, readonly: bool = False) -> Store:
    return Store(config.data_dir, initial_bytes=config.initial_store_bytes,
                 max_bytes=config.max_store_bytes, readonly=readonly)


async def serve(config, *, stop: asyncio.Event | None = None) -> int:
    loop = asyncio.get_running_loop()
    store = open_store(config)
    server = Server(config, store, loop)
    listener = await loop.create_server(
        lambda: HttpProtocol(server), config.host, config.port,
        backlog=4096, reuse_address=True, reuse_port=hasattr(socket, "SO_REUSEPORT"))
    server.start_clock()
    server.start_sweeper()
    address = listener.sockets[0].getsockname()
    log.info("otserver listening on http://%s:%d data_dir=%s", address[0], address[1],
             config.data_dir)
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("otserver stopping: draining %d connections", len(server.connections))
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


def run(config) -> int:
    return uvloop.run(serve(config))
