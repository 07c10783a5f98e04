"""Who may send: registered sites, their origins, rate limits and quotas. No I/O on the hot path.

Ingest stays unauthenticated (a browser cannot keep a secret), so these guards decide *which*
sites and origins are taken, and *how much*. They run on the event loop after a request's events
are parsed and before the writer sees them, so a refusal stores nothing:

- `Registry`: the sites `otserver site add` registered (the log's `sites` database), held in
  memory and reloaded when the log's `sites_generation` changes: `Guards.tick`, on the
  server's clock (at most a second), reads that one key. With --require-site an event for a
  site that is not registered is refused with 403.
- Origins: a registered site with origins takes browser requests (those that carry `Origin`)
  only from them, answering with that origin in Access-Control-Allow-Origin and `Vary: Origin`;
  other origins get 403. Requests without `Origin` (servers, curl, the pixel) pass.
- `Buckets`: a token bucket per client address and per site. A request is admitted while its
  bucket holds at least one token and then pays for all its events, so a batch larger than the
  burst passes once and its debt holds the next request back: the rate holds on average. At
  most `capacity` keys are kept, the least recently seen dropped (a dropped key starts full).
- `Quotas`: the events a site holds within the TTL (the views' day counters, read again on
  every tick for the sites seen since the last, plus what this process accepted since) against
  --max-events-per-site.

Each worker process keeps its own buckets and counts: with --workers N a client whose
connections spread over the workers can reach up to N times a rate.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter, OrderedDict

from .errors import HttpError

SITES_TRACKED = 10_000  # sites a process keeps buckets and quota counts for (LRU)
BURST_SECONDS = 10  # a burst of 0 means this many seconds of the rate
DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN = re.compile(r"(https?)://(\*\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])"
                     r"(?::(\d{1,5}))?/?")
CORS_TAIL = (b"Access-Control-Expose-Headers: X-Eid, Retry-After\r\n"
             b"Cache-Control: no-store\r\nVary: Origin\r\n")


class Refused(HttpError):
    """A guard's refusal (403 or 429); `guard` names it in /metrics."""

    __slots__ = ("guard",)

    def __init__(self, status: int, guard: str, reason: str, retry_after: float | None = None):
        headers = (("Retry-After", str(max(1, math.ceil(retry_after)))),) \
            if retry_after is not None else ()
        super().__init__(status, reason, headers=headers)
        self.guard = guard


def parse_origin(text: str) -> str:
    """'https://WWW.Example.com:443/' -> 'https://www.example.com', as a browser sends it in
    `Origin`. A pattern may begin its host with `*.`: any subdomain (not the domain itself)."""
    match = _ORIGIN.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not an origin: {text!r} (scheme://host[:port], e.g. "
                         "https://www.example.com or https://*.example.com)")
    scheme, wild, host, port = match.groups()
    if wild and host.startswith("["):
        raise ValueError(f"not an origin: {text!r} (an address cannot take a wildcard)")
    if port is not None:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(f"not an origin: {text!r} (a port is 1 to 65535)")
        port = None if number == DEFAULT_PORTS[scheme] else str(number)
    return f"{scheme}://{wild or ''}{host}" + (f":{port}" if port else "")


def parse_origins(text: str) -> list[str]:
    """'https://a.example, https://*.b.example' -> the normalised origins, each once."""
    origins: list[str] = []
    for part in text.split(","):
        if part.strip():
            origin = parse_origin(part)
            if origin not in origins:
                origins.append(origin)
    return origins


