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

    def handle(self, req) -> bytes:
        try:
            return self._handle(req)
        except HttpError as exc:
            return _json(exc.status, {"error": exc.reason}, head=req.head, headers=exc.headers)

    def _handle(self, req) -> bytes:
        parts = req.path.split(b"/")  # ['', 'api', 'v1', kind, id]
        if len(parts) != 5 or parts[2] != b"v1" or parts[3] not in self.routes or not parts[4]:
            raise HttpError(404, "not found")
        if req.method not in (b"GET", b"HEAD"):
            raise HttpError(405, "method not allowed", headers=(("Allow", "GET, HEAD"),))
        site = self._authorize(req)
        params = self._params(req.query)
        si = params.get("si")
        if not si:
            raise HttpError(400, "missing query parameter: si")
        if site != ADMIN_SITE and site != si:
            raise HttpError(403, "this token is not for site " + json.dumps(si))
        try:
            ident = unquote_to_bytes(parts[4]).decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(404, "not found") from None
        payload = self.routes[parts[3]](si, ident, params)
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

    def _page(self, params: dict) -> int:
        text = params.get("limit")
        if text is None:
            return self.config.default_page_size
        if not text.isdigit() or not 1 <= int(text) <= self.config.max_page_size:
            raise HttpError(400, f"limit must be 1 to {self.config.max_page_size}")
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
