"""What the who-may-send guards cost an ingest request, in-process: µs per request.

    python bench/guards_cost.py [--requests 200000] [--rounds 5]

Times `Handler.handle` (parse, ids, encode, guards) plus the answer's rendering for one
realistic browser event (the properties and headers of bench/realistic.lua, with an `Origin`),
with the guards off and with every guard on: the site registered with that origin,
--require-site, a rate per address and per site, and a quota, all high enough that nothing is
refused. The rounds alternate off/on, so drift of a shared machine hits both; printed are the
medians and their difference (what the guards add per request). Writes
bench/results/guards-cost.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from otserver.config import Config  # noqa: E402
from otserver.guards import Guards  # noqa: E402
from otserver.handler import Handler, Request  # noqa: E402
from otserver.log import EventLog  # noqa: E402

SITE = "shop.example.com"
ORIGIN = b"https://shop.example.com"
QUERY = (b"si=shop.example.com&sid=s4711&uid=u4711&ev=pageview"
         b"&url=https%3A%2F%2Fshop.example.com%2Fpricing&title=Example%20Shop%20-%20%2Fpricing"
         b"&screen=1920x1080&utm_source=newsletter")
HEADERS = {
    b"user-agent": b"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
                   b"(KHTML, like Gecko) Chrome/130.0.0.0 Safari/537.36",
    b"referer": b"https://shop.example.com/pricing",
    b"origin": ORIGIN,
}


def handler(config: Config, log: EventLog, guarded: bool) -> Handler:
    guards = Guards(config, log, held_of=lambda sites: {si: 0 for si in sites}) \
        if guarded else None
    return Handler(config, guards=guards)


def time_requests(h: Handler, count: int, addresses: int) -> float:
    """µs per request: handle (the ingest job) and render its answer."""
    requests = [Request(b"GET", b"/", QUERY, HEADERS, b"", f"10.0.{n >> 8 & 255}.{n & 255}",
                        False) for n in range(addresses)]
    start = time.perf_counter()
    for n in range(count):
        job = h.handle(requests[n % addresses])
        job.answer(False)
    return (time.perf_counter() - start) / count * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--addresses", type=int, default=10_000,
                        help="distinct client addresses the requests come from")
    parser.add_argument("--out", default=str(HERE / "results" / "guards-cost.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="otguards-") as tmp:
        log = EventLog(str(Path(tmp) / "log"))
        log.put_site(SITE, 0, [ORIGIN.decode()])
        off = Config(data_dir=tmp)
        on = off.replace(require_site=True, rate_limit_per_ip=10 ** 9,
                         rate_limit_per_site=10 ** 9, max_events_per_site=10 ** 12)
        handlers = {"off": handler(off, log, False), "on": handler(on, log, True)}
        assert handlers["on"].guards.active
        job = handlers["on"].handle(Request(b"GET", b"/", QUERY, HEADERS, b"", "10.0.0.1", False))
        assert b"Access-Control-Allow-Origin: " + ORIGIN in job.answer(False)
        times: dict[str, list[float]] = {"off": [], "on": []}
        time_requests(handlers["off"], args.requests // 10, args.addresses)  # warm up
        time_requests(handlers["on"], args.requests // 10, args.addresses)
        for _ in range(args.rounds):
            for name in ("off", "on"):
                times[name].append(time_requests(handlers[name], args.requests, args.addresses))
        log.close()
    result = {name: {"median_us": statistics.median(values), "runs_us": values}
              for name, values in times.items()}
    result["added_us"] = result["on"]["median_us"] - result["off"]["median_us"]
    result["ratio"] = result["off"]["median_us"] / result["on"]["median_us"]
    result["requests"], result["addresses"] = args.requests, args.addresses
    print(f"guards off: {result['off']['median_us']:.2f} µs/request  "
          f"on: {result['on']['median_us']:.2f} µs/request  "
          f"added: {result['added_us']:.2f} µs  (off/on {result['ratio']:.3f})")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
