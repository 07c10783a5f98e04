"""Real-browser helpers for the ot.js tests: Debian's Chromium (`/usr/bin/chromium`, which
.ci/run installs) driven by Playwright, a page server on another origin than otserver, a
recorder of what the page sends, and readers of what the server stored.

The browser is never downloaded (no `playwright install`): Playwright launches the system
Chromium. A machine without it fails the tests; it does not skip them.
"""
from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

CHROMIUM = os.environ.get("OT_CHROMIUM", "/usr/bin/chromium")
NETWORK_NOISE = "Failed to load resource"  # what Chromium itself logs for a failed request


def launch(playwright):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does)")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


class PageServer:
    """Serves test pages from http://localhost:PORT (otserver is http://127.0.0.1:ITS_PORT, so
    every ingest request is cross-origin). `add(path, html)` registers a page; the query string
    is ignored."""

    def __init__(self):
        pages = self.pages = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                html = pages.get(urlsplit(self.path).path)
                if html is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.origin = f"http://localhost:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, path: str, html: str) -> str:
        self.pages[path] = html
        return self.origin + path

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def page_html(ot_port: int, site: str, *, title: str = "Page", attrs: str = "",
              before: str = "", body: str = "", tags: int = 1) -> str:
    """A page that loads ot.js from otserver as a site would (async, data-site), `tags` times;
    `before` is script run before the tag (the pre-load queue)."""
    tag = (f'<script async src="http://127.0.0.1:{ot_port}/ot.js" data-site="{site}" {attrs}>'
           '</script>')
    return ('<!doctype html><html><head><meta charset="utf-8">'
            f'<title>{title}</title><link rel="icon" href="data:,">'
            f'{f"<script>{before}</script>" if before else ""}{tag * tags}</head>'
            f'<body>{body}</body></html>')


class WatchedPages:
    """Browser contexts whose pages' console problems (a subclass's `_console` says which)
    and page errors are collected; closing them checks there were none (Chromium's "Failed to
    load resource" allowed where a test sets `allow_network_errors`)."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.problems = []
        self.allow_network_errors = False

    def watch(self, page):
        page.set_default_timeout(10_000)
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        return page

    def close(self):
        for context in self.contexts:
            context.close()
        problems = [p for p in self.problems
                    if not (self.allow_network_errors and NETWORK_NOISE in p)]
        assert not problems, problems


class Traffic:
    """Every POST /batch the pages of a context send, as the browser sent it: its time, resource
    type (`ping` for a beacon, `fetch`) and its events, each a dict of properties."""

    def __init__(self, context):
        self.requests = []  # [(time, resource_type, [event dicts])]
        self.finished = 0
        context.on("request", self._request)
        context.on("requestfinished", self._finished)
        context.on("requestfailed", self._finished)

    @staticmethod
    def is_batch(request) -> bool:
        return request.method == "POST" and urlsplit(request.url).path == "/batch"

    def _request(self, request):
        if self.is_batch(request):
            self.requests.append((time.monotonic(), request.resource_type,
                                  parse_lines(request.post_data or "")))

    def _finished(self, request):
        if self.is_batch(request):
            self.finished += 1

    def events(self) -> list[dict]:
        return [event for _, _, events in self.requests for event in events]

    def keys(self) -> set[str]:
        return {event["idempotency_key"] for event in self.events()}


def parse_lines(body: str) -> list[dict]:
    """A text/plain batch body: one url-encoded event per line."""
    return [dict(parse_qsl(line, keep_blank_values=True, strict_parsing=True))
            for line in body.splitlines() if line]


def stored(server, token: str, si: str) -> list[dict]:
    """The site's events as the read API lists them (log order), properties only."""
    resp = server.api(f"/api/v1/events?si={quote(si, safe='')}&limit=10000", token)
    assert resp.status == 200, resp
    return [json.loads(line)["event"] for line in resp.text.splitlines() if line]


def wait_stored(server, token: str, si: str, count: int, timeout: float = 10.0,
                pump=time.sleep) -> list[dict]:
    """Poll until the site has at least `count` events stored; returns them. `pump(seconds)`
    waits between polls: with Playwright's sync API, a wait in Playwright, so that the browser's
    events (requests seen, routes to answer) are dispatched meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        events = stored(server, token, si)
        if len(events) >= count:
            pump(0.05)  # so the requests that stored them have been dispatched to the test too
            return events
        if time.monotonic() > deadline:
            raise AssertionError(f"{si}: {len(events)} events stored, not {count}, after "
                                 f"{timeout} s: {events}")
        pump(0.05)

