"""Routes (method, path) to the code that answers. No transport in sight.

`Handler.handle(request)` returns one of the answer types: bytes (a whole answer, ready to
write), an `IngestJob` (events to append to the log; `Handler.answer(job, error, close)` renders
its answer once the writer reports), a `Deferred` (an answer that comes later: a read waiting
for the views, an erasure) or a `LiveStream`. The protocol owns the rest.
"""
from __future__ import annotations

import ipaddress

from . import http
from .assets import ASSETS
from .errors import BadRequest, HttpError, Unavailable
from .idempotency import (KEY_PROPERTY, Conflict, body_digest, conflict_reason, header_key,
                          take_item_key, units_of)
from .model import (EidGenerator, json_properties, make_event, now_ms, parse_json,
                    parse_properties)

INGEST_PATHS = {
    b"/": b"GET, POST, OPTIONS",
    b"/batch": b"POST, OPTIONS",
    b"/pixel.gif": b"GET, OPTIONS",
}
OPS_PATHS = frozenset((b"/healthz", b"/readyz", b"/metrics"))
FORM_TYPES = (b"", b"application/x-www-form-urlencoded", b"text/plain")
JSON_TYPE = b"application/json"
OVERLOADED = object()  # Handler.answer's error for a job the writer would not take


class Request:
    """One parsed request. Header values kept are those otserver reads (lower-case names)."""

    __slots__ = ("method", "path", "query", "headers", "body", "peer", "close", "head")

    def __init__(self, method: bytes, path: bytes, query: bytes, headers: dict, body: bytes,
                 peer: str, close: bool):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.peer = peer
        self.close = close
        self.head = method == b"HEAD"


class IngestJob:
    """Events waiting for their commit (encoded as log entries), their idempotency units (or
    None), and the shape of the answer (text, pixel or batch). A replayed event answers with
    its original eid: the writer reports them in `replaced` (index -> eid)."""

    __slots__ = ("events", "values", "kind", "path", "units", "part", "cors")

    def __init__(self, events: list, kind: int, path: bytes, units: list | None = None,
                 part: str | None = None):
        self.events = events
        self.values = [ev.encode() for ev in events]
        self.kind = kind
        self.path = path
        self.units = units
        self.part = part  # what a batch's parts are called in a refusal: "line" or "item"
        self.cors: bytes | None = None  # the CORS block for one allowed origin (None: any)

    def answer(self, close: bool, replaced: dict | None = None) -> bytes:
        eids = [ev.eid for ev in self.events]
        if replaced:
            for index, eid in replaced.items():
                eids[index] = eid
        if self.kind == KIND_TEXT:
            return http.ok_eid(eids[0], close, self.cors)
        if self.kind == KIND_PIXEL:
            return http.ok_pixel(eids[0], close, self.cors)
        return http.ok_batch(eids, close, self.cors)


KIND_TEXT, KIND_PIXEL, KIND_BATCH = range(3)


class Deferred:
    """An answer that is not ready yet: `start(done)` begins the work, which ends in exactly
    one call done(answer bytes), on the event loop."""

    __slots__ = ("start",)

    def __init__(self, start):
        self.start = start


class LiveStream:
    """The answer to /api/v1/live: the connection becomes an event stream of one site, from
    `last_id` (Last-Event-ID) or else from `since`, the log's last position when the request
    was answered (so an event committed while the answer leaves is streamed, not lost)."""

    __slots__ = ("si", "last_id", "since")

    def __init__(self, si: str, last_id: int | None = None, since: int | None = None):
        self.si = si
        self.last_id = last_id
        self.since = since


class _Keys:
    """A request's idempotency keys while its events are parsed: `take` each event's
    properties before its ids are resolved, then `units`. Costs a dict lookup per event when
    no key is sent."""

    __slots__ = ("request", "items", "bodies")

    def __init__(self, request: str | None):
        self.request = request
        self.items: list = []
        self.bodies: list = []

    def take(self, props: dict) -> None:
        key = take_item_key(props) if KEY_PROPERTY in props else None
        if key is not None or self.request is not None:
            while len(self.bodies) < len(self.items):  # events before the first key
                self.bodies.append(None)
            self.bodies.append(body_digest(props, key))
        self.items.append(key)

    def units(self, events: list) -> list | None:
        if self.request is None and not self.bodies:
            return None
        return units_of(events, self.bodies, self.items, self.request)


