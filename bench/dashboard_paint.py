"""The dashboard's first complete paint, in headless Chromium, against a running server.

    python bench/dashboard_paint.py --url http://127.0.0.1:8080 --token T --site S [--range 30d]

Signs in through the form once (that load warms the browser's cache and is not counted), then
reloads the page `--loads` times (5) and, for each, takes the time from navigation start to the
page's "dashboard-ready" performance mark: set when the totals, the chart and every table are
filled (`<body data-ready="1">`). Prints each load, the median, and every API call's duration
from the browser's Resource Timing. `--cold`: each load in a new browser context (empty cache),
the token put in sessionStorage before the page runs. Uses Debian's Chromium (`OT_CHROMIUM`,
default /usr/bin/chromium); downloads nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from urllib.parse import parse_qs, quote, urlsplit

from playwright.sync_api import sync_playwright

CHROMIUM = os.environ.get("OT_CHROMIUM", "/usr/bin/chromium")
TOKEN_KEY = "otserver.dashboard.token"  # as dashboard.js keeps it
DONE = "body[data-ready='1'], body[data-ready='error']"
TIMINGS = """() => ({
    ready: performance.getEntriesByName('dashboard-ready')[0]?.startTime,
    state: document.body.dataset.ready,
    error: document.getElementById('error').textContent,
    calls: performance.getEntriesByType('resource')
        .filter(r => r.name.includes('/api/v1/') && !r.name.includes('/api/v1/live'))
        .map(r => ({url: r.name, start: r.startTime, duration: r.duration}))
})"""


def call_name(url: str) -> str:
    """stats (range) | stats (now) | breakdown by=url | sites ..."""
    parts = urlsplit(url)
    kind = parts.path.rsplit("/", 1)[-1]
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    if kind == "breakdown":
        return f"breakdown by={query.get('by')}"
    if kind == "stats":
        span = int(query.get("to", 0)) - int(query.get("from", 0))
        return "stats (now)" if span == 300_000 else f"stats ({query.get('bucket')})"
    return kind


def measure(page, timeout_ms: int) -> dict:
    page.wait_for_selector(DONE, state="attached", timeout=timeout_ms)
    result = page.evaluate(TIMINGS)
    if result["state"] != "1" or result["ready"] is None:
        sys.exit(f"the dashboard shows an error: {result['error']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token", required=True, help="a read token for the site (or *)")
    parser.add_argument("--site", required=True)
    parser.add_argument("--range", default="30d", choices=("today", "24h", "7d", "30d"))
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a load may take")
    parser.add_argument("--cold", action="store_true", help="an empty cache for every load")
    args = parser.parse_args(argv)
    page_url = f"{args.url.rstrip('/')}/dashboard#si={quote(args.site, safe='')}&range={args.range}"
    timeout_ms = int(args.timeout * 1000)
    viewport = {"width": args.width, "height": 900}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        page.goto(page_url)
        page.fill("#token", args.token)
        page.click("#signin-submit")
        first = measure(page, timeout_ms)
        print(f"sign-in load (not counted): {first['ready']:.0f} ms from navigation start")
        loads = []
        for n in range(args.loads):
            if args.cold:
                context.close()
                context = browser.new_context(viewport=viewport)
                context.add_init_script(
                    f"sessionStorage.setItem({TOKEN_KEY!r}, {args.token!r})")
                page = context.new_page()
                page.goto(page_url)
            else:
                page.reload()
            result = measure(page, timeout_ms)
            loads.append(result["ready"])
            print(f"load {n + 1}: {result['ready']:.0f} ms")
            for call in sorted(result["calls"], key=lambda c: c["start"]):
                print(f"    {call_name(call['url']):<26} started {call['start']:6.0f} ms, "
                      f"took {call['duration']:6.0f} ms")
        browser.close()
    print(f"median of {len(loads)} {'cold' if args.cold else 'warm'} loads "
          f"(range {args.range}): {statistics.median(loads):.0f} ms; "
          f"each: {', '.join(f'{ms:.0f}' for ms in loads)} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
