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

import heapq
import math
import re
import time
from collections import Counter

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
    """Token buckets by key: `rate` tokens a second, at most `burst` held, at most `capacity`
    keys (then the least recently seen eighth is forgotten: one sort per many new keys, so a
    request costs one dict lookup)."""

    __slots__ = ("rate", "burst", "capacity", "_entries", "dropped")

    def __init__(self, rate: float, burst: float, capacity: int):
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._entries: dict = {}  # key -> [tokens, last seen]
        self.dropped = 0  # keys forgotten to keep within capacity

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key, count: int, now: float) -> float:
        """Admit `key` and charge it `count` tokens: -> 0. Or, when its bucket holds less than
        one token, charge nothing: -> the seconds until it may send."""
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.capacity:
                self._forget()
            self._entries[key] = [self.burst - count, now]
            return 0.0
        tokens = entry[0] + (now - entry[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        entry[1] = now
        if tokens < 1:
            entry[0] = tokens
            return (1 - tokens) / self.rate
        entry[0] = tokens - count
        return 0.0

    def charge(self, key, count: int) -> None:
        """`key`, admitted by `take`, turned out to send `count` more events."""
        entry = self._entries.get(key)
        if entry is not None:
            entry[0] -= count

    def _forget(self) -> None:
        entries = self._entries
        drop = max(1, len(entries) // 8)
        for key, _ in heapq.nsmallest(drop, entries.items(), key=_last_seen):
            del entries[key]
        self.dropped += drop


def _last_seen(item) -> float:
    return item[1][1]


class Quotas:
    """Events each site holds within the TTL, against a limit. Holds the sites that sent
    since the last refresh (at most `capacity` of them)."""

    def __init__(self, held_of, limit: int, capacity: int = SITES_TRACKED):
        self.held_of = held_of  # (sites) -> {si: events held}, read from the views
        self.limit = limit
        self.capacity = capacity
        self._held: dict = {}  # si -> events held (the views' count + accepted here since)

    def take(self, si: str, count: int) -> bool:
        """Count `count` more events for `si`; False (nothing counted) past the quota."""
        held = self._held.get(si)
        if held is None:
            held = self.held_of([si])[si]
            if len(self._held) >= self.capacity:  # many sites within one second
                del self._held[next(iter(self._held))]
        if held + count > self.limit:
            self._held[si] = held
            return False
        self._held[si] = held + count
        return True

    def give_back(self, counts: dict, refused: str) -> None:
        """A batch was refused at site `refused`: uncount the sites taken before it."""
        for si, count in counts.items():
            if si == refused:
                return
            self._held[si] -= count

    def refresh(self) -> None:
        """Count again from the views, for the sites that sent since the last refresh; the
        rest are forgotten (and read again when they send)."""
        if self._held:
            self._held = self.held_of(sorted(self._held))


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
        self._next_tick = now + 0.9  # the clock's ticks come a second apart: take each one
        if self.registry.refresh():
            self._update_active()
        if self.quotas is not None:
            self.quotas.refresh()

    def check_client(self, address: str) -> None:
        """Before a request is parsed: refuse a client that is over its rate, else charge it
        one event (`admit` charges the rest of a batch). So every request counts, refused
        ones too: a flood of bad requests is held back like any other."""
        if self.per_ip is not None and address:
            wait = self.per_ip.take(address, 1, self.clock())
            if wait:
                self._refuse(429, "rate_limit_ip", "too many events from this address "
                             f"(--rate-limit-per-ip {self.per_ip.rate:g}/s); retry later", wait)

    def admit(self, events: list, origin: bytes | None, address: str) -> bytes | None:
        """Refuse (403, 429) events that may not be stored; else charge the buckets and
        quotas and return the CORS header block of the answer (None: the usual `*`). A batch
        refused by one site's rate may already have been charged to another site's."""
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
        per_site = self.per_site
        if per_site is not None:
            now = self.clock()
            for si, count in counts.items():
                wait = per_site.take(si, count, now)
                if wait:
                    self._refuse(429, "rate_limit_site", f"too many events for site "
                                 f"{_quoted(si)} (--rate-limit-per-site {per_site.rate:g}/s); "
                                 "retry later", wait)
        quotas = self.quotas
        if quotas is not None:  # last: what it counts is stored (or the writer says why not)
            for si, count in counts.items():
                if not quotas.take(si, count):
                    quotas.give_back(counts, si)
                    self._refuse(429, "quota", f"site {_quoted(si)} is at its quota of "
                                 f"{quotas.limit} events held (--max-events-per-site); it "
                                 "takes more as old events expire", _to_next_day())
        if len(events) > 1 and self.per_ip is not None and address:
            self.per_ip.charge(address, len(events) - 1)
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
