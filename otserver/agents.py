"""User-Agent strings -> Agent(browser, os, device, bot): what kind of client sent an event.

Invariants:
- Pure: no I/O, no clock, no threads. The only state is built once at import (the ua-parser
  resolver, the crawler matcher) and one memo; `classify(s)` always returns the same Agent for
  the same `s`.
- Bounded: `classify` is memoised by an LRU of CACHE_SIZE (4096) entries, keyed on the first
  MAX_PARSED_CHARS (1024) characters of the string. Nothing past them is read, so the memo holds
  at most ~4 MiB of keys and one hostile 16 KiB header costs what 1 KiB of junk costs (about 2 ms).
- `device` is one of DEVICE_CLASSES, and `device == "bot"` exactly when `bot` is True.
- `browser` and `os` are ua-parser's families ("Chrome", "Mobile Safari", "Mac OS X", ...),
  "Unknown" when ua-parser recognises nothing.
- `bot` is crawlerdetect's verdict (its own patterns and exclusions), or ua-parser's device
  family "Spider", or a "HeadlessChrome" token; but never for a UA that starts with an HTTP
  library or tool's token (curl/, python-requests/, okhttp/, ...: _HTTP_CLIENT), since those
  are how devices and servers send events on purpose (device "other").

Engines, fastest available, same answers:
- ua-parser 1.0 picks its resolver by what is installed: `ua_parser.BestAvailableResolver` is the
  Rust one (ua_parser_rs, the `[regex]` extra) when importable, else re2, else pure Python. We use
  that choice, but without ua-parser's own cache, since the LRU here already memoises.
- crawlerdetect searches one alternation of ~1,500 patterns with Python's `re`: about 1 ms per
  browser string and ~100 ms per 4 KiB of junk. When ua_parser_rs is present, the same patterns go
  into its prefiltered regex set (the few lookarounds Rust cannot compile stay in a small Python
  regex). Exclusions are still stripped first with Python's `re`, exactly as crawlerdetect does.
  Without ua_parser_rs, crawlerdetect's own CrawlerDetect runs, built once here.

Why callers classify at fold time, off the ack path: a memo hit is ~0.3 µs, but a miss costs
~100 µs with the Rust engines, a few ms without them, and ~2 ms for hostile junk. The ingest path
stores the raw header and answers; the folder and the read API classify later, where a slow string
only delays a view, never an ack.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, NamedTuple

import ua_parser
from ua_parser import Domain

__all__ = [
    "Agent",
    "CACHE_SIZE",
    "CRAWLER_ENGINE",
    "DEVICE_CLASSES",
    "MAX_PARSED_CHARS",
    "UA_RESOLVER",
    "UNKNOWN_AGENT",
    "DERIVED_FIELDS",
    "agent_fields",
    "classify",
    "warm",
]

CACHE_SIZE = 4096
MAX_PARSED_CHARS = 1024
DEVICE_CLASSES = ("desktop", "mobile", "tablet", "bot", "other")


class Agent(NamedTuple):
    browser: str
    os: str
    device: str
    bot: bool


UNKNOWN_AGENT = Agent("Unknown", "Unknown", "other", False)


def _build_ua_parser() -> tuple[ua_parser.Parser, str]:
    resolver_ctor = ua_parser.BestAvailableResolver
    if ua_parser.RegexResolver or ua_parser.Re2Resolver:
        matchers = ua_parser.load_lazy_builtins()  # the native engine compiles the patterns itself
    else:
        matchers = ua_parser.load_builtins()
    name = resolver_ctor.__module__.rpartition(".")[2]  # "regex" (Rust), "re2" or "basic"
    return ua_parser.Parser(resolver_ctor(matchers)), name


_ALL_DOMAINS = Domain.ALL
_BROWSER_AND_OS = Domain.USER_AGENT | Domain.OS


def _build_crawler_check() -> tuple[Callable[[str], bool], str]:
    """-> (is_crawler(str) -> bool, engine name). Same verdicts as CrawlerDetect().is_crawler."""
    try:
        import ua_parser_rs
        from crawlerdetect.providers.crawlers import data as crawler_patterns
        from crawlerdetect.providers.exclusions import data as exclusion_patterns

        lookaround = re.compile(r"\(\?<?[=!]")
        rust_patterns = [p for p in crawler_patterns if not lookaround.search(p)]
        python_patterns = [p for p in crawler_patterns if lookaround.search(p)]
        rust_set = ua_parser_rs.UserAgentExtractor(
            ("(?i)" + p, "bot", None, None, None, None) for p in rust_patterns
        )
        python_set = re.compile("|".join(python_patterns), re.IGNORECASE) if python_patterns else None
        exclusions = re.compile("|".join(exclusion_patterns), re.IGNORECASE)
    except (ImportError, AttributeError, ValueError, re.error):
        from crawlerdetect import CrawlerDetect

        detector = CrawlerDetect()
        detector.is_crawler("Mozilla/5.0")  # compiles its big regexes now, not on the first event
        return detector.is_crawler, "crawlerdetect"

    extract = rust_set.extract
    strip_exclusions = functools.partial(exclusions.sub, "")
    search_python = python_set.search if python_set is not None else None

    def is_crawler(user_agent: str) -> bool:
        remainder = strip_exclusions(user_agent.strip())
        if not remainder:
            return False
        if extract(remainder) is not None:
            return True
        return search_python is not None and search_python(remainder) is not None

    return is_crawler, "ua-parser-rs"


@functools.cache
def _engines() -> tuple:
    """(parse, its resolver's name, is_crawler, its engine's name), built at the first use,
    not at import: every otserver process imports this module, few of them classify, and
    building the regex sets takes most of a second."""
    parse, resolver = _build_ua_parser()
    is_crawler, engine = _build_crawler_check()
    return parse, resolver, is_crawler, engine


def warm() -> None:
    """Build the engines now (the folder and the serving processes call this at start, so
    the first event or read does not pay for it)."""
    _engines()


def __getattr__(name: str):  # UA_RESOLVER, CRAWLER_ENGINE: which engines run
    if name == "UA_RESOLVER":
        return _engines()[1]
    if name == "CRAWLER_ENGINE":
        return _engines()[3]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Consoles, TVs and set-top boxes: "other", even when they claim Windows, Android or Silk.
_OTHER_MARKERS = re.compile(
    r"PlayStation|Xbox|Nintendo|\bTV\b|SmartTV|GoogleTV|AndroidTV|AppleTV|CrKey|Roku|BRAVIA"
    r"|HbbTV|; AFT"
)
# "Tablet PC" is a Windows laptop's token, not a tablet.
_TABLET_MARKERS = re.compile(r"Tablet(?! PC)|Kindle|Silk")
_MOBILE_OS = frozenset((
    "iOS", "Windows Phone", "Windows Mobile", "Windows CE", "BlackBerry OS", "KaiOS",
    "Firefox OS", "Symbian OS", "Symbian^3", "Symbian^3 Anna", "Symbian^3 Belle", "Series 40",
    "Series 60", "Nokia Series 40", "Bada", "Sailfish", "Ubuntu Touch", "MeeGo", "Maemo",
))
_DESKTOP_OS = frozenset((
    "Mac OS X", "Mac OS", "Linux", "Chrome OS", "ChromeOS", "Ubuntu", "Kubuntu", "Xubuntu",
    "Lubuntu", "Debian", "Fedora", "Red Hat", "CentOS", "SUSE", "openSUSE", "Mandriva", "Gentoo",
    "Slackware", "Arch Linux", "Linux Mint", "Mint", "FreeBSD", "OpenBSD", "NetBSD",
    "DragonFly BSD", "Solaris", "SunOS", "Haiku", "BeOS", "OS/2",
))


def _device_class(user_agent: str, os_family: str) -> str:
    """The class of a non-bot client; the order of the tests is the precedence."""
    if _OTHER_MARKERS.search(user_agent):
        return "other"
    if "iPad" in user_agent:
        return "tablet"
    if "iPhone" in user_agent or "iPod" in user_agent or "Windows Phone" in user_agent:
        return "mobile"
    if _TABLET_MARKERS.search(user_agent):
        return "tablet"
    if "Android" in user_agent or os_family == "Android":
        return "mobile" if "Mobi" in user_agent else "tablet"
    if "Mobi" in user_agent or os_family in _MOBILE_OS:
        return "mobile"
    if (os_family in _DESKTOP_OS or os_family.startswith("Windows")
            or "Windows NT" in user_agent or "Macintosh" in user_agent or "X11" in user_agent):
        return "desktop"
    return "other"


def _family(found) -> str:
    family = found.family if found is not None else None
    return family if family and family != "Other" else "Unknown"


# HTTP libraries and command-line tools: a device, an app or a server sending its events on
# purpose (the raw-URL API's everyday clients), not a crawler visiting pages, though
# crawlerdetect lists them. Wget, Scrapy and the like (which do crawl) stay bots.
_HTTP_CLIENT = re.compile(
    r"^(?:curl|libcurl|python-requests|python-urllib|python-httpx|aiohttp|okhttp|"
    r"go-http-client|httpie|axios|node-fetch|undici|java|apache-httpclient|dart|"
    r"otserver-client)/", re.IGNORECASE)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _classify_prefix(user_agent: str) -> Agent:
    _ua_parser, _, _is_crawler, _ = _engines()
    if _HTTP_CLIENT.match(user_agent):
        parsed = _ua_parser(user_agent, _BROWSER_AND_OS)
        return Agent(_family(parsed.user_agent), _family(parsed.os), "other", False)
    bot = "HeadlessChrome" in user_agent or _is_crawler(user_agent)
    parsed = _ua_parser(user_agent, _BROWSER_AND_OS if bot else _ALL_DOMAINS)
    if not bot and parsed.device is not None and parsed.device.family == "Spider":
        bot = True
    browser, os_family = _family(parsed.user_agent), _family(parsed.os)
    if bot:
        return Agent(browser, os_family, "bot", True)
    return Agent(browser, os_family, _device_class(user_agent, os_family), False)


def classify(user_agent: str | None) -> Agent:
    """The Agent for a User-Agent header's value; UNKNOWN_AGENT for None or ""."""
    if not user_agent:
        return UNKNOWN_AGENT
    return _classify_prefix(user_agent[:MAX_PARSED_CHARS])


classify.cache_info = _classify_prefix.cache_info  # type: ignore[attr-defined]
classify.cache_clear = _classify_prefix.cache_clear  # type: ignore[attr-defined]


DERIVED_FIELDS = ("browser", "os", "device", "bot")  # what agent_fields may add


def agent_fields(user_agent: str | None) -> dict:
    """What the read API adds to an event's captured fields: browser, os, device, and
    "bot": True only for a bot (absent otherwise). A fresh dict each call."""
    agent = classify(user_agent)
    fields = {"browser": agent.browser, "os": agent.os, "device": agent.device}
    if agent.bot:
        fields["bot"] = True
    return fields
