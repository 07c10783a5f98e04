"""The relay: a node's link to a NATS JetStream stream (SPEC 7). Its own process (`otserver
relay`), started by `serve` (or the supervisor) beside the folder when `--nats` is set; one per
data directory (it holds `relay.lock`).

Two parts on one connection:
- `Outbox` publishes every entry of the node's log to the stream, in log order, subject
  `<stream>.<node id>`, the entry's bytes as the payload and its id (the eid; an erasure's own
  id) as `Nats-Msg-Id` (its only header: the subject names the node). What gathered in the log
  is sent every GATHER_S, up to WINDOW entries in flight; the cursor (log meta `outbox`: the
  last position of an unbroken run of acknowledged entries, and its stream sequence) is saved
  every SAVE_EVERY_S. After a crash, a timeout or a broken connection the outbox sends again from
  the cursor: at least once on the wire, and the stream's duplicate window (DUPLICATE_WINDOW_S)
  stores each id once. Ingest never waits for any of this: a `200` is the local synced append.
- `Copier` (with `--cluster`) copies the stream into `<data dir>/stream` (log.copy_in: an event
  log whose positions are the stream's sequences), in stream order, from its own tail: the
  folder folds that copy, so every node folds the same entries in the same order.

`<data dir>/outbox.acked` (Acked) holds the outbox's progress as the readers of this node need
it: a read that waits for its writes on a cluster node waits until the outbox has passed the
log position it wants and the views have passed that entry's stream sequence.

Invariants:
- The cursor never passes an entry the stream has not acknowledged, and never moves back.
- Exactly one relay per data directory publishes (the lock): two would each keep a cursor.
- An id appears once in the copy (copy_in skips what it holds), even when the stream holds it
  twice (published again after the duplicate window, e.g. from a restored backup).
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import signal
import socket
import ssl
import time
from collections import deque

from .child import ChildProcess
from .log import EventLog, copy_path, log_path
from .metrics import write_snapshot
from .model import ID_END, KIND_END, entry_ts, key_to_eid, now_ms

log = logging.getLogger("otserver")
WINDOW = 4096  # entries published and not yet acknowledged
READ_BATCH = 1024  # entries read from the log at a time
ACK_TIMEOUT_S = 2.0  # the oldest entry in flight unacknowledged this long: send again
SAVE_EVERY_S = 0.2  # the durable cursor, at most this often
GATHER_S = 0.01  # between looks at the log's tail while not behind: one write carries many
# entries (a write to the NATS socket per few entries cost the relay a third of its time)
COPY_BATCH = 2000  # stream messages per copy transaction, at most
STALL_S = 10.0  # the copy makes no progress while the stream is ahead: subscribe again
DUPLICATE_WINDOW_S = 600.0  # the stream's de-duplication window, when otserver creates it
LOCK_NAME = "relay.lock"
ACKED_NAME = "outbox.acked"
SNAPSHOT_NAME = "relay.json"


def node_name(config) -> str:
    """--node-id, or the host name made a subject token."""
    if config.node_id:
        return config.node_id
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name[:64] or "node"


def subject_of(config) -> str:
    return f"{config.nats_stream}.{node_name(config)}"


class Acked:
    """`<data dir>/outbox.acked`: position(8) sequence(8), the outbox's progress, written at
    every advance (not synced: a reader's hint, the durable cursor is in the log)."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.fd = os.open(os.path.join(data_dir, ACKED_NAME), os.O_RDWR | os.O_CREAT, 0o644)

    def read(self) -> tuple[int, int]:
        raw = os.pread(self.fd, 16, 0)
        if len(raw) != 16:
            return 0, 0
        return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")

    def write(self, position: int, sequence: int) -> None:
        os.pwrite(self.fd, position.to_bytes(8, "big") + sequence.to_bytes(8, "big"), 0)

    def close(self) -> None:
        os.close(self.fd)


# --------------------------------------------------------------------------- connecting

def connect_options(config, *, name: str, on_change=None) -> dict:
    """nats-py's connect() keywords for the configured servers, credentials and TLS."""
    options = {
        "servers": [url.strip() for url in config.nats.split(",") if url.strip()],
        "name": name, "allow_reconnect": True, "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5, "connect_timeout": 2, "ping_interval": 5,
        "max_outstanding_pings": 2, "pending_size": 8 << 20,
        "skip_subject_validation": True,  # ours are made from checked tokens (config.check)
    }
    if config.nats_creds:
        options["user_credentials"] = config.nats_creds
    if config.nats_user:
        options["user"], options["password"] = config.nats_user, config.nats_password
    if config.nats_token:
        options["token"] = config.nats_token
    if config.nats_tls_ca or config.nats_tls_cert or any(
            url.startswith("tls://") for url in options["servers"]):
        context = ssl.create_default_context(cafile=config.nats_tls_ca or None)
        if config.nats_tls_cert:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key or None)
        options["tls"] = context
    if on_change is not None:
        async def disconnected():
            on_change(False)

        async def reconnected():
            on_change(True)

        async def error(exc):
            log.warning("relay: NATS: %s", exc)
        options.update(disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error)
    return options


