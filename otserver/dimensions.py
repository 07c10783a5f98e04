"""What a report breaks events down by: each event's value of every dimension. Pure.

Built-in dimensions (the API's `by=`):
  url            the path of the event's `url` property (ot.js sends the page URL), else of the
                 captured Referer header (the page a pixel or beacon was sent from)
  referrer_host  the host of the `referrer` property (lower case, without `www.`);
                 "(direct)" when there is none, "(internal)" when it is the page's own host
  utm_source, utm_medium, utm_campaign
                 the property, else the parameter in the url's query string
  ev             the `ev` property (ot.js: pageview, or the name given to ot.track)
  browser, os, device
                 the captured User-Agent, parsed by agents.classify
and every property named in --breakdown-properties (its value as sent).

Every event has exactly one value per dimension ("(none)" when it has nothing to say), so
the rows of a breakdown add up to the events of the range. A value is cut to
MAX_VALUE_BYTES of UTF-8 (it is part of an LMDB key). Parsing results are memoised (bounded):
a site's pages, referrers and agents repeat.
"""
from __future__ import annotations

from functools import lru_cache
from urllib.parse import parse_qs, urlsplit

from .agents import classify

NONE = "(none)"
DIRECT = "(direct)"
INTERNAL = "(internal)"
OTHER = "(other)"
UTM = ("utm_source", "utm_medium", "utm_campaign")
AGENT = ("browser", "os", "device")
BUILT_IN = ("url", "referrer_host") + UTM + ("ev",) + AGENT
MAX_VALUE_BYTES = 300
MAX_NAME_CHARS = 128
MEMO_SIZE = 65536


def parse_names(text: str) -> tuple[str, ...]:
    """--breakdown-properties 'plan,team' -> ('plan', 'team'); refuses a built-in or bad name."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if name in BUILT_IN:
            raise ValueError(f"--breakdown-properties: {name} is a built-in dimension")
        if not (name.isascii() and name.isprintable() and " " not in name
                and len(name) <= MAX_NAME_CHARS):
            raise ValueError(f"--breakdown-properties: {name!r} is not a property name")
    return names


def cut(value: str) -> str:
    raw = value.encode("utf-8", "surrogatepass")
    if len(raw) <= MAX_VALUE_BYTES:
        return value or NONE
    return raw[:MAX_VALUE_BYTES].decode("utf-8", "ignore")


@lru_cache(maxsize=16384)
def _url_parts(url: str) -> tuple[str, str, dict]:
    """-> (path, host, utm parameters of the query)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return NONE, "", {}
    utm = {}
    if "utm_" in parts.query:
        for name, values in parse_qs(parts.query).items():
            if name in UTM and values[0]:
                utm[name] = values[0]
    return cut(parts.path or "/"), _host(parts.hostname or ""), utm


def _host(host: str) -> str:
    host = host.lower()
    return host[4:] if host.startswith("www.") else host


@lru_cache(maxsize=16384)
def _referrer_host(referrer: str) -> str:
    try:
        host = urlsplit(referrer).hostname
    except ValueError:
        return NONE
    return cut(_host(host)) if host else NONE


class Dimensions:
    """The dimensions a store counts: the built-in ones and the configured properties."""

    __slots__ = ("names", "properties", "_memo")

    def __init__(self, properties: tuple[str, ...] = ()):
        self.properties = properties
        self.names = BUILT_IN + properties
        self._memo: dict[tuple, tuple] = {}  # what values() reads -> its answer

    def values(self, props: dict, captured: dict | None) -> tuple[bool, tuple[str, ...]]:
        """-> (bot, the value of each dimension in the order of `names`). Memoised on what
        it reads (a site's events repeat their pages, referrers and agents); the memo is
        emptied when it holds MEMO_SIZE answers."""
        get = props.get
        captured = captured or {}
        key = (get("url"), captured.get("referer"), get("referrer"), captured.get("user_agent"),
               get("ev"), get("utm_source"), get("utm_medium"), get("utm_campaign"),
               *[get(name) for name in self.properties])
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            found = self._memo[key] = self._values(props, captured)
        return found

    def _values(self, props: dict, captured: dict) -> tuple[bool, tuple[str, ...]]:
        agent = classify(captured.get("user_agent"))
        url = props.get("url") or captured.get("referer")
        if url:
            path, host, utm = _url_parts(url)
        else:
            path, host, utm = NONE, "", {}
        referrer = props.get("referrer")
        if referrer:
            source = _referrer_host(referrer)
            if source == host:
                source = INTERNAL
        else:
            source = DIRECT
        out = [path, source]
        for name in UTM:
            value = props.get(name) or utm.get(name)
            out.append(cut(value) if value else NONE)
        ev = props.get("ev")
        out.append(cut(ev) if ev else NONE)
        out += (agent.browser, agent.os, agent.device)
        for name in self.properties:
            value = props.get(name)
            out.append(cut(value) if value else NONE)
        return agent.bot, tuple(out)
