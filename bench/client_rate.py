"""Events/s from one Python process through otserver.client: the thread Tracker, AsyncTracker,
and, for comparison, a naive loop of one keep-alive `POST /` per event with http.client.

    python bench/client_rate.py                          # starts a server on a temporary store
    python bench/client_rate.py --events 20000 --naive-events 2000
    python bench/client_rate.py --url http://127.0.0.1:8080

Each case sends realistic events (5 properties, 50 sessions) to a site of its own and counts
from the first track() to the end of close(), so the rate is events stored per second, not
events queued; `track µs` is the caller's cost per call. The naive loop waits for each event's
synced commit, so it runs fewer events (`--naive-events`) to stay short.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otserver.client import AsyncTracker, Tracker  # noqa: E402


def props(n: int) -> dict:
    return {"sid": f"s{n % 50}", "page": f"/docs/{n % 37}", "ref": "https://example.com/",
            "ev": "view", "n": n}


def thread_case(url: str, site: str, events: int, batch_size: int) -> tuple[float, float, int]:
    started = time.perf_counter()
    with Tracker(url, site, batch_size=batch_size) as tracker:
        for n in range(events):
            tracker.track(props(n))
        queued = time.perf_counter()
    return time.perf_counter() - started, queued - started, tracker.requests


def async_case(url: str, site: str, events: int, batch_size: int) -> tuple[float, float, int]:
    async def main():
        started = time.perf_counter()
        async with AsyncTracker(url, site, batch_size=batch_size) as tracker:
            spent = 0.0
            for n in range(events):
                t0 = time.perf_counter()
                tracker.track(props(n))
                spent += time.perf_counter() - t0
                if n % 1000 == 999:
                    await asyncio.sleep(0)  # an app yields now and then; the sender runs
        return time.perf_counter() - started, spent, tracker.requests
    return asyncio.run(main())


def naive_case(url: str, site: str, events: int) -> tuple[float, float, int]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
    headers = {"Content-Type": "application/json"}
    started = time.perf_counter()
    for n in range(events):
        conn.request("POST", "/", json.dumps({"si": site, **props(n)}), headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, elapsed, events


def start_server(data_dir: str) -> tuple[subprocess.Popen, str]:
    log = Path(data_dir) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "otserver", "serve", "--port", "0",
                                 "--data-dir", str(Path(data_dir) / "otdata")],
                                stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--naive-events", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = (None, args.url) if args.url else start_server(tmp)
        try:
            stamp = int(time.time())
            rows = [("Tracker (thread)", args.events,
                     thread_case(url, f"bench-thread-{stamp}", args.events, args.batch_size)),
                    ("AsyncTracker", args.events,
                     async_case(url, f"bench-async-{stamp}", args.events, args.batch_size)),
                    ("naive POST / per event", args.naive_events,
                     naive_case(url, f"bench-naive-{stamp}", args.naive_events))]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print(f"{'case':<24} {'events':>7} {'seconds':>8} {'events/s':>9} {'track µs':>9} "
          f"{'requests':>8}")
    for name, events, (elapsed, tracking, requests) in rows:
        print(f"{name:<24} {events:>7,} {elapsed:>8.2f} {events / elapsed:>9,.0f} "
              f"{tracking / events * 1e6:>9.1f} {requests:>8,}")


if __name__ == "__main__":
    main()