async def ensure_stream(js, config) -> None:
    """Create the stream when it is missing (file storage, `--nats-replicas` copies, kept for
    the TTL and a day, DUPLICATE_WINDOW_S of de-duplication); an existing one is used as it is,
    with a warning when it keeps less than the TTL."""
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig
    from nats.js.errors import NotFoundError
    try:
        info = await js.stream_info(config.nats_stream)
    except NotFoundError:
        await js.add_stream(StreamConfig(
            name=config.nats_stream, subjects=[f"{config.nats_stream}.*"],
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            num_replicas=config.nats_replicas, max_age=config.ttl_s + 86400,
            duplicate_window=DUPLICATE_WINDOW_S))
        log.info("relay: created stream %s (%d replicas)", config.nats_stream,
                 config.nats_replicas)
        return
    kept = info.config.max_age or 0
    if kept and kept < config.ttl_s:
        log.warning("relay: stream %s keeps %.0f s, less than the TTL (%.0f s): a node added "
                    "later cannot catch up from it alone", config.nats_stream, kept, config.ttl_s)


# --------------------------------------------------------------------------- the outbox

_ACK_SEQ = re.compile(rb'"seq":\s*(\d+)')


def ack_sequence(data: bytes) -> int | None:
    """The stream sequence of a JetStream publish acknowledgement, None for an error."""
    found = _ACK_SEQ.search(data)
    return int(found.group(1)) if found is not None and b'"error"' not in data else None