class SiteEntry:
    """A registered site and the origins its browser requests may come from."""

    __slots__ = ("si", "created", "origins", "_exact", "_wild", "_answers")

    def __init__(self, si: str, created: int, origins: list[str]):
        self.si = si
        self.created = created
        self.origins = origins
        self._exact = frozenset(o for o in origins if "://*." not in o)
        wild = []
        for origin in origins:
            if "://*." in origin:
                scheme, rest = origin.split("://*", 1)  # rest: ".example.com[:port]"
                host, _, port = rest.partition(":")
                wild.append((scheme + "://", host, port))
        self._wild = tuple(wild)
        self._answers: dict[bytes, bytes | None] = {}  # Origin header -> CORS block / None

    def cors_for(self, origin: bytes) -> bytes | None:
        """The CORS header block answering `origin`, or None when it is not allowed."""
        answer = self._answers.get(origin, False)
        if answer is False:
            answer = self._decide(origin)
            if len(self._answers) < 1000:
                self._answers[origin] = answer
        return answer

    def _decide(self, origin: bytes) -> bytes | None:
        text = origin.decode("latin-1").strip().lower()
        allowed = text in self._exact
        for prefix, suffix, port in self._wild:
            if allowed:
                break
            if text.startswith(prefix):
                host, _, given_port = text[len(prefix):].partition(":")
                allowed = (host.endswith(suffix) and len(host) > len(suffix)
                           and "/" not in host and given_port == port)
        if not allowed:
            return None
        return b"Access-Control-Allow-Origin: " + origin.strip() + b"\r\n" + CORS_TAIL


class Registry:
    """The registered sites, as the log holds them (reloaded when they change)."""

    def __init__(self, log):
        self.log = log
        self.sites: dict[str, SiteEntry] = {}
        self.generation = -1
        self.refresh()

    def refresh(self) -> bool:
        """Reload when `otserver site` changed the sites; -> whether it did."""
        generation = self.log.sites_generation()
        if generation == self.generation:
            return False
        self.sites = {si: SiteEntry(si, created, origins)
                      for si, created, origins in self.log.list_sites()}
        self.generation = generation
        return True