def anonymize(address: str) -> str:
    """IPv4: last octet zeroed; IPv6: last 80 bits zeroed."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return ""
    if ip.version == 4:
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFF00))
    if ip.ipv4_mapped is not None:
        return str(ipaddress.IPv4Address(int(ip.ipv4_mapped) & 0xFFFFFF00))
    return str(ipaddress.IPv6Address(int(ip) & ~((1 << 80) - 1)))


class Handler:
    def __init__(self, config, api=None, eids: EidGenerator | None = None, *,
                 not_ready=None, metrics_text=None, watch=None, guards=None):
        self.config = config
        self.api = api
        self.guards = guards  # who may send (guards.Guards), or None
        self.not_ready = not_ready  # () -> why /readyz is 503, or None
        self.metrics_text = metrics_text  # () -> the /metrics page
        self.watch = watch  # the folder's progress: ingest refuses past --max-view-lag
        self.eids = eids or EidGenerator()
        self._trusted = config.trusted_proxies
        self._ip_cache: dict[str, str] = {}
        self._retry = (("Retry-After", str(config.retry_after_s)),)

    def answer(self, job: IngestJob, error, close: bool, replaced: dict | None = None) -> bytes:
        """The answer to an ingest job once the writer has reported: 200 with the eids (the
        original ones of replayed events, `replaced`), 422 for a key used with another body,
        or 503 (`error` says why the log could not commit, or is OVERLOADED: too many events
        wait)."""
        if error is None:
            return job.answer(close, replaced)
        cors = job.cors or True
        if isinstance(error, Conflict):
            return http.error(422, conflict_reason(job.units, error.unit, job.part), cors=cors,
                              close=close)
        if error is OVERLOADED:
            reason = "overloaded: too many events waiting for a commit"
        else:
            reason = f"storage unavailable: {error}"
        return http.error(503, reason, cors=cors, headers=self._retry, close=close)

    # ------------------------------------------------------------------ dispatch

    def handle(self, req: Request):
        path = req.path
        allowed = INGEST_PATHS.get(path)
        try:
            if allowed is not None:
                return self._ingest(req, path, allowed)
            if path.startswith(b"/api/"):
                if self.api is None:
                    return http.error(404, "not found", head=req.head)
                return self.api.handle(req)
            asset = ASSETS.get(path)
            if asset is not None:
                if req.method not in (b"GET", b"HEAD"):
                    return http.error(405, "method not allowed", headers=(("Allow", "GET, HEAD"),))
                return asset.answer(req.headers, req.head, req.close)
            if path in OPS_PATHS:
                if req.method not in (b"GET", b"HEAD"):
                    return http.error(405, "method not allowed", headers=(("Allow", "GET, HEAD"),))
                return self._operations(req, path)
            return http.error(404, "not found", head=req.head)
        except HttpError as exc:
            return http.error(exc.status, exc.reason, cors=allowed is not None,
                              headers=exc.headers, close=exc.close or req.close, head=req.head)

    def _operations(self, req: Request, path: bytes) -> bytes:
        if path == b"/healthz":
            return http.render(200, b"ok\n", head=req.head)
        if path == b"/readyz":
            problem = self.not_ready() if self.not_ready is not None else None
            if problem:
                return http.error(503, problem, head=req.head)
            return http.render(200, b"ready\n", head=req.head)
        if self.metrics_text is None:
            return http.error(404, "not found", head=req.head)
        return http.render(200, self.metrics_text(), head=req.head,
                           content_type=b"text/plain; version=0.0.4; charset=utf-8")

    def _ingest(self, req: Request, path: bytes, allowed: bytes):
        method = req.method
        guards = self.guards
        if method == b"OPTIONS":
            return http.preflight(req.close, self._preflight_cors(req))
        if method not in allowed.split(b", "):
            raise HttpError(405, "method not allowed", headers=(("Allow", allowed.decode()),))
        config = self.config
        address = self._source(req.peer, req.headers)
        if guards is not None and guards.active:
            guards.check_client(address)  # a client over its rate costs no parsing
        captured = self._captured(req, address)
        keys = _Keys(header_key(req.headers))
        if path == b"/batch":
            events, part = self._batch_events(req, captured, keys)
            job = IngestJob(events, KIND_BATCH, path, keys.units(events), part)
        else:
            props = parse_properties(req.query, config)
            if method == b"POST":
                if self._body_type(req) == JSON_TYPE:
                    json_properties(parse_json(req.body), config, props)
                else:
                    parse_properties(req.body.rstrip(b"\r\n"), config, props)
            keys.take(props)
            events = [make_event(props, captured, self.eids, now_ms(), config)]
            job = IngestJob(events, KIND_PIXEL if path == b"/pixel.gif" else KIND_TEXT, path,
                            keys.units(events))
        if self.watch is not None and self.watch.over_lag():
            raise Unavailable(f"the views are {self.watch.lag()} events behind the log "
                              f"(past --max-view-lag); retry", config.retry_after_s)
        if guards is not None and guards.active:
            job.cors = guards.admit(events, req.headers.get(b"origin"), address)
        return job

    def _preflight_cors(self, req: Request) -> bytes | None:
        """A preflight naming its site in the query answers as that site's requests will:
        its own origin, or 403 for an origin the site does not allow."""
        guards, origin = self.guards, req.headers.get(b"origin")
        if guards is None or not guards.registry.sites or origin is None or not req.query:
            return None
        try:
            si = parse_properties(req.query, self.config).get("si")
        except BadRequest:
            return None
        entry = guards.registry.sites.get(si) if si else None
        if entry is None or not entry.origins:
            return None
        cors = entry.cors_for(origin)
        if cors is None:
            guards.refuse_origin(origin, si)
        return cors

    def _batch_events(self, req: Request, captured, keys: "_Keys") -> tuple[list, str]:
        """Every event of a batch and what its parts are called ("line", "item"), or a refusal
        naming the line (or JSON item) at fault."""
        config = self.config
        defaults = parse_properties(req.query, config)
        if self._body_type(req) == JSON_TYPE:
            items = parse_json(req.body)
            if not isinstance(items, list):
                raise BadRequest("a JSON batch is an array of event objects: [{...}, {...}]")
            parts = list(enumerate(items, 1))
            parse, where = json_properties, "item"
        else:
            parts = [(number, line) for number, line in enumerate(req.body.splitlines(), 1)
                     if line]
            parse, where = parse_properties, "line"
        if not parts:
            raise BadRequest("empty batch: send one url-encoded property set per line, or a "
                             "JSON array of event objects")
        if len(parts) > config.max_batch_events:
            raise BadRequest(f"too many events in one batch: at most {config.max_batch_events}")
        events = []
        ts = now_ms()
        for number, part in parts:
            try:
                props = parse(part, config, dict(defaults))
                keys.take(props)
                events.append(make_event(props, captured, self.eids, ts, config))
            except BadRequest as exc:
                raise BadRequest(f"{where} {number}: {exc.reason}") from None
        return events, where

    @staticmethod
    def _body_type(req: Request) -> bytes:
        """The body's media type: a form, text (as sendBeacon sends), or JSON; else 415."""
        ctype = req.headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if ctype not in FORM_TYPES and ctype != JSON_TYPE:
            raise HttpError(415, "send application/x-www-form-urlencoded, text/plain or "
                                 "application/json")
        return ctype

    # ------------------------------------------------------------------ captured fields

    def _captured(self, req: Request, address: str) -> dict | None:
        config = self.config
        captured = {}
        headers = req.headers
        if config.capture_user_agent:
            ua = headers.get(b"user-agent")
            if ua:
                captured["user_agent"] = ua.decode("utf-8", "replace")
        if config.capture_referer:
            referer = headers.get(b"referer")
            if referer:
                captured["referer"] = referer.decode("utf-8", "replace")
        ip = self._stored_address(address)  # "" with --no-capture-ip
        if ip:
            captured["ip"] = ip
        return captured or None

    def client_address(self, peer: str, headers: dict) -> str:
        """The client's address as it is stored: behind a trusted proxy, the client it
        forwarded for; anonymised with --anonymize-ip; "" when --no-capture-ip."""
        return self._stored_address(self._source(peer, headers))

    def _source(self, peer: str, headers: dict) -> str:
        """The client's address: behind a trusted proxy, the client it forwarded for (what
        the rate limiter counts by, never anonymised, never stored)."""
        if self._trusted and b"x-forwarded-for" in headers:
            return self._forwarded_for(peer, headers[b"x-forwarded-for"])
        return peer

    def _stored_address(self, address: str) -> str:
        if not self.config.capture_ip:
            return ""
        if not self.config.anonymize_ip:
            return address
        ip = self._ip_cache.get(address)
        if ip is None:
            ip = anonymize(address)
            if len(self._ip_cache) > 10_000:
                self._ip_cache.clear()
            self._ip_cache[address] = ip
        return ip

    def _forwarded_for(self, peer: str, header: bytes) -> str:
        """The client address: walking X-Forwarded-For from the right, the first hop that is
        not a trusted proxy, provided the peer itself is one."""
        if not self._is_trusted(peer):
            return peer
        address = peer
        for hop in reversed(header.decode("latin-1").split(",")):
            hop = hop.strip()
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break
            address = hop
            if not self._is_trusted(hop):
                break
        return address

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)
