"""Report query times on a big store: build a store of one site with N events spread over D
days (written to the log with their own times, then folded by the folder as a server would),
start `otserver serve` on it, and time every report the dashboard asks for, over a keep-alive
connection, several times each.

    .venv/bin/python bench/report_times.py [--events 2000000] [--days 30] [--keep DIR]

`--keep DIR` builds the store there (or reuses it when it holds one) and leaves the server
running afterwards, printing its URL and an admin token, for bench/dashboard_paint.py.
Prints one JSON object: the build figures and, per query, the median and max milliseconds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fold_rate import AGENTS, REFERRERS  # noqa: E402

from otserver.config import Config  # noqa: E402
from otserver.folder import Folder  # noqa: E402
from otserver.log import EventLog, log_path  # noqa: E402
from otserver.model import EidGenerator, make_event  # noqa: E402
from otserver.views import Views, views_path  # noqa: E402

SITE = "big.example"
DAY_MS = 86_400_000


def build(data_dir: str, count: int, days: int) -> dict:
    """Append `count` events of SITE over the last `days` days, in time order, then fold."""
    config, gen, rand = Config(), EidGenerator(), random.Random(5)
    event_log = EventLog(log_path(data_dir), max_bytes=256 << 30)
    end = int(time.time() * 1000)
    start = end - days * DAY_MS
    step = (end - start) / count
    visitors = max(1, count // 20)
    started = time.perf_counter()
    chunk = []
    for n in range(count):
        ts = int(start + n * step)
        v = rand.randrange(visitors)
        url = f"https://big.example/p/{rand.randrange(300)}"
        if v % 9 == 0:
            url += f"?utm_source=news{v % 4}&utm_medium=email&utm_campaign=c{v % 6}"
        props = {"si": SITE, "sid": f"s{v}-{ts // (4 * 3_600_000)}", "uid": f"u{v}",
                 "ev": "pageview" if n % 5 else "click", "url": url,
                 "referrer": REFERRERS[v % len(REFERRERS)]}
        agent = AGENTS[v % len(AGENTS)].format(v=v % 10)
        chunk.append(make_event(props, {"user_agent": agent, "ip": "127.0.0.0"}, gen, ts,
                                config).encode())
        if len(chunk) == 20_000:
            event_log.append(chunk)
            chunk = []
    if chunk:
        event_log.append(chunk)
    appended = time.perf_counter() - started
    views = Views(views_path(data_dir), max_bytes=256 << 30)
    folder = Folder(event_log, views, Config(fold_batch_events=20_000), sweeper=False)
    started = time.perf_counter()
    while folder.fold_once():
        pass
    folded = time.perf_counter() - started
    event_log.close()
    views.close()
    return {"events": count, "days": days, "append_s": round(appended, 1),
            "fold_s": round(folded, 1), "fold_events_per_s": round(count / folded)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def otserver(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otserver", *args], capture_output=True,
                          text=True, timeout=300)


def timed(conn, path: str, token: str, runs: int) -> dict:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        times.append((time.perf_counter() - started) * 1000)
        assert resp.status == 200, (path, resp.status, body[:200])
    return {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", default=None)
    args = parser.parse_args(argv)
    data_dir = args.keep or tempfile.mkdtemp(prefix="otreports-")
    result = {}
    if not os.path.isdir(log_path(data_dir)):
        result["build"] = build(data_dir, args.events, args.days)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "otserver", "serve", "--port", str(port),
                               "--data-dir", data_dir, "--max-store-bytes", "256GiB"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        token = otserver("token", "create", "*", "--data-dir", data_dir).stdout.split()[-1]
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        now = int(time.time() * 1000)
        queries = {"sites": "/api/v1/sites"}
        for name, span, bucket in (("24h", DAY_MS, "hour"), ("7d", 7 * DAY_MS, "hour"),
                                   ("30d", 30 * DAY_MS, "day")):
            window = f"si={SITE}&from={now - span}&to={now}"
            queries[f"stats {name} by {bucket}"] = f"/api/v1/stats?{window}&bucket={bucket}"
            for by in ("url", "referrer_host", "utm_source", "utm_campaign", "browser", "os",
                       "device"):
                queries[f"breakdown {by} {name}"] = f"/api/v1/breakdown?{window}&by={by}"
        queries["visitors now"] = (f"/api/v1/stats?si={SITE}&from={now - 300_000}&to={now}"
                                   f"&bucket=minute")
        result["queries"] = {name: timed(conn, path, token, args.runs)
                             for name, path in queries.items()}
        result["slowest_median_ms"] = max(q["median_ms"] for q in result["queries"].values())
        print(json.dumps(result, indent=1))
        if args.keep:
            print(f"server: http://127.0.0.1:{port} token: {token} site: {SITE} "
                  f"pid: {server.pid}", flush=True)
            return 0
    finally:
        if not args.keep:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
