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
        self._store = None
        self._seen: int | None = None  # with workers: the last commit number streamed

    def follow_commit_log(self, store, loop, interval_s: float = 0.05) -> None:
        """With several workers, stream every worker's commits: poll the store's commit log
        (one order for all processes) instead of publishing this process's own commits."""
        self._store = store
        self._loop = loop
        self._interval = interval_s
        store.keep_commit_log = True
        self._handle = loop.call_later(interval_s, self._poll)

    def _poll(self) -> None:
        store = self._store
        if self._by_site:
            with store.read() as txn:
                self._seen, keys = store.commits_after(txn, self._seen)
                events = []
                for key in keys:
                    stored = store.get_event(txn, key)
                    if stored is not None:
                        events.append((key, stored))
            for key, stored in events:
                self._send(key, stored)
        else:
            self._seen = None  # nobody listens: start from "now" at the next subscriber
        self._handle = self._loop.call_later(self._interval, self._poll)

    def stop(self) -> None:
        if self._store is not None:
            self._handle.cancel()

    def __len__(self) -> int:
        return sum(len(subs) for subs in self._by_site.values())

    def subscribe(self, si: str, connection) -> None:
        if self._store is not None and self._seen is None:
            with self._store.read() as txn:
                self._seen, _ = self._store.commits_after(txn, None)
        self._by_site.setdefault(site_key(si), set()).add(connection)

    def unsubscribe(self, si: str, connection) -> None:
        site = site_key(si)
        subs = self._by_site.get(site)
        if subs is not None:
            subs.discard(connection)
            if not subs:
                del self._by_site[site]

    def publish(self, events, seconds: float = 0.0) -> None:
        """Called after each of this process's commits with the batch's events."""
        if not self._by_site or self._store is not None:
            return
        for ev in events:
            self._send(ev.key, (ev.ts, ev.si, ev.sid, ev.uid, ev.props, ev.captured))

    def _send(self, key: bytes, stored) -> None:
        subs = self._by_site.get(site_key(stored[1]))
        if not subs:
            return
        payload = event_payload(key, stored)
        data = b"id: %s\ndata: %s\n\n" % (
            payload["event"]["eid"].encode(),
            json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode())
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
