"""How fast the folder builds the views: append N realistic events to a fresh log (pages,
referrers, UTM tags, a mix of browsers and bots, sessions of a few events), then fold them all
in the folder's batches and print events folded per second.

    .venv/bin/python bench/fold_rate.py [--events 200000] [--batch 5000]

Run it on two checkouts for an A/B (the report counters, say): same machine, one after the
other, the ratio is what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from otserver.config import Config  # noqa: E402
from otserver.folder import Folder  # noqa: E402
from otserver.log import EventLog  # noqa: E402
from otserver.model import EidGenerator, make_event, now_ms  # noqa: E402
from otserver.views import Views  # noqa: E402

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{v}.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.{v} Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_{v} like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel {v}) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:12{v}.0) Gecko/20100101 Firefox/12{v}.0",
    "Mozilla/5.0 (compatible; Googlebot/2.{v}; +http://www.google.com/bot.html)",
]
REFERRERS = ["", "", "https://www.google.com/", "https://news.ycombinator.com/item?id=1",
             "https://t.co/abc", "https://duckduckgo.com/"]


def events(count: int, rand: random.Random) -> list[bytes]:
    config, gen = Config(), EidGenerator()
    out = []
    sessions = max(1, count // 5)
    for _ in range(count):
        s = rand.randrange(sessions)
        url = f"https://shop.example.com/p/{rand.randrange(500)}"
        if s % 7 == 0:
            url += f"?utm_source=news{s % 5}&utm_campaign=c{s % 3}"
        props = {"si": f"site{s % 3}.example", "sid": f"s{s}", "uid": f"u{s // 2}",
                 "ev": "pageview" if rand.random() < 0.8 else "click", "url": url,
                 "referrer": REFERRERS[s % len(REFERRERS)], "title": "Example Shop"}
        agent = AGENTS[s % len(AGENTS)].format(v=s % 10)
        out.append(make_event(props, {"user_agent": agent, "ip": "127.0.0.0"}, gen, now_ms(),
                              config).encode())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    args = parser.parse_args(argv)
    values = events(args.events, random.Random(1))
    with tempfile.TemporaryDirectory(prefix="otfold-") as tmp:
        event_log = EventLog(os.path.join(tmp, "log"))
        for at in range(0, len(values), 10_000):
            event_log.append(values[at:at + 10_000])
        views = Views(os.path.join(tmp, "views"))
        folder = Folder(event_log, views, Config(fold_batch_events=args.batch), sweeper=False)
        started = time.perf_counter()
        while folder.fold_once():
            pass
        seconds = time.perf_counter() - started
        size = sum(os.path.getsize(os.path.join(tmp, "views", name))
                   for name in os.listdir(os.path.join(tmp, "views")))
        event_log.close()
        views.close()
    print(json.dumps({"events": args.events, "batch": args.batch, "seconds": round(seconds, 2),
                      "events_per_s": round(args.events / seconds),
                      "views_bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
