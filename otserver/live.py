"""Live streams: Server-Sent Events of each site's events as their batch commits.

Invariants: publishing never waits on a subscriber. A subscriber whose unsent bytes pass
`buffer_bytes` is dropped (its connection closed), so a slow or stalled reader costs ingest
nothing but the bytes it was already owed. Events are encoded once per event however many
subscribers read them, and not at all when nobody subscribes to the site.
"""
from __future__ import annotations

import json

from .api import event_payload
from .model import site_key

HEARTBEAT = b": heartbeat\n\n"


class LiveHub:
    def __init__(self, buffer_bytes: int):
        self.buffer_bytes = buffer_bytes
        self._by_site: dict[bytes, set] = {}
        self.dropped = 0

    def __len__(self) -> int:
        return sum(len(subs) for subs in self._by_site.values())

    def subscribe(self, si: str, connection) -> None:
        self._by_site.setdefault(site_key(si), set()).add(connection)

    def unsubscribe(self, si: str, connection) -> None:
        site = site_key(si)
        subs = self._by_site.get(site)
        if subs is not None:
            subs.discard(connection)
            if not subs:
                del self._by_site[site]

    def publish(self, events, seconds: float = 0.0) -> None:
        """Called after each commit with the batch's events."""
        by_site = self._by_site
        if not by_site:
            return
        for ev in events:
            subs = by_site.get(site_key(ev.si))
            if not subs:
                continue
            payload = event_payload(ev.key, (ev.ts, ev.si, ev.sid, ev.uid, ev.props, ev.captured))
            data = b"id: %s\ndata: %s\n\n" % (
                ev.eid.encode(), json.dumps(payload, ensure_ascii=False,
                                            separators=(",", ":")).encode())
            for connection in list(subs):
                self._push(connection, data)

    def heartbeat(self) -> None:
        for subs in list(self._by_site.values()):
            for connection in list(subs):
                self._push(connection, HEARTBEAT)

    def _push(self, connection, data: bytes) -> None:
        if connection.live_backlog() + len(data) > self.buffer_bytes:
            self.dropped += 1
            connection.close_live()
            return
        connection.push_live(data)
