"""Live streams: Server-Sent Events of each site's events, following the log.

Invariants:
- Each process's hub follows the log itself (one order for every worker), so a stream carries
  every worker's events in log order, each with `id:` = its log position. The hub reads the
  log right after this process's own commits and every POLL_S for the others'.
- A stream resumed with `Last-Event-ID` first gets the site's events after that id up to the
  position the hub had published when it subscribed (read from the views: at most
  --live-replay-max, then a `truncated` event saying where to list the rest), then the live
  events after that position, held back meanwhile: nothing missed, nothing twice.
- Publishing never waits on a subscriber. One whose unsent bytes pass `buffer_bytes` is dropped
  (its connection closed). Events are encoded once per event however many subscribers read
  them, and the log is not read at all while nobody subscribes.
"""
from __future__ import annotations

import asyncio
import json
import socket

from .api import sse_event
from .model import LogEntry, site_key

HEARTBEAT = b": heartbeat\n\n"
POLL_S = 0.02
POLL_LIMIT = 5000  # entries read per poll; the next poll follows at once when there are more


class LiveHub:
    def __init__(self, event_log, loop, buffer_bytes: int, replay=None):
        self.log = event_log
        self.loop = loop
        self.buffer_bytes = buffer_bytes
        self.replay = replay  # replay(si, after, until, done(bytes | None)), the API's
        self.position: int | None = None  # the last position published; None: nobody listens
        self._by_site: dict[bytes, set] = {}
        self._held: dict = {}  # connection -> [bytes] held back while its replay runs
        self._handle = None
        self._soon = False
        self.dropped = 0

    def start(self) -> None:
        self._handle = self.loop.call_later(POLL_S, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def __len__(self) -> int:
        return sum(len(subs) for subs in self._by_site.values())

    # ------------------------------------------------------------------ following the log

    def committed(self) -> None:
        """This process committed: read the log at the end of this turn."""
        if self._by_site and not self._soon:
            self._soon = True
            self.loop.call_soon(self._poll)

    def _tick(self) -> None:
        self._poll()
        self._handle = self.loop.call_later(POLL_S, self._tick)

    def _poll(self) -> None:
        self._soon = False
        if not self._by_site:
            self.position = None
            return
        with self.log.read() as txn:
            entries = self.log.entries_after(txn, self.position, POLL_LIMIT)
        for position, raw in entries:
            entry = LogEntry(position, raw)
            if entry.is_event:
                subs = self._by_site.get(site_key(entry.si))
                if subs:
                    data = sse_event(entry)
                    for connection in list(subs):
                        self._push(connection, data)
        if entries:
            self.position = entries[-1][0]
            if len(entries) == POLL_LIMIT and not self._soon:
                self._soon = True
                self.loop.call_soon(self._poll)

    # ------------------------------------------------------------------ subscribers

    def subscribe(self, si: str, connection, last_id: int | None = None,
                  since: int | None = None) -> None:
        """Stream the site's events to `connection` after `last_id` (the client's
        Last-Event-ID: what the hub has passed is replayed), or else after `since` (the log's
        position when the request was answered: what was committed while the answer left is
        not lost), or from now."""
        if self.position is None:
            self.position = since if since is not None else self.log.last_position()
        if last_id is None:
            last_id = since
        self._by_site.setdefault(site_key(si), set()).add(connection)
        if last_id is not None and last_id < self.position and self.replay is not None:
            self._held[connection] = []
            until = self.position
            self.replay(si, last_id, until, lambda data: self._replayed(connection, data))

    def _replayed(self, connection, data: bytes | None) -> None:
        held = self._held.pop(connection, None)
        if held is None:  # gone meanwhile
            return
        if data is None:
            data = b"event: error\ndata: %s\n\n" % json.dumps(
                {"error": "replay unavailable: the views did not catch up in time"}).encode()
        for piece in [data, *held]:
            if piece:
                self._push(connection, piece)

    def unsubscribe(self, si: str, connection) -> None:
        self._held.pop(connection, None)
        site = site_key(si)
        subs = self._by_site.get(site)
        if subs is not None:
            subs.discard(connection)
            if not subs:
                del self._by_site[site]
        if not self._by_site:
            self.position = None  # the next subscriber starts at the log's tail of its time

    def heartbeat(self) -> None:
        for subs in list(self._by_site.values()):
            for connection in list(subs):
                self._push(connection, HEARTBEAT)

    def _push(self, connection, data: bytes) -> None:
        held = self._held.get(connection)
        backlog = connection.live_backlog() + (sum(map(len, held)) if held is not None else 0)
        if backlog + len(data) > self.buffer_bytes:
            self.dropped += 1
            self._held.pop(connection, None)
            connection.close_live()
            return
        if held is not None:
            held.append(data)
        else:
            connection.push_live(data)


class LiveConnection(asyncio.Protocol):
    """A connection handed over by the HTTP protocol once the stream's head is written: it
    only sends (what the hub pushes), reads nothing, and has no deadline."""

    def __init__(self, hub: LiveHub, buffer_bytes: int):
        self.hub = hub
        self.buffer_bytes = buffer_bytes
        self.transport = None
        self.si: str | None = None
        self.on_lost = None  # called with this connection once it is gone

    def connection_made(self, transport) -> None:
        self.transport = transport
        # Bound the kernel's send buffer too, so a stalled reader's backlog shows up in the
        # transport's buffer (which live_backlog measures) instead of hiding in the kernel.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                max(4096, min(self.buffer_bytes // 4, 1 << 20)))
            except OSError:
                pass

    def subscribe(self, si: str, last_id: int | None, since: int | None = None) -> None:
        self.si = si
        self.hub.subscribe(si, self, last_id, since)

    def data_received(self, data: bytes) -> None:
        pass  # a stream's client has nothing more to say

    def eof_received(self) -> bool:
        return False  # the client left: close

    def connection_lost(self, exc) -> None:
        if self.si is not None:
            self.hub.unsubscribe(self.si, self)
        self.transport = None
        if self.on_lost is not None:
            self.on_lost(self)

    def live_backlog(self) -> int:
        """Bytes owed to this subscriber and not yet sent."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def push_live(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close_live(self) -> None:
        if self.si is not None:
            self.hub.unsubscribe(self.si, self)
            self.si = None
        if self.transport is not None:
            self.transport.abort()  # its buffer is what overflowed: drop it, do not drain it

    def check_deadline(self, now: float) -> None:
        pass  # a stream has none: heartbeats keep it alive

    def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.close()