class Outbox:
    """Publishes the log from its cursor; see the module's docstring."""

    def __init__(self, event_log: EventLog, nc, subject: str, acked: Acked):
        self.log = event_log
        self.nc = nc
        self.subject = subject
        self.acked_file = acked
        self.position, self.sequence = event_log.outbox_cursor()
        self.saved = self.position
        self.saved_at = 0.0
        self.sent_upto = self.position  # the last position published since the last reset
        self.inflight: deque = deque()  # positions published, not yet past the cursor
        self.acks: dict[int, int] = {}  # position -> stream sequence, ahead of the cursor
        self.oldest_sent = 0.0
        self.failed: str | None = None  # the stream refused an entry: send again from the cursor
        self.published = 0
        self.resent = 0
        self.duplicates = 0  # answers "held already": sent again (a restart, a reset), stored once
        self.prefix = ""
        acked.write(self.position, self.sequence)
        self.told = self.position

    async def start(self) -> None:
        self.prefix = self.nc.new_inbox() + "."
        await self.nc.subscribe(self.prefix + "*", cb=self._on_ack)

    async def _on_ack(self, msg) -> None:
        """The stream's answer to one entry: {"stream": ..., "seq": N[, "duplicate": true]},
        an error, or a status without a body (no responders). Read without a JSON parse (one
        for every event)."""
        data = msg.data
        try:
            position = int(msg.subject[len(self.prefix):])
            sequence = ack_sequence(data)
        except ValueError:
            return
        if position <= self.position:
            return  # an answer to a send made before the last reset
        if sequence is None:
            answer = json.loads(data) if data.startswith(b"{") else {}
            error = answer.get("error", {}).get("description") if answer else None
            status = msg.headers.get("Status") if msg.headers else None
            self.failed = error or f"status {status}"
            return
        self.acks[position] = sequence
        if b'"duplicate"' in data:
            self.duplicates += 1
        inflight = self.inflight
        moved = False
        while inflight and inflight[0] in self.acks:
            self.position = inflight.popleft()
            self.sequence = self.acks.pop(self.position)
            moved = True
        if moved:
            self.oldest_sent = time.monotonic()

    def publish_progress(self) -> None:
        """Tell this node's readers how far the stream has acknowledged (outbox.acked)."""
        if self.position != self.told:
            self.acked_file.write(self.position, self.sequence)
            self.told = self.position

    def reset(self, why: str) -> None:
        """Forget what is in flight; the next sends start after the cursor."""
        if self.inflight:
            log.warning("relay: sending %d entries again from log position %d (%s)",
                        len(self.inflight), self.position + 1, why)
            self.resent += len(self.inflight)
        self.inflight.clear()
        self.acks.clear()
        self.sent_upto = self.position
        self.failed = None

    async def send_some(self) -> int:
        """Publish what the log holds past what was sent, up to the window. -> entries sent."""
        if self.failed is not None:
            self.reset(f"the stream answered: {self.failed}")
        elif self.inflight and time.monotonic() - self.oldest_sent > ACK_TIMEOUT_S:
            self.reset(f"no acknowledgement in {ACK_TIMEOUT_S:.0f} s")
        room = WINDOW - len(self.inflight)
        if room <= 0:
            return 0
        with self.log.read() as txn:
            entries = self.log.entries_after(txn, self.sent_upto, min(room, READ_BATCH))
        if not entries:
            return 0
        if not self.inflight:
            self.oldest_sent = time.monotonic()
        publish, subject, prefix = self.nc.publish, self.subject, self.prefix
        for position, raw in entries:
            await publish(subject, raw, reply=f"{prefix}{position}",
                          headers={"Nats-Msg-Id": key_to_eid(raw[KIND_END:ID_END])})
            self.inflight.append(position)
        self.sent_upto = entries[-1][0]
        self.published += len(entries)
        return len(entries)

    async def save(self, force: bool = False) -> None:
        """Write the cursor into the log (a synced transaction, off the event loop)."""
        now = time.monotonic()
        if self.position == self.saved or (not force and now - self.saved_at < SAVE_EVERY_S):
            return
        position, sequence = self.position, self.sequence
        self.saved_at = now
        await asyncio.get_running_loop().run_in_executor(
            None, self.log.put_outbox_cursor, position, sequence)
        self.saved = position

    def lag(self) -> tuple[int, float]:
        """(entries the stream has not acknowledged, seconds the oldest of them has waited)."""
        with self.log.read() as txn:
            tail = self.log.tail(txn)
            waiting = self.log.entries_after(txn, self.position, 1)
        if not waiting:
            return 0, 0.0
        return max(0, tail - self.position), max(0.0, now_ms() - entry_ts(waiting[0][1])) / 1000


# --------------------------------------------------------------------------- the copier

