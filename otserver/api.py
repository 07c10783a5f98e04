"""The read API (`/api/v1/...`) and its tokens.

Tokens: `ot_` + 43 url-safe characters (256 random bits). Only SHA-256 of a token is stored, as
the key it is found by; a token is checked by looking its digest up, so no comparison ever runs
over secret bytes an attacker can steer (the digest of a guess says nothing of a real token).
A token belongs to one site, or to every site when its site is `*` (admin).

Read your writes: a read of the views (sessions, users, listing, stats) first waits until the
views' watermark reaches the log's last position as it was when the read arrived (ViewWatch),
so it sees every event acknowledged before it; then it runs on a reader thread (ReadPool), LMDB
reads and JSON encoding both, so a large answer never stalls the event loop. A read of one event
reads the log alone and waits for nothing. An erasure is an entry appended to the log; its
answer waits until the folder has carried it out.

Answers are JSON; errors are {"error": "..."}; no CORS headers (reading is not for browsers on
other origins).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from itertools import chain
from urllib.parse import parse_qsl, unquote_to_bytes

from . import csvformat, http, tallies
from .agents import agent_fields
from .errors import HttpError
from .handler import Deferred, LiveStream
from .model import (R_CAPTURED, R_COUNT, R_FIRST, R_LAST, EidGenerator, eid_to_key,
                    encode_erasure, folded_record, now_ms, session_key, site_key, unpackb,
                    user_key)

log = logging.getLogger("otserver")
ADMIN_SITE = "*"
TOKEN_PREFIX = "ot_"
MAX_TIME_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
BUCKETS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
END = 1 << 63  # past every position
CSV = b"text/csv; charset=utf-8"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def token_id(digest: bytes) -> str:
    """The public name of a token (for list and revoke): the start of its digest."""
    return digest.hex()[:12]


def _json(status: int, payload, head: bool = False, headers: tuple = (),
          close: bool = False) -> bytes:
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return http.render(status, body, content_type=http.JSON, head=head, headers=headers,
                       close=close)


class ReadPool:
    """Reader threads: fn(*args) runs on one, then done(result) on the event loop."""

    def __init__(self, loop, threads: int = 2):
        self.loop = loop
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="otserver-read")

    def run(self, fn, args: tuple, done) -> None:
        future = self.executor.submit(fn, *args)
        future.add_done_callback(lambda f: self._deliver(f, done))

    def _deliver(self, future, done) -> None:
        try:
            self.loop.call_soon_threadsafe(done, future.result())
        except RuntimeError:  # the loop is closed: the process is going away
            pass

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def _answer(fn, args: tuple, head: bool, close: bool) -> bytes:
    """fn(*args) -> a payload; as an answer, with a refusal or a failure answered too."""
    try:
        result = fn(*args)
        return result if isinstance(result, bytes) else _json(200, result, head, close=close)
    except HttpError as exc:
        return _json(exc.status, {"error": exc.reason}, head, exc.headers, close)
    except Exception:  # never leave a reader without an answer
        log.exception("read failed")
        return _json(500, {"error": "internal error"}, head, close=close)


class Api:
    def __init__(self, event_log, views, config, *, watch=None, pool=None, writer=None,
                 node_log=None):
        self.log = event_log  # the log the views are folded from (a cluster node's copy)
        self.node_log = node_log or event_log  # the node's own: tokens, what it appended
        self.cluster = node_log is not None and node_log is not event_log
        self.views = views
        self.config = config
        self.watch = watch
        self.pool = pool
        self.writer = writer
        self.eids = EidGenerator()
        self.routes = {b"events": self._event, b"sessions": self._session, b"users": self._user}
        self.collections = {b"events": self._list_events, b"stats": self._stats,
                            b"live": self._live, b"breakdown": self._breakdown,
                            b"sites": self._sites}  # sites: no si, see _handle

    def handle(self, req):
        try:
            return self._handle(req)
        except HttpError as exc:
            return _json(exc.status, {"error": exc.reason}, req.head, exc.headers, req.close)

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
        if kind == b"sites":
            return self._sites(req, site)
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
            return self._erase(req, si, ident)
        return handler(req, si, ident, params)

    # ------------------------------------------------------------------ auth and parameters

    def _authorize(self, req) -> str:
        header = req.headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise HttpError(401, "missing bearer token",
                            headers=(("WWW-Authenticate", 'Bearer realm="otserver"'),))
        found = self.node_log.find_token(token_digest(token.strip().decode("latin-1")))
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

    # ------------------------------------------------------------------ deferred reads

    def _read(self, fn, args: tuple, req, *, wait: bool = True) -> Deferred:
        """Answer with fn(*args) run on a reader thread, once the views have caught up with
        the log as it is now (`wait`)."""
        head, close = req.head, req.close

        def start(done) -> None:
            def go(ok: bool = True) -> None:
                if ok:
                    self.pool.run(_answer, (fn, args, head, close), done)
                else:
                    done(self._behind(head, close))
            if wait:
                self.watch.wait(go)
            else:
                go()
        return Deferred(start)

    def _behind(self, head: bool = False, close: bool = False) -> bytes:
        return _json(503, {"error": f"the views did not catch up with the log within "
                                    f"{self.config.max_read_wait_s:g} s; retry"},
                     head, (("Retry-After", str(self.config.retry_after_s)),), close)

    # ------------------------------------------------------------------ resources

    def _event(self, req, si: str, eid: str, params: dict) -> Deferred:
        key = eid_to_key(eid.lower())
        if key is None:
            raise HttpError(404, "no such event")
        # A cluster node learns of its own events through the stream: wait for the copy.
        return self._read(self._read_event, (si, key), req, wait=self.cluster)

    def _read_event(self, si: str, key: bytes) -> dict:
        with self.log.read() as txn:
            position = self.log.find(txn, key)
            entry = self.log.get(txn, position) if position is not None else None
        if entry is None or not entry.is_event or entry.si != si:
            raise HttpError(404, "no such event")
        return event_payload(entry)

    def _session(self, req, si: str, sid: str, params: dict) -> Deferred:
        limit = self._page(params)
        after = self._after_eid(params)
        return self._read(self._read_session, (si, sid, limit, after), req)

    def _read_session(self, si: str, sid: str, limit: int, after: bytes | None) -> dict:
        views, event_log = self.views, self.log
        skey = session_key(si, sid)
        with views.read() as vtxn, event_log.read() as ltxn:
            record = views.get_session(vtxn, skey)
            if record is None:
                raise HttpError(404, "no such session")
            seq = 0
            if after is not None:
                position = event_log.find(ltxn, after)
                entry = event_log.get(ltxn, position) if position is not None else None
                number = (views.session_seq(vtxn, record, skey, position)
                          if entry is not None and entry.is_event and entry.si == si
                          and entry.sid == sid else None)
                if number is None:
                    raise HttpError(400, "after must be an eid of this session")
                seq = number + 1
            count = record[R_COUNT]
            events, last = [], None
            while len(events) < limit and seq < count:  # skip what has left the log
                positions = views.session_positions(vtxn, record, skey, seq, limit - len(events))
                for position in positions:
                    entry = event_log.get(ltxn, position) if position else None
                    if entry is not None:
                        events.append(event_payload(entry))
                        last = entry
                seq += len(positions)
        payload = record_payload("session", record)
        payload["events"] = events
        payload["next_after"] = last.eid if last is not None and seq < count else None
        return payload

    def _user(self, req, si: str, uid: str, params: dict) -> Deferred:
        limit = self._page(params)
        after = self._after_cursor(params)
        return self._read(self._read_user, (si, uid, limit, after), req)

    def _read_user(self, si: str, uid: str, limit: int, after: bytes | None) -> dict:
        views = self.views
        ukey = user_key(si, uid)
        with views.read() as txn:
            record = views.get_user(txn, ukey)
            if record is None:
                raise HttpError(404, "no such user")
            links = views.user_session_links(txn, ukey, after, limit + 1)
            sessions = []
            for _, skey in links[:limit]:
                session = views.get_session(txn, skey)
                if session is not None:
                    sessions.append(session_summary(session))
        payload = record_payload("user", record)
        payload["sessions"] = sessions
        payload["next_after"] = (base64.urlsafe_b64encode(links[limit - 1][0]).decode()
                                 if len(links) > limit else None)
        return payload

    def _erase(self, req, si: str, uid: str) -> Deferred:
        """Erasure is an entry in the log, after every event acknowledged before it; the
        answer comes once the folder has carried it out (or 202 if that takes longer than
        --max-read-wait: it is logged, and it will be done)."""
        retry = (("Retry-After", str(self.config.retry_after_s)),)
        close = req.close

        def start(done) -> None:
            _, key, ts = self.eids.next(now_ms())

            def logged(arg, error, position: int, _replaced) -> None:
                if error is not None:
                    done(_json(503, {"error": f"storage unavailable: {error}"}, headers=retry,
                               close=close))
                    return

                def carried_out() -> int | None:
                    """Where the folded log holds the erasure once it is carried out."""
                    at = position
                    if self.cluster:  # its position in the copy of the stream
                        with self.log.read() as txn:
                            at = self.log.find(txn, key)
                        if at is None:
                            return None
                        self.watch.want(at)
                    return at if self.log.erasure_result(at)[0] else None

                def finished(ok: bool) -> None:
                    at = carried_out() if ok else None
                    if at is None:
                        done(_json(202, {"erasure": "logged; the folder is carrying it out",
                                         "position": position}, close=close))
                        return
                    result = self.log.erasure_result(at)[1]
                    if result is None:
                        done(_json(404, {"error": "no such user"}, close=close))
                    else:
                        done(_json(200, {"erased": result}, close=close))
                if not self.cluster:
                    self.watch.want(position)
                self.watch.wait_for(lambda: carried_out() is not None, finished)

            if not self.writer.submit([encode_erasure(key, ts, si, uid)], logged, None):
                done(_json(503, {"error": "overloaded: too many events waiting for a commit"},
                           headers=retry, close=close))
        return Deferred(start)

    # ------------------------------------------------------------------ reports

    def _list_events(self, req, si: str, params: dict) -> Deferred:
        """A page of the site's events in log order, as NDJSON; `X-Next-After` names the
        cursor (the log position of the page's last event) on every page that lists one: a
        walk ends at an empty page, and a client following new events keeps its cursor."""
        start_ms = parse_time(params, "from", None)
        end_ms = parse_time(params, "to", None)
        limit = self._page(params, default=self.config.max_page_size,
                           most=self.config.max_listing_page)
        after = parse_position(params)
        form = params.get("format") or "ndjson"
        if form not in ("ndjson", "csv"):
            raise HttpError(400, "format must be ndjson or csv")
        try:
            columns = csvformat.parse_columns(params.get("columns"))
        except ValueError as exc:
            raise HttpError(400, f"columns: {exc}") from None
        if columns is not None and form != "csv":
            raise HttpError(400, "columns is for format=csv")
        return self._read(self._read_listing, (si, start_ms, end_ms, after, limit, req.head,
                                               req.close, form, columns), req)

    def _read_listing(self, si, start_ms, end_ms, after, limit, head, close, form="ndjson",
                      columns=None) -> bytes:
        start, end = positions_between(self.log, start_ms, end_ms)
        if after is not None:
            start = max(start, after + 1)
        headers = ()
        if form == "csv":
            payloads, positions = site_event_payloads(self.log, self.views, si, start, end,
                                                      limit)
            columns = csvformat.columns_for(payloads, columns)
            body = csvformat.csv_header(columns) + csvformat.csv_rows(payloads, columns)
            content_type = CSV
        else:
            lines, positions = site_event_lines(self.log, self.views, si, start, end, limit)
            body = ("\n".join(lines) + "\n").encode() if lines else b""
            content_type = http.NDJSON
        if positions:
            headers = (("X-Next-After", str(positions[-1])),)
        return http.render(200, body, content_type=content_type, head=head, headers=headers,
                           close=close)

    def _stats(self, req, si: str, params: dict) -> Deferred:
        bucket = params.get("bucket", "hour")
        size = BUCKETS.get(bucket)
        if size is None:
            raise HttpError(400, "bucket must be minute, hour or day")
        start, end = self._range(params)
        return self._read(self._read_stats,
                          (si, bucket, size, start, end, _include_bots(params)), req)

    @staticmethod
    def _range(params: dict) -> tuple[int, int]:
        end = parse_time(params, "to", now_ms() + 1)
        start = parse_time(params, "from", end - 86_400_000)
        if start >= end:
            raise HttpError(400, "from must be before to")
        return start, end

    def _read_stats(self, si: str, bucket: str, size: int, start: int, end: int,
                    include_bots: bool) -> dict:
        buckets: dict[int, list] = {}
        site = site_key(si)
        first_minute, end_minute = start // 60_000, -(-end // 60_000)
        # whole hours from the hour counters (when the buckets are hours or days), the edges
        # from the minute counters
        first_hour, end_hour = -(-first_minute // 60), end_minute // 60
        if size < 3_600_000 or first_hour >= end_hour:
            first_hour = end_hour = end_minute // 60  # minutes only: both runs of them
        with self.views.read() as txn:
            for grain, period, counter in chain(
                    ((60_000, m, c) for m, c in self.views.minute_counters(
                        txn, site, first_minute, min(end_minute, first_hour * 60))),
                    ((3_600_000, h, c) for h, c in self.views.hour_counters(
                        txn, site, first_hour, end_hour)),
                    ((60_000, m, c) for m, c in self.views.minute_counters(
                        txn, site, max(first_minute, end_hour * 60), end_minute))):
                first = period * grain // size * size
                into = buckets.setdefault(first, [0, 0, 0])
                for i in range(3):
                    into[i] += counter[i]
                    if include_bots and len(counter) > 3:
                        into[i] += counter[i + 3]
            latest = tallies.open_day(txn, self.views.db, site)
            rows = []
            for first, c in sorted(buckets.items()):
                if not any(c):
                    continue
                sessions, visitors = tallies.uniques(
                    txn, self.views.db, site,
                    tallies.cover(max(first, start), min(first + size, end), open_day=latest),
                    include_bots)
                rows.append({"start": first, "events": c[0], "new_sessions": c[1],
                             "new_users": c[2], "sessions": sessions, "visitors": visitors})
            sessions, visitors = tallies.uniques(
                txn, self.views.db, site, tallies.cover(start, end, open_day=latest), include_bots)
        totals = {"events": sum(r["events"] for r in rows),
                  "new_sessions": sum(r["new_sessions"] for r in rows),
                  "new_users": sum(r["new_users"] for r in rows),
                  "sessions": sessions, "visitors": visitors}
        return {"si": si, "bucket": bucket, "from": start, "to": end,
                "include_bots": include_bots, "buckets": rows, "totals": totals}

    def _breakdown(self, req, si: str, params: dict) -> Deferred:
        names = self.views.reporting.dimensions.names
        by = params.get("by")
        if by not in names:
            raise HttpError(400, "by must be one of " + ", ".join(names))
        start, end = self._range(params)
        limit = self._page(params, default=10)
        return self._read(self._read_breakdown,
                          (si, by, start, end, limit, _include_bots(params)), req)

    def _read_breakdown(self, si: str, by: str, start: int, end: int, limit: int,
                        include_bots: bool) -> dict:
        site = site_key(si)
        with self.views.read() as txn:
            pieces = tallies.cover(start, end, b"hd",  # hours: breakdowns have no minutes
                                   open_day=tallies.open_day(txn, self.views.db, site))
            rows = tallies.breakdown(txn, self.views.db, site, by, pieces, include_bots, limit)
        first, last = pieces[0], pieces[-1]
        return {"si": si, "by": by, "from": first[1] * tallies.GRAIN_MS[first[0]],
                "to": (last[1] + 1) * tallies.GRAIN_MS[last[0]], "include_bots": include_bots,
                "rows": rows}

    def _sites(self, req, site: str) -> Deferred:
        return self._read(self._read_sites, (None if site == ADMIN_SITE else site,), req)

    def _read_sites(self, only: str | None) -> dict:
        """Each site (or the one a site token is for): first seen, last event, events held."""
        first_day = (now_ms() - int(self.config.ttl_s * 1000)) // tallies.DAY_MS
        out = []
        with self.views.read() as txn:
            db = self.views.db
            records = ([(site_key(only), txn.get(site_key(only), db=db["sites"]))]
                       if only is not None else txn.cursor(db=db["sites"]).iternext())
            for site, raw in records:
                if raw is None:
                    continue
                record = unpackb(raw)
                out.append({"si": record[0], "first_seen": record[1],
                            "last_event": record[2] if len(record) > 2 else None,
                            "events": tallies.events_since(txn, db, bytes(site), first_day)})
        out.sort(key=lambda row: row["si"])
        return {"sites": out}

    def _live(self, req, si: str, params: dict):
        if req.head:
            raise HttpError(405, "method not allowed", headers=(("Allow", "GET"),))
        last = req.headers.get(b"last-event-id")
        if last is not None:
            last = last.strip()
            if not last.isdigit() or len(last) > 19:
                raise HttpError(400, "Last-Event-ID must be a log position (an id: of this stream)")
            last = int(last)
        return LiveStream(si, last, since=self.log.last_position())

    def replay(self, si: str, after: int, until: int, done) -> None:
        """For a live stream resumed with Last-Event-ID: done(SSE bytes) with the site's
        events after `after` up to `until` (at most --live-replay-max, then a notice), once
        the views reach `until`; done(None) if they do not in time."""
        def go(ok: bool) -> None:
            if ok:
                self.pool.run(self._replay_bytes, (si, after, until), done)
            else:
                done(None)
        self.watch.wait(go, target=until)

    def _replay_bytes(self, si: str, after: int, until: int) -> bytes:
        most = self.config.live_replay_max
        site = site_key(si)
        with self.views.read() as txn:
            positions = self.views.site_positions(txn, site, after + 1, until + 1, most + 1)
        out = []
        with self.log.read() as txn:
            for position in positions[:most]:
                entry = self.log.get(txn, position)
                if entry is not None:
                    out.append(sse_event(entry))
        if len(positions) > most:
            notice = {"replayed": most, "after": positions[most - 1], "until": until,
                      "listing": f"/api/v1/events?after={positions[most - 1]}"}
            out.append(b"event: truncated\ndata: %s\n\n" % json.dumps(notice).encode())
        return b"".join(out)

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


# ---------------------------------------------------------------------- shared by reads

def positions_between(event_log, start_ms: int | None, end_ms: int | None) -> tuple[int, int]:
    """The run of log positions whose times are in [start_ms, end_ms) (times never decrease
    along the log)."""
    if start_ms is None and end_ms is None:
        return 1, END
    with event_log.read() as txn:
        start = event_log.position_at_time(txn, start_ms) if start_ms is not None else 1
        end = event_log.position_at_time(txn, end_ms) if end_ms is not None else END
    return start, end


def site_event_payloads(event_log, views, si: str, start: int, end: int,
                        limit: int) -> tuple[list[dict], list[int]]:
    """The payloads of a site's events at positions start <= p < end (at most limit), and the
    positions listed (an entry gone from the log since is skipped, its position kept)."""
    with views.read() as txn:
        positions = views.site_positions(txn, site_key(si), start, end, limit)
    with event_log.read() as txn:
        payloads = [event_payload(entry) for entry in
                    (event_log.get(txn, position) for position in positions)
                    if entry is not None]
    return payloads, positions


def site_event_lines(event_log, views, si: str, start: int, end: int,
                     limit: int) -> tuple[list[str], list[int]]:
    """NDJSON lines of a site's events (as site_event_payloads)."""
    payloads, positions = site_event_payloads(event_log, views, si, start, end, limit)
    return [json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
            for payload in payloads], positions


def parse_position(params: dict, name: str = "after") -> int | None:
    text = params.get(name)
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise HttpError(400, f"{name} must be a log position (the X-Next-After of a page)")
    return int(text)


def parse_time(params: dict, name: str, default):
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


def event_payload(entry) -> dict:
    """An event as the read API gives it; with a captured User-Agent, what it tells too
    (browser, os, device, and bot: true for a known bot)."""
    return {"event": entry.record(), "captured": with_agent(entry.captured or {})}


def with_agent(captured: dict) -> dict:
    user_agent = captured.get("user_agent")
    if user_agent is None:
        return captured
    return {**captured, **agent_fields(user_agent)}


def _include_bots(params: dict) -> bool:
    text = params.get("include_bots", "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise HttpError(400, "include_bots must be true or false")
    return text in ("true", "1")


def sse_event(entry) -> bytes:
    """One event of a live stream: its log position as the id."""
    return b"id: %d\ndata: %s\n\n" % (entry.position, json.dumps(
        event_payload(entry), ensure_ascii=False, separators=(",", ":")).encode())


def record_payload(kind: str, record: list) -> dict:
    return {kind: folded_record(record, kind), "captured": with_agent(record[R_CAPTURED]),
            "first_seen": record[R_FIRST], "last_seen": record[R_LAST],
            "event_count": record[R_COUNT]}


def session_summary(record: list) -> dict:
    flat = folded_record(record, "session")
    return {"sid": flat["sid"], "first_seen": record[R_FIRST], "last_seen": record[R_LAST],
            "event_count": record[R_COUNT]}
