"""Parses/s of User-Agent classification (otserver.agents) and of the engines under it.

    python bench/agents_rate.py                  # about 0.6 s per case, ~6 s in all
    python bench/agents_rate.py --budget-s 2

Cases, each on strings it has not seen (version numbers varied, so no memo helps) unless "warm":
  ua-parser regex (Rust)   ua_parser's ua-parser-rs resolver, all three domains, no cache
  ua-parser basic (Python) the pure-Python resolver, as when ua-parser-rs is missing
  crawlerdetect            CrawlerDetect.is_crawler, its own Python regex
  crawler set (Rust)       otserver.agents' crawler check: crawlerdetect's patterns in ua-parser-rs
  classify cold            otserver.agents.classify, every string new
  classify warm            ~200 distinct strings, Zipf-like repeats, through the LRU
  classify 1 KiB junk      distinct random 1 KiB strings: the most a hostile string costs
"""
from __future__ import annotations

import argparse
import itertools
import random
import string
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ua_parser  # noqa: E402
from crawlerdetect import CrawlerDetect  # noqa: E402
from ua_parser import Domain  # noqa: E402

from otserver import agents  # noqa: E402

# {n} becomes a build number, so every generated string is distinct but realistic.
TEMPLATES = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.{n}.91 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.{n}.80",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.{n} Safari/605.1.15",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.{n}.60 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.{n}",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.{n}",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_{n} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPad; CPU OS 17_4_{n} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.{n}.82 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 13; SM-X200) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.{n}.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/24.{n} Chrome/117.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 [FBAN/FBIOS;FBAV/460.0.{n}.108]",
    "Mozilla/5.0 (compatible; Googlebot/2.{n}; +http://www.google.com/bot.html)",
    "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm) Chrome/116.0.{n}.76 Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.{n}.29 Safari/537.36",
    "curl/8.{n}.0",
    "python-requests/2.{n}.0",
    "Mozilla/5.0+(compatible; UptimeRobot/2.{n}; http://www.uptimerobot.com/)",
]
# Browsers dominate real traffic; bots and tools are the tail.
WEIGHTS = [30, 6, 10, 8, 4, 5, 20, 4, 15, 2, 5, 3, 3, 2, 1, 1, 1, 1]


def distinct_user_agents(count: int, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    picks = rnd.choices(TEMPLATES, WEIGHTS, k=count)
    return [template.format(n=1000 + i) for i, template in enumerate(picks)]


def warm_mix(calls: int, distinct: int = 200, seed: int = 2) -> list[str]:
    rnd = random.Random(seed)
    pool = distinct_user_agents(distinct, seed=seed)
    weights = [1 / (rank + 1) for rank in range(distinct)]  # Zipf: a few strings carry most events
    return rnd.choices(pool, weights, k=calls)


def junk(count: int, length: int = 1024, seed: int = 3) -> list[str]:
    rnd = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " ;/()._-"
    return ["".join(rnd.choices(alphabet, k=length)) for _ in range(count)]


def rate(parse, inputs: list[str], budget_s: float) -> tuple[float, int]:
    """-> (parses/s, parses done): calls parse on inputs in order until budget_s has passed."""
    done = 0
    started = time.perf_counter()
    deadline = started + budget_s
    for chunk_start in range(0, len(inputs), 64):
        for user_agent in inputs[chunk_start:chunk_start + 64]:
            parse(user_agent)
        done += len(inputs[chunk_start:chunk_start + 64])
        if time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - started), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=0.6, help="seconds per case")
    args = parser.parse_args()

    cases = []
    if ua_parser.RegexResolver is not None:
        rust = ua_parser.Parser(ua_parser.RegexResolver(ua_parser.load_lazy_builtins()))
        cases.append(("ua-parser regex (Rust)", lambda ua: rust(ua, Domain.ALL), distinct_user_agents(40_000)))
    basic = ua_parser.Parser(ua_parser.BasicResolver(ua_parser.load_builtins()))
    cases.append(("ua-parser basic (Python)", lambda ua: basic(ua, Domain.ALL), distinct_user_agents(600, seed=4)))
    detector = CrawlerDetect()
    detector.is_crawler("Mozilla/5.0")  # compile before timing
    cases.append(("crawlerdetect", detector.is_crawler, distinct_user_agents(1_000, seed=5)))
    if agents.CRAWLER_ENGINE == "ua-parser-rs":
        cases.append(("crawler set (Rust)", agents._engines()[2], distinct_user_agents(40_000, seed=6)))
    cases.append(("classify cold", agents.classify, distinct_user_agents(20_000, seed=7)))
    cases.append(("classify warm", agents.classify, warm_mix(1_000_000)))
    cases.append(("classify 1 KiB junk", agents.classify, junk(1_000)))

    print(f"resolver: {agents.UA_RESOLVER}, crawler engine: {agents.CRAWLER_ENGINE}, "
          f"memo: {agents.CACHE_SIZE} entries, parsed prefix: {agents.MAX_PARSED_CHARS} chars")
    print(f"{'case':<26}{'parses/s':>12}{'µs/parse':>10}{'n':>10}")
    for name, parse, inputs in cases:
        if name == "classify warm":
            agents.classify.cache_clear()
        per_s, done = rate(parse, inputs, args.budget_s)
        print(f"{name:<26}{per_s:>12,.0f}{1e6 / per_s:>10.1f}{done:>10,}")
        if name == "classify warm":
            info = agents.classify.cache_info()
            print(f"{'':<26}{info.misses} misses, {info.hits:,} hits")
        elif name == "classify cold":
            agents.classify.cache_clear()


if __name__ == "__main__":
    main()