class Buckets:
    """Token buckets by key: `rate` tokens a second, at most `burst` held, `capacity` keys."""

    __slots__ = ("rate", "burst", "capacity", "_entries", "dropped")

    def __init__(self, rate: float, burst: float, capacity: int):
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()  # key -> [tokens, when], oldest first
        self.dropped = 0  # keys forgotten to keep within capacity

    def __len__(self) -> int:
        return len(self._entries)

    def wait(self, key, now: float) -> float:
        """0 when `key` may send now, else the seconds until it may."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        self._entries.move_to_end(key)  # seen: the last to be dropped
        tokens = entry[0] + (now - entry[1]) * self.rate
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def charge(self, key, count: int, now: float) -> None:
        """`key` sent `count` events now (after `wait` admitted it)."""
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            if len(entries) >= self.capacity:
                entries.popitem(last=False)
                self.dropped += 1
            entries[key] = [self.burst - count, now]
            return
        entry[0] = min(self.burst, entry[0] + (now - entry[1]) * self.rate) - count
        entry[1] = now
        entries.move_to_end(key)


class Quotas:
    """Events each site holds within the TTL, against a limit."""

    def __init__(self, held_of, limit: int, capacity: int = SITES_TRACKED):
        self.held_of = held_of  # (sites) -> {si: events held}, read from the views
        self.limit = limit
        self.capacity = capacity
        self._held: OrderedDict = OrderedDict()  # si -> events held (views + accepted here)
        self._seen: set = set()  # sites that sent since the last refresh

    def over(self, si: str, count: int) -> bool:
        held = self._held.get(si)
        if held is None:
            held = self.held_of([si])[si]
            if len(self._held) >= self.capacity:
                self._held.popitem(last=False)
            self._held[si] = held
        else:
            self._held.move_to_end(si)
        self._seen.add(si)
        return held + count > self.limit

    def add(self, si: str, count: int) -> None:
        self._held[si] += count

    def refresh(self) -> None:
        """Counts from the views again for the sites seen since the last refresh; the rest
        are forgotten (and read again when they send)."""
        seen, self._seen = self._seen, set()
        fresh = self.held_of(sorted(seen)) if seen else {}
        self._held = OrderedDict((si, fresh[si]) for si in self._held if si in fresh)


class Guards:
    """Every guard, as one check per ingest request (`admit`)."""

    def __init__(self, config, log, held_of=None, clock=time.monotonic):
        self.clock = clock
        self.registry = Registry(log)
        self.require_site = config.require_site
        self.per_ip = self._buckets(config.rate_limit_per_ip, config.rate_limit_per_ip_burst,
                                    config.rate_limit_clients)
        self.per_site = self._buckets(config.rate_limit_per_site,
                                      config.rate_limit_per_site_burst, SITES_TRACKED)
        self.quotas = (Quotas(held_of, config.max_events_per_site)
                       if config.max_events_per_site and held_of is not None else None)
        self.refused: Counter = Counter()  # guard -> requests refused
        self._next_tick = 0.0
        self.active = False
        self._update_active()

    @staticmethod
    def _buckets(rate: int, burst: int, capacity: int) -> Buckets | None:
        if not rate:
            return None
        return Buckets(rate, burst or rate * BURST_SECONDS, capacity)

    def _update_active(self) -> None:
        self.active = bool(self.require_site or self.registry.sites
                           or self.per_ip is not None or self.per_site is not None
                           or self.quotas is not None)

    def tick(self) -> None:
        """On the server's clock, once a second at most: pick up `otserver site` changes,
        count the quotas from the views again."""
        now = self.clock()
        if now < self._next_tick:
            return
        self._next_tick = now + 1.0
        if self.registry.refresh():
            self._update_active()
        if self.quotas is not None:
            self.quotas.refresh()

    def check_client(self, address: str) -> None:
        """Before a request is parsed: refuse a client that is over its rate."""
        if self.per_ip is not None and address:
            wait = self.per_ip.wait(address, self.clock())
            if wait:
                self._refuse(429, "rate_limit_ip", "too many events from this address "
                             f"(--rate-limit-per-ip {self.per_ip.rate:g}/s); retry later", wait)

    def admit(self, events: list, origin: bytes | None, address: str) -> bytes | None:
        """Refuse (403, 429) events that may not be stored; else charge the buckets and
        quotas and return the CORS header block of the answer (None: the usual `*`)."""
        if len(events) == 1:
            counts = {events[0].si: 1}
        else:
            counts = Counter(event.si for event in events)
        cors = None
        sites = self.registry.sites
        for si in counts:
            entry = sites.get(si)
            if entry is None:
                if self.require_site:
                    self._refuse(403, "unregistered_site", f"site {_quoted(si)} is not "
                                 "registered on this server (otserver site add)")
            elif entry.origins and origin is not None:
                cors = entry.cors_for(origin)
                if cors is None:
                    self.refuse_origin(origin, si)
        now = self.clock()
        per_site = self.per_site
        if per_site is not None:
            for si in counts:
                wait = per_site.wait(si, now)
                if wait:
                    self._refuse(429, "rate_limit_site", f"too many events for site "
                                 f"{_quoted(si)} (--rate-limit-per-site {per_site.rate:g}/s); "
                                 "retry later", wait)
        quotas = self.quotas
        if quotas is not None:
            for si, count in counts.items():
                if quotas.over(si, count):
                    self._refuse(429, "quota", f"site {_quoted(si)} is at its quota of "
                                 f"{quotas.limit} events held (--max-events-per-site); it "
                                 "takes more as old events expire", _to_next_day())
        if self.per_ip is not None and address:
            self.per_ip.charge(address, len(events), now)
        for si, count in counts.items():
            if per_site is not None:
                per_site.charge(si, count, now)
            if quotas is not None:
                quotas.add(si, count)
        return cors

    def refuse_origin(self, origin: bytes, si: str):
        self._refuse(403, "origin", f"origin {_quoted(origin.decode('latin-1'))} may not "
                     f"send events for site {_quoted(si)} (otserver site add --origins)")

    def _refuse(self, status: int, guard: str, reason: str, wait: float | None = None):
        self.refused[guard] += 1
        raise Refused(status, guard, reason, wait)

    def snapshot(self) -> dict:
        return {"refused": dict(self.refused),
                "clients": len(self.per_ip) if self.per_ip is not None else 0,
                "clients_dropped": self.per_ip.dropped if self.per_ip is not None else 0,
                "registered_sites": len(self.registry.sites)}


def _quoted(text: str) -> str:
    """A name from the request, quoted and cut short for a refusal's text."""
    text = text if len(text) <= 80 else text[:80] + "..."
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _to_next_day() -> float:
    """Seconds until the next UTC midnight: when a quota's oldest held day leaves the window."""
    return 86400 - time.time() % 86400