class Copier:
    """Copies the stream into the node's copy (`--cluster`); see the module's docstring."""

    def __init__(self, copy: EventLog, js, config):
        self.copy = copy
        self.js = js
        self.stream = config.nats_stream
        self.pending: list = []  # (sequence, raw) received, not yet copied
        self.tail = copy.last_position()
        self.copied = 0
        self.skipped = 0
        self.stream_last = 0  # the stream's last sequence, as last looked up
        self.sub = None
        self.generation = 0  # of the subscription whose messages are taken
        self.progress_at = time.monotonic()

    async def subscribe(self) -> None:
        from nats.js.api import ConsumerConfig, DeliverPolicy
        if self.sub is not None:
            try:
                await self.sub.unsubscribe()
            except Exception:  # the old consumer may be gone with its server
                pass
            self.sub = None
        self.pending.clear()
        self.generation += 1
        generation = self.generation

        async def on_msg(msg) -> None:  # a replaced subscription's late messages are dropped
            if generation == self.generation:
                self.pending.append((msg.metadata.sequence.stream, msg.data))
        self.sub = await self.js.subscribe(
            f"{self.stream}.*", stream=self.stream, ordered_consumer=True, cb=on_msg,
            idle_heartbeat=2.0, pending_msgs_limit=4 * COPY_BATCH,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=self.tail + 1))
        self.progress_at = time.monotonic()

    async def flush(self) -> int:
        """Copy what arrived, in one transaction off the event loop. -> messages taken."""
        if not self.pending:
            return 0
        items, self.pending = self.pending[:COPY_BATCH], self.pending[COPY_BATCH:]
        copied, skipped = await asyncio.get_running_loop().run_in_executor(
            None, self.copy.write, self.copy.copy_in, items)
        self.copied += copied
        self.skipped += skipped
        self.tail = max(self.tail, items[-1][0])
        self.progress_at = time.monotonic()
        return len(items)

    async def check(self) -> None:
        """Subscribe again when the stream is ahead and nothing arrived for STALL_S (a
        consumer lost with its server)."""
        try:
            info = await self.js.stream_info(self.stream)
        except Exception:
            return
        self.stream_last = info.state.last_seq
        if self.sub is None:
            await self.subscribe()
        elif self.stream_last > self.tail and time.monotonic() - self.progress_at > STALL_S:
            log.warning("relay: the copy is at %d, the stream at %d, nothing arrived for "
                        "%.0f s: subscribing again", self.tail, self.stream_last, STALL_S)
            await self.subscribe()


# --------------------------------------------------------------------------- the process

