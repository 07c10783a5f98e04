"""The read API (`/api/v1/...`) and its tokens.

Tokens: `ot_` + 43 url-safe characters (256 random bits). Only SHA-256 of a token is stored, as
the key it is found by; a token is checked by looking its digest up, so no comparison ever runs
over secret bytes an attacker can steer (the digest of a guess says nothing of a real token).
A token belongs to one site, or to every site when its site is `*` (admin).

Answers are JSON; errors are {"error": "..."}; no CORS headers (reading is not for browsers on
other origins).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from datetime import datetime, timezone
from urllib.parse import parse_qsl, unquote_to_bytes

from . import http
from .errors import HttpError
from .model import (R_CAPTURED, R_COUNT, R_FIRST, R_LAST, eid_to_key, event_record,
                    folded_record, key_to_eid, now_ms, session_key)

ADMIN_SITE = "*"
TOKEN_PREFIX = "ot_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_id(digest: bytes) -> str:
    """The public name of a token (for list and revoke): the start of its digest."""
    return digest.hex()[:12]


class ApiError(HttpError):
    pass


def _json(status: int, payload, head: bool = False, headers: tuple = ()) -> bytes:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return http.render(status, body, content_type=http.JSON, head=head, headers=headers)


class Api:
    def __init__(self, store, config):
        self.store = store
        self.config = config
        self.routes = {
            b"events": self._event,
            b"sessions": self._session,
            b"users": self._user,
        }
        self.collections = {
            b"events": self._list_events,
            b"stats": self._stats,
            b"live": self._live,
        }

    def handle(self, req):
        try:
            return self._handle(req)
        except HttpError as exc:
            return _json(exc.status, {"error": exc.reason}, head=req.head, headers=exc.headers)

    def _handle(self, req):
        parts = req.path.split(b"/")  # ['', 'api', 'v1', kind] or ['', 'api', 'v1', kind, id]
        if len(parts) not in (4, 5) or parts[2] != b"v1":
            raise HttpError(404, "not found")
        kind = parts[3]
        if len(parts) == 4:
            handler = self.collections.get(kind)
            allowed = (b"GET", b"HEAD")
        else:
            handler = self.routes.get(kind) if parts[4] else None
            allowed = (b"GET", b"HEAD", b"DELETE") if kind == b"users" else (b"GET", b"HEAD")
        if handler is None:
            raise HttpError(404, "not found")
        if req.method not in allowed:
            raise HttpError(405, "method not allowed",
                            headers=(("Allow", b", ".join(allowed).decode()),))
        site = self._authorize(req)
        params = self._params(req.query)
        si = params.get("si")
        if not si:
            raise HttpError(400, "missing query parameter: si")
        if site != ADMIN_SITE and site != si:
            raise HttpError(403, "this token is not for site " + json.dumps(si))
        if len(parts) == 4:
            return handler(req, si, params)
        try:
            ident = unquote_to_bytes(parts[4]).decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(404, "not found") from None
        if req.method == b"DELETE":
            return self._erase(si, ident)
        payload = handler(si, ident, params)
        return _json(200, payload, head=req.head)

    # ------------------------------------------------------------------ auth and parameters

    def _authorize(self, req) -> str:
        header = req.headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise HttpError(401, "missing bearer token",
                            headers=(("WWW-Authenticate", 'Bearer realm="otserver"'),))
        found = self.store.find_token(token_digest(token.strip().decode("latin-1")))
        if found is None:
            raise HttpError(401, "invalid token",
                            headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),))
        return found[0]

    @staticmethod
    def _params(query: bytes) -> dict:
        try:
            return dict(parse_qsl(query.decode("utf-8"), keep_blank_values=True,
                                  strict_parsing=False, errors="strict"))
        except (UnicodeDecodeError, ValueError):
            raise HttpError(400, "query string is not valid UTF-8") from None

    def _page(self, params: dict, default: int | None = None, most: int | None = None) -> int:
        default = self.config.default_page_size if default is None else default
        most = self.config.max_page_size if most is None else most
        text = params.get("limit")
        if text is None:
            return default
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
            raise HttpError(400, f"limit must be 1 to {most}")
        return int(text)

    # ------------------------------------------------------------------ resources

    def _event(self, si: str, eid: str, params: dict) -> dict:
        key = eid_to_key(eid.lower())
        if key is None:
            raise HttpError(404, "no such event")
        with self.store.read() as txn:
            stored = self.store.get_event(txn, key)
        if stored is None or stored[1] != si:
            raise HttpError(404, "no such event")
        return event_payload(key, stored)

    def _session(self, si: str, sid: str, params: dict) -> dict:
        limit = self._page(params)
        after = self._after_eid(params)
        store = self.store
        skey = session_key(si, sid)
        with store.read() as txn:
            record = store.get_session_by_key(txn, skey)
            if record is None:
                raise HttpError(404, "no such session")
            start = 0
            if after is not None:
                stored = store.get_event(txn, after)
                if stored is None or stored[1] != si or stored[2] != sid:
                    raise HttpError(400, "after must be an eid of this session")
                start = stored[6] + 1
            keys = store.session_event_keys(txn, record, skey, start, limit)
            events = []
            for key in keys:
                stored = store.get_event(txn, key)
                if stored is not None:  # None: swept or erased since
                    events.append(event_payload(key, stored))
        payload = record_payload("session", record)
        payload["events"] = events
        more = keys and start + len(keys) < record[R_COUNT]
        payload["next_after"] = key_to_eid(keys[-1]) if more else None
        return payload

    def _user(self, si: str, uid: str, params: dict) -> dict:
        limit = self._page(params)
        after = self._after_cursor(params)
        store = self.store
        with store.read() as txn:
            record = store.get_user(txn, si, uid)
            if record is None:
                raise HttpError(404, "no such user")
            entries = store.user_session_entries(txn, si, uid, after, limit + 1)
            sessions = []
            for entry, skey in entries[:limit]:
                session = store.get_session_by_key(txn, skey)
                if session is not None:
                    sessions.append(session_summary(session))
        payload = record_payload("user", record)
        payload["sessions"] = sessions
        payload["next_after"] = (base64.urlsafe_b64encode(entries[limit - 1][0]).decode()
                                 if len(entries) > limit else None)
        return payload

    def _erase(self, si: str, uid: str) -> "WriterJob":
        """Erasure is a write: it runs on the writer thread, between ingest batches."""
        def answer(erased, error) -> bytes:
            if error is not None:
                return _json(503, {"error": f"storage unavailable: {error}"},
                             headers=(("Retry-After", str(self.config.retry_after_s)),))
            if erased is None:
                return _json(404, {"error": "no such user"})
            return _json(200, {"erased": erased})
        return WriterJob(self.store.erase_user, (si, uid), answer)

    # ------------------------------------------------------------------ reports

    def _list_events(self, req, si: str, params: dict) -> bytes:
        """A page of the site's events in time order, as NDJSON; `X-Next-After` names the
        cursor for the next page when this one is full."""
        now = now_ms()
        start = parse_time(params, "from", 0)
        end = parse_time(params, "to", now + 1)
        # New events are keyed by their receive time; one that waited for a commit may land a
        # little behind the newest listed. Listing only what is LISTING_SETTLE_MS old keeps a
        # cursor from ever stepping over such an event.
        end = min(end, now - LISTING_SETTLE_MS)
        limit = self._page(params, default=self.config.max_page_size,
                           most=self.config.max_listing_page)
        start_key = time_key(start)
        after = self._after_eid(params)
        if after is not None and after >= start_key:
            if after == b"\xff" * 16:  # nothing comes after the largest key
                return http.render(200, b"", content_type=http.NDJSON, head=req.head)
            start_key = (int.from_bytes(after, "big") + 1).to_bytes(16, "big")
        store = self.store
        lines = []
        with store.read() as txn:
            keys = store.site_event_keys(txn, si, start_key, time_key(max(end, 0)), limit)
            for key in keys:
                stored = store.get_event(txn, key)
                if stored is not None:
                    lines.append(json.dumps(event_payload(key, stored), ensure_ascii=False,
                                            separators=(",", ":")))
        body = ("\n".join(lines) + "\n").encode() if lines else b""
        headers = (("X-Next-After", key_to_eid(keys[-1])),) if len(keys) == limit else ()
        return http.render(200, body, content_type=http.NDJSON, head=req.head, headers=headers)

    def _stats(self, req, si: str, params: dict) -> bytes:
        bucket = params.get("bucket", "hour")
        size = BUCKETS.get(bucket)
        if size is None:
            raise HttpError(400, "bucket must be minute, hour or day")
        now = now_ms()
        end = parse_time(params, "to", now + 1)
        start = parse_time(params, "from", end - 86_400_000)
        if start >= end:
            raise HttpError(400, "from must be before to")
        buckets: dict[int, list] = {}
        with self.store.read() as txn:
            for minute, counter in self.store.minute_counters(
                    txn, si, start // 60_000, -(-end // 60_000)):
                first = minute * 60_000 // size * size
                into = buckets.setdefault(first, [0, 0, 0])
                for i in range(3):
                    into[i] += counter[i]
        rows = [{"start": first, "events": c[0], "new_sessions": c[1], "new_users": c[2]}
                for first, c in sorted(buckets.items())]
        totals = {"events": sum(r["events"] for r in rows),
                  "new_sessions": sum(r["new_sessions"] for r in rows),
                  "new_users": sum(r["new_users"] for r in rows)}
        return _json(200, {"si": si, "bucket": bucket, "from": start, "to": end,
                           "buckets": rows, "totals": totals}, head=req.head)

    def _live(self, req, si: str, params: dict):
        if req.head:
            raise HttpError(405, "method not allowed", headers=(("Allow", "GET"),))
        return LiveStream(si)

    @staticmethod
    def _after_eid(params: dict) -> bytes | None:
        text = params.get("after")
        if not text:
            return None
        key = eid_to_key(text.lower())
        if key is None:
            raise HttpError(400, "after must be an eid")
        return key

    @staticmethod
    def _after_cursor(params: dict) -> bytes | None:
        text = params.get("after")
        if not text:
            return None
        try:
            return base64.urlsafe_b64decode(text.encode())
        except (binascii.Error, ValueError):
            raise HttpError(400, "after must be a cursor from next_after") from None


LISTING_SETTLE_MS = 1000
MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
BUCKETS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}


class WriterJob:
    """An answer that needs a write: function(*args) runs on the writer thread, then
    answer(result, error) -> bytes on the loop."""

    __slots__ = ("function", "args", "answer")

    def __init__(self, function, args: tuple, answer):
        self.function = function
        self.args = args
        self.answer = answer


class LiveStream:
    """The answer to /api/v1/live: the protocol turns the connection into an event stream."""

    __slots__ = ("si",)

    def __init__(self, si: str):
        self.si = si


def time_key(ms: int) -> bytes:
    """The smallest event key of millisecond `ms` (UUIDv7 keys start with the time)."""
    return (max(0, min(ms, (1 << 48) - 1)) << 80).to_bytes(16, "big")


def parse_time(params: dict, name: str, default: int) -> int:
    """A time parameter as unix milliseconds: given as milliseconds or ISO 8601."""
    text = params.get(name)
    if not text:
        return default
    if text.isascii() and text.isdigit():
        value = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise HttpError(400, f"{name} must be unix milliseconds or ISO 8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        value = int(moment.timestamp() * 1000)
    if not 0 <= value <= MAX_TIME_MS:
        raise HttpError(400, f"{name} is out of range (0 to {MAX_TIME_MS} ms)")
    return value


def event_payload(key: bytes, stored) -> dict:
    ts, si, sid, uid, props, captured = stored[:6]
    return {"event": event_record(key_to_eid(key), ts, si, sid, uid, props),
            "captured": captured or {}}


def record_payload(kind: str, record: list) -> dict:
    return {kind: folded_record(record, kind), "captured": record[R_CAPTURED],
            "first_seen": record[R_FIRST], "last_seen": record[R_LAST],
            "event_count": record[R_COUNT]}


def session_summary(record: list) -> dict:
    flat = folded_record(record, "session")
    return {"sid": flat["sid"], "first_seen": record[R_FIRST], "last_seen": record[R_LAST],
            "event_count": record[R_COUNT]}


# ---------------------------------------------------------------------- token commands

def create_token(store, site: str, label: str = "") -> tuple[str, str]:
    """-> (token, id). The token is shown once; only its digest is kept."""
    if not site:
        raise ValueError("a token needs a site (or * for every site)")
    token = new_token()
    digest = token_digest(token)
    store.put_token(digest, site, now_ms(), label)
    return token, token_id(digest)


def list_tokens(store) -> list[dict]:
    return [{"id": token_id(d), "site": v[0], "created": v[1], "label": v[2]}
            for d, v in store.list_tokens()]


def revoke_token(store, ident: str) -> int:
    ident = ident.lower()
    if len(ident) < 6:
        raise ValueError("give at least 6 characters of the token id")
    return store.delete_tokens([d for d, _ in store.list_tokens() if token_id(d).startswith(ident)])