class Relay:
    def __init__(self, event_log: EventLog, copy: EventLog | None, config):
        self.log = event_log
        self.copy = copy
        self.config = config
        self.node = node_name(config)
        self.acked = Acked(config.data_dir)
        self.connected = False
        self.disconnected_at: float | None = time.time()
        self.outbox: Outbox | None = None
        self.copier: Copier | None = None
        self.error: str | None = None
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def _on_change(self, connected: bool) -> None:
        self.connected = connected
        if self.outbox is not None and self.outbox.inflight:
            # What was in flight on the lost connection gets no answer: send it again now
            # rather than after ACK_TIMEOUT_S (a reconnect may come before the loop looks).
            self.outbox.failed = "the connection was lost"
        if connected:
            self.disconnected_at = None
            log.info("relay: NATS connection restored")
        else:
            self.disconnected_at = time.time()
            log.warning("relay: NATS connection lost; the outbox waits")

    async def _connect(self):
        import nats
        while not self._stop.is_set():
            try:
                nc = await nats.connect(**connect_options(
                    self.config, name=f"otserver {self.node}", on_change=self._on_change))
                js = nc.jetstream()
                await ensure_stream(js, self.config)
                return nc, js
            except Exception as exc:  # no server up yet, or JetStream not ready
                if self.error != str(exc):
                    log.warning("relay: cannot reach NATS at %s (%s); retrying",
                                self.config.nats, exc or type(exc).__name__)
                self.error = str(exc) or type(exc).__name__
                await self._sleep(1.0)
        return None, None

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def run(self, parent: int | None = None) -> None:
        nc, js = await self._connect()
        if nc is None:
            return
        self.connected, self.disconnected_at, self.error = True, None, None
        log.info("relay: node %s publishing to stream %s as %s%s", self.node,
                 self.config.nats_stream, subject_of(self.config),
                 "; copying the stream (cluster views)" if self.copy is not None else "")
        self.outbox = Outbox(self.log, nc, subject_of(self.config), self.acked)
        await self.outbox.start()
        if self.copy is not None:
            self.copier = Copier(self.copy, js, self.config)
            try:
                await self.copier.subscribe()
            except Exception as exc:  # check() tries again every second
                log.warning("relay: cannot follow the stream yet: %s", exc)
        metrics_dir = os.path.join(self.config.data_dir, "metrics")
        next_second = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_second:
                    next_second = now + 1.0
                    if parent is not None and os.getppid() != parent:
                        log.warning("relay: the server process is gone; stopping")
                        break
                    if self.copier is not None and nc.is_connected:
                        try:
                            await self.copier.check()
                        except Exception as exc:  # tried again in a second
                            log.warning("relay: the stream copy: %s", exc)
                    write_snapshot(metrics_dir, self.snapshot(), SNAPSHOT_NAME)
                behind = False
                try:
                    if nc.is_connected:
                        behind = await self.outbox.send_some() >= READ_BATCH
                    elif self.outbox.inflight:
                        self.outbox.reset("the connection was lost")
                except Exception as exc:  # the connection went between the check and the send
                    self.outbox.reset(f"{type(exc).__name__}: {exc}")
                    await self._sleep(0.1)
                if self.copier is not None and await self.copier.flush() >= COPY_BATCH:
                    behind = True
                self.outbox.publish_progress()
                await self.outbox.save()
                await asyncio.sleep(0 if behind else GATHER_S)
            await self._drain(nc)
        finally:
            await self.outbox.save(force=True)
            write_snapshot(metrics_dir, self.snapshot(), SNAPSHOT_NAME)
            try:
                await nc.close()
            except Exception:
                pass

    async def _drain(self, nc, timeout_s: float = 5.0) -> None:
        """A clean stop: wait (bounded) for what is in flight, copy what arrived."""
        deadline = time.monotonic() + timeout_s
        while self.outbox.inflight and nc.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.copier is not None:
            while await self.copier.flush():
                pass

    def snapshot(self) -> dict:
        outbox = self.outbox
        lag_events, lag_seconds = outbox.lag() if outbox is not None else (
            self.log.last_position() - self.log.outbox_cursor()[0], 0.0)
        snap = {
            "pid": os.getpid(), "at": time.time(), "node": self.node,
            "connected": self.connected, "disconnected_at": self.disconnected_at,
            "error": self.error, "lag_events": lag_events, "lag_seconds": lag_seconds,
            "cursor": outbox.position if outbox else 0,
            "published": outbox.published if outbox else 0,
            "resent": outbox.resent if outbox else 0,
            "duplicates": outbox.duplicates if outbox else 0,
        }
        if self.copier is not None:
            snap.update(copy_tail=self.copier.tail, copied=self.copier.copied,
                        copy_skipped=self.copier.skipped, stream_last=self.copier.stream_last)
        return snap


def start_relay(config) -> ChildProcess | None:
    """With --nats, the relay as a child process of `serve` or the supervisor, started."""
    if not config.nats:
        return None
    relay = ChildProcess(config, "relay", "relay")
    relay.start()
    return relay


def run_relay(config, *, parent: int | None = None) -> int:
    """The body of `otserver relay`: take the lock, publish (and copy) until SIGTERM."""
    import uvloop
    lock_fd = os.open(os.path.join(config.data_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if parent is not None and os.getppid() != parent:
                    return 0
                time.sleep(0.1)
        event_log = EventLog(log_path(config.data_dir), initial_bytes=config.initial_store_bytes,
                             max_bytes=config.max_store_bytes)
        copy = EventLog(copy_path(config.data_dir), initial_bytes=config.initial_store_bytes,
                        max_bytes=config.max_store_bytes) if config.cluster else None

        async def main() -> None:
            relay = Relay(event_log, copy, config)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, relay.stop)
            loop.add_signal_handler(signal.SIGINT, relay.stop)
            await relay.run(parent=parent)
        try:
            uvloop.run(main())
        finally:
            if copy is not None:
                copy.close()
            event_log.close()
        return 0
    finally:
        os.close(lock_fd)


def read_relay_snapshot(metrics_dir: str) -> dict | None:
    try:
        with open(os.path.join(metrics_dir, SNAPSHOT_NAME)) as data:
            return json.load(data)
    except (OSError, ValueError):
        return None
