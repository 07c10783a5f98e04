"""ot.js, the browser tracker, in a real browser (Debian's Chromium via Playwright) against a
real otserver: pages served from another origin load it as a site would, and every check reads
what the server stored through the read API. Every test also fails on a console error or an
uncaught page error (but for Chromium's own "Failed to load resource" line in the tests that
make requests fail on purpose).
"""
from __future__ import annotations

import gzip
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import sync_playwright

from browser import PageServer, Traffic, WatchedPages, launch, page_html, stored, wait_stored

OT_JS = Path(__file__).resolve().parent.parent / "otserver" / "static" / "ot.js"
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
GZIP_BOUND = 4096  # ot.js as served gzipped, in bytes
READY = "window.ot && window.ot._ot === 1"  # ot.js has run


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def pages():
    server = PageServer()
    yield server
    server.close()


@pytest.fixture
def ot(make_server, tabs):
    """A fresh otserver; `ot.wait(site, n)`: its events once n are stored, `ot.stored(site)`:
    its events now."""
    server = make_server("--fold-delay", "1ms")
    token = server.create_token("*")
    return SimpleNamespace(
        server=server, port=server.port, token=token,
        wait=lambda si, count, timeout=10.0: wait_stored(server, token, si, count, timeout,
                                                         pump=tabs.pump),
        stored=lambda si: stored(server, token, si))


class Tabs(WatchedPages):
    """Browser contexts (each a new visitor: its own localStorage) whose pages are watched for
    console errors (and anything ot.js logs) and page errors; a test that fails requests on
    purpose sets `allow_network_errors`. Closing checks there were none."""

    def __init__(self, browser):
        super().__init__(browser)
        self._clock = None

    def context(self, init_script: str | None = None, **options):
        options.setdefault("screen", {"width": 1280, "height": 720})
        options.setdefault("viewport", {"width": 1000, "height": 600})
        context = self.browser.new_context(**options)
        if init_script:
            context.add_init_script(init_script)
        self.contexts.append(context)
        context.traffic = Traffic(context)
        return context

    def page(self, context):
        return self.watch(context.new_page())

    def _console(self, message):
        if message.type == "error" or "/ot.js" in (message.location or {}).get("url", ""):
            self.problems.append(f"console {message.type}: {message.text}")

    def pump(self, seconds: float):
        """Wait, dispatching the browser's events meanwhile (the sync API does so only inside
        its own calls): on a blank page of its own context, so pages under test may close."""
        if self._clock is None:
            self._clock = self.browser.new_context().new_page()
        self._clock.wait_for_timeout(int(seconds * 1000))

    def close(self):
        if self._clock is not None:
            self._clock.context.close()
        super().close()


@pytest.fixture
def tabs(browser):
    tabs = Tabs(browser)
    yield tabs
    tabs.close()


def load(tabs, context, url: str):
    page = tabs.page(context)
    page.goto(url)
    page.wait_for_function(READY)
    return page


def metric(ot, line_start: str) -> float:
    """A value of the server's /metrics (0 when the line is absent)."""
    for line in ot.server.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_metric(ot, tabs, line_start: str, value: float, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    while (got := metric(ot, line_start)) != value and time.monotonic() < deadline:
        tabs.pump(0.05)
    return got


REPLAYED = "otserver_events_replayed_total"
BATCH_OK = 'otserver_requests_total{endpoint="/batch",status="200"}'


# ---------------------------------------------------------------------------------- pageviews


def test_pageview_on_load_with_url_title_referrer_screen_and_lang(ot, pages, tabs):
    site = "load.test"
    pages.add("/start", '<!doctype html><title>Start</title><link rel="icon" href="data:,">'
                        '<a id="go" href="/landing?utm_source=x#top">go</a>')
    pages.add("/landing", page_html(ot.port, site, title="Landing ä"))
    context = tabs.context(locale="de-DE", screen={"width": 1280, "height": 720})
    page = tabs.page(context)
    page.goto(pages.origin + "/start?from=1")
    page.click("#go")
    page.wait_for_url("**/landing*")
    page.wait_for_function(READY)
    [event] = ot.wait(site, 1)
    assert event["ev"] == "pageview"
    assert event["url"] == pages.origin + "/landing?utm_source=x#top"
    assert event["title"] == "Landing ä"
    assert event["referrer"] == pages.origin + "/start?from=1"
    assert event["screen"] == "1280x720"
    assert event["lang"] == "de-DE"
    assert event["si"] == site
    assert UUID4.match(event["sid"]) and UUID4.match(event["uid"]) and event["sid"] != event["uid"]
    # as sent: one fetch, one line, its own idempotency key, nothing the server assigns
    [(_, kind, [sent])] = context.traffic.requests
    assert kind == "fetch"
    assert UUID4.match(sent["idempotency_key"])
    assert "eid" not in sent and "unixtimestamp" not in sent
    assert page.evaluate("localStorage.getItem('ot_uid')") == event["uid"]
    session = ot.server.api(f"/api/v1/sessions/{event['sid']}?si={site}", ot.token).json()
    assert session["event_count"] == 1 and session["session"]["uid"] == event["uid"]
    user = ot.server.api(f"/api/v1/users/{event['uid']}?si={site}", ot.token).json()
    assert [s["sid"] for s in user["sessions"]] == [event["sid"]]


def test_single_page_app_navigation_gives_pageviews(ot, pages, tabs):
    site = "spa.test"
    base = pages.add("/app", page_html(ot.port, site, title="App",
                                       attrs='data-flush-interval="50"'))
    page = load(tabs, tabs.context(), base)
    ot.wait(site, 1)
    page.evaluate("history.pushState({}, '', '/app/b'); document.title = 'B'")
    ot.wait(site, 2)
    # a fragment alone is no new page; a query is
    page.evaluate("history.pushState({}, '', '/app/b#section')")
    page.evaluate("history.replaceState({}, '', '/app/b?tab=2')")
    ot.wait(site, 3)
    page.evaluate("history.back()")  # popstate: /app/b
    page.wait_for_function("location.pathname == '/app/b' && !location.search")
    ot.wait(site, 4)
    page.evaluate("history.back()")  # popstate: /app
    page.wait_for_function("location.pathname == '/app'")
    events = ot.wait(site, 5)
    tabs.pump(0.3)
    events = ot.stored(site)
    origin = pages.origin
    assert [(e["ev"], e["url"], e.get("referrer", "")) for e in events] == [
        ("pageview", f"{origin}/app", ""),
        ("pageview", f"{origin}/app/b", f"{origin}/app"),
        ("pageview", f"{origin}/app/b?tab=2", f"{origin}/app/b"),
        ("pageview", f"{origin}/app/b", f"{origin}/app/b?tab=2"),
        ("pageview", f"{origin}/app", f"{origin}/app/b"),
    ]
    assert [e["title"] for e in events] == ["App", "B", "B", "B", "B"]
    assert len({e["sid"] for e in events}) == 1 and len({e["uid"] for e in events}) == 1


# ------------------------------------------------------------------------------ custom events


def test_track_and_the_pre_load_queue(ot, pages, tabs):
    site = "track.test"
    before = ("window.ot = window.ot || [];"
              "ot.push(['track', 'signup', {plan: 'pro', seats: 3, trial: true}]);")
    url = pages.add("/t", page_html(ot.port, site, before=before,
                                    attrs='data-flush-interval="50"'))
    page = load(tabs, tabs.context(), url)
    assert page.evaluate("typeof ot.track == 'function' && typeof ot.identify == 'function'")
    page.evaluate("""() => {
        ot.track('click', {button: 'buy', text: 'a&b=c+d 100% ä€😀\\nline 2', sp: ' x '});
        ot.push(['track', 'late', {n: 1.5}], ['track', 'later']);
        ot.track('filtered', {'bad name': 1, 'ünicode': 1, eid: 'x', unixtimestamp: 1,
                              si: 'other', sid: 'x', uid: 'x', idempotency_key: 'x',
                              ev: 'x', nested: {a: 1}, list: [1], nothing: null,
                              undef: undefined, fn() {}, ok: 'yes', 'a=b&c': 'odd name'});
        ot.track('long', {ascii: 'x'.repeat(10000), wide: 'é'.repeat(5000)});
        // nonsense is ignored, never thrown
        ot.track(); ot.track(null); ot.track('');
        ot.push('junk', ['nope'], null, [], ['track']);
        ot.identify(); ot.identify(''); ot.identify('x'.repeat(300));
    }""")
    events = ot.wait(site, 7)
    tabs.pump(0.3)
    events = ot.stored(site)
    assert [e["ev"] for e in events] == ["pageview", "signup", "click", "late", "later",
                                         "filtered", "long"]
    signup, click, late, _, filtered, long = events[1:]
    assert (signup["plan"], signup["seats"], signup["trial"]) == ("pro", "3", "true")
    assert click["button"] == "buy" and click["text"] == "a&b=c+d 100% ä€😀\nline 2"
    assert click["sp"] == " x "
    assert late["n"] == "1.5"
    extra = set(filtered) - {"unixtimestamp", "eid", "si", "sid", "uid", "ev", "idempotency_key"}
    assert extra == {"ok", "a=b&c"}, filtered
    assert filtered["si"] == site and filtered["ev"] == "filtered"
    assert long["ascii"] == "x" * 8192 and long["wide"] == "é" * 4096
    assert len({e["uid"] for e in events}) == 1 and len({e["sid"] for e in events}) == 1


def test_identify(ot, pages, tabs):
    site = "identify.test"
    before = "window.ot = window.ot || []; ot.push(['identify', 'user-7']);"
    url = pages.add("/i", page_html(ot.port, site, before=before,
                                    attrs='data-flush-interval="50"'))
    context = tabs.context()
    page = load(tabs, context, url)
    [first] = ot.wait(site, 1)
    assert first["ev"] == "pageview" and first["uid"] == "user-7"  # before the load's pageview
    page.evaluate("ot.identify('user-8'); ot.track('after')")
    ot.wait(site, 2)
    page2 = load(tabs, context, pages.add("/i2", page_html(ot.port, site,
                                                           attrs='data-flush-interval="50"')))
    events = ot.wait(site, 3)
    assert [(e["ev"], e["uid"]) for e in events] == [
        ("pageview", "user-7"), ("after", "user-8"), ("pageview", "user-8")]
    assert len({e["sid"] for e in events}) == 1  # identify keeps the session
    user = ot.server.api(f"/api/v1/users/user-8?si={site}", ot.token).json()
    assert user["event_count"] == 2
    assert page2.evaluate("localStorage.getItem('ot_uid')") == "user-8"
    page.close()


def test_uid_persists_across_page_loads_without_cookies(ot, pages, tabs):
    site = "persist.test"
    one = pages.add("/one", page_html(ot.port, site, attrs='data-flush-interval="50"'))
    two = pages.add("/two", page_html(ot.port, site, attrs='data-flush-interval="50"'))
    context = tabs.context()
    page = load(tabs, context, one)
    ot.wait(site, 1)
    page.goto(two)
    page.wait_for_function(READY)
    first, second = ot.wait(site, 2)
    assert second["url"].endswith("/two")
    assert first["uid"] == second["uid"] and first["sid"] == second["sid"]
    assert page.evaluate("localStorage.getItem('ot_uid')") == first["uid"]
    assert page.evaluate("document.cookie") == ""
    assert context.cookies() == []
    # another visitor (another context: other storage) is another user
    load(tabs, tabs.context(), one)
    third = ot.wait(site, 3)[2]
    assert third["uid"] != first["uid"] and third["sid"] != first["sid"]


def test_session_rolls_over_after_the_timeout(ot, pages, tabs):
    # 0.05 minutes: 3 s (1.2 s was shorter than a loaded CI machine's page load sometimes
    # took between the pageview and the next event)
    site = "session.test"
    url = pages.add("/s", page_html(ot.port, site, attrs='data-session-timeout="0.05" '
                                                         'data-flush-interval="50"'))
    page = load(tabs, tabs.context(), url)
    page.evaluate("ot.track('soon')")
    ot.wait(site, 2)
    tabs.pump(3.5)
    page.evaluate("ot.track('later')")
    pageview, soon, later = ot.wait(site, 3)
    assert pageview["sid"] == soon["sid"] != later["sid"]
    assert pageview["uid"] == soon["uid"] == later["uid"]
    user = ot.server.api(f"/api/v1/users/{later['uid']}?si={site}", ot.token).json()
    assert [s["sid"] for s in user["sessions"]] == [pageview["sid"], later["sid"]]


# ------------------------------------------------------------------------------ sending


# sendBeacon, wrapped to count its calls in localStorage (the page that sent is gone by then)
COUNT_BEACONS = """
const send = Navigator.prototype.sendBeacon;
Navigator.prototype.sendBeacon = function (url, data) {
  const ok = send.call(this, url, data);
  localStorage.setItem('beacons', (localStorage.getItem('beacons') || '') + (ok ? 'sent ' : 'refused '));
  return ok;
};
"""


def test_page_hide_flushes_by_beacon(ot, pages, tabs):
    """The flush timer is a minute: what arrives was sent when the page went away, by
    sendBeacon (which Playwright does not see during an unload, so the page counts)."""
    attrs = 'data-flush-interval="60000"'
    away = pages.add("/away", '<!doctype html><title>Away</title><link rel="icon" href="data:,">')
    # navigating away
    context = tabs.context(init_script=COUNT_BEACONS)
    page = load(tabs, context, pages.add("/h1", page_html(ot.port, "hide-nav.test", attrs=attrs)))
    page.evaluate("ot.track('leaving', {how: 'navigate'})")
    tabs.pump(0.2)
    assert context.traffic.requests == []
    page.goto(away)
    events = ot.wait("hide-nav.test", 2)
    assert [e["ev"] for e in events] == ["pageview", "leaving"]
    assert page.evaluate("localStorage.getItem('beacons')") == "sent "
    assert page.evaluate("localStorage.getItem('ot_q')") is None
    assert context.traffic.requests == []  # no fetch
    # closing the tab
    context = tabs.context()
    page = load(tabs, context, pages.add("/h2", page_html(ot.port, "hide-close.test",
                                                          attrs=attrs)))
    page.evaluate("ot.track('leaving', {how: 'close'})")
    tabs.pump(0.2)
    page.close()
    events = ot.wait("hide-close.test", 2)
    assert [e["ev"] for e in events] == ["pageview", "leaving"]
    tabs.pump(0.3)
    assert len(ot.stored("hide-nav.test")) == 2
    assert len(ot.stored("hide-close.test")) == 2
    assert context.traffic.requests == []


def _route_batches(page, port, answer):
    """Route the page's POST /batch through `answer(route, n)` (n counts from 1); returns the
    times the requests came."""
    times = []

    def handle(route):
        times.append(time.monotonic())
        answer(route, len(times))

    page.route(f"http://127.0.0.1:{port}/batch", handle)
    return times


def test_retry_after_503_stores_each_event_once(ot, pages, tabs):
    """The first batch reaches the server (stored) but the page is told 503, Retry-After 2:
    the retry, 2 s later, carries the same idempotency keys and the server stores nothing
    twice."""
    tabs.allow_network_errors = True
    site = "retry503.test"
    url = pages.add("/r", page_html(ot.port, site, attrs='data-flush-interval="50"'))
    context = tabs.context()
    page = tabs.page(context)
    answered = []

    def answer(route, n):
        response = route.fetch()
        assert response.status == 200, response.text()
        if n == 1:
            route.fulfill(status=503, body="storage unavailable\n", headers={
                "Content-Type": "text/plain; charset=utf-8", "Retry-After": "2",
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Expose-Headers": "X-Eid, Retry-After"})
        else:
            route.fulfill(response=response)
        answered.append(n)

    times = _route_batches(page, ot.port, answer)
    page.goto(url)
    page.wait_for_function(READY)
    page.evaluate("ot.track('buy', {sku: 'A1'})")
    deadline = time.monotonic() + 8
    while len(answered) < 2 and time.monotonic() < deadline:
        tabs.pump(0.05)
    assert len(answered) >= 2, f"no retry: {answered}"
    assert times[1] - times[0] >= 1.9  # Retry-After: 2, not the 1 s first backoff
    first, second = context.traffic.requests[:2]
    first_keys = {e["idempotency_key"] for e in first[2]}
    assert first_keys <= {e["idempotency_key"] for e in second[2]}
    sent = {e["idempotency_key"]: e for _, _, events in context.traffic.requests for e in events}
    events = ot.wait(site, 2)
    tabs.pump(0.5)
    events = ot.stored(site)
    assert sorted(e["ev"] for e in events) == ["buy", "pageview"], events
    assert len(sent) == 2
    assert all("idempotency_key" not in e for e in events)
    assert wait_metric(ot, tabs, REPLAYED, len(first_keys)) == len(first_keys)


def test_network_error_and_429_are_retried_with_the_same_events(ot, pages, tabs):
    """A network error, then a 429 whose Retry-After the page cannot read (the server exposes
    only X-Eid): backoff 1 s, then 2 s; the third try is let through; each event stored once."""
    tabs.allow_network_errors = True
    site = "retrynet.test"
    url = pages.add("/n", page_html(ot.port, site, attrs='data-flush-interval="50"'))
    context = tabs.context()
    page = tabs.page(context)

    def answer(route, n):
        if n == 1:
            route.abort("connectionreset")
        elif n == 2:
            route.fulfill(status=429, body="slow down\n", headers={
                "Content-Type": "text/plain; charset=utf-8", "Retry-After": "1",
                "Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "X-Eid"})
        else:
            route.continue_()

    times = _route_batches(page, ot.port, answer)
    page.goto(url)
    page.wait_for_function(READY)
    page.evaluate("ot.track('buy')")
    events = ot.wait(site, 2)
    assert len(times) >= 3
    assert 0.9 <= times[1] - times[0] <= 1.6 and 1.9 <= times[2] - times[1] <= 3.0
    bodies = [[e["idempotency_key"] for e in r[2]] for r in context.traffic.requests[:3]]
    assert set(bodies[0]) <= set(bodies[1]) <= set(bodies[2])
    tabs.pump(0.5)
    events = ot.stored(site)
    assert sorted(e["ev"] for e in events) == ["buy", "pageview"], events


def test_events_unsent_at_page_hide_are_sent_by_the_next_load(ot, pages, tabs):
    """The server is unreachable while the page lives, and the beacon at page hide is lost
    (accepted, never delivered): after a failed send ot.js keeps what it beaconed, and the
    next page load sends it; each event is stored once."""
    tabs.allow_network_errors = True
    site = "offline.test"
    attrs = 'data-flush-interval="50"'
    one = pages.add("/o1", page_html(ot.port, site, attrs=attrs))
    two = pages.add("/o2", page_html(ot.port, site, attrs=attrs))
    context = tabs.context(init_script="Navigator.prototype.sendBeacon = () => true;")
    page = tabs.page(context)
    online = []

    def answer(route, n):
        if online:
            route.continue_()
        else:
            route.abort("internetdisconnected")

    times = _route_batches(page, ot.port, answer)
    page.goto(one)
    page.wait_for_function(READY)
    page.evaluate("ot.track('offline')")
    while not times:
        tabs.pump(0.05)
    tabs.pump(0.1)
    online.append(True)
    page.goto(two)
    page.wait_for_function(READY)
    events = ot.wait(site, 3)
    tabs.pump(0.5)
    events = ot.stored(site)
    assert [(e["ev"], e.get("url", "")[-3:]) for e in events] == [
        ("pageview", "/o1"), ("offline", ""), ("pageview", "/o2")]
    assert page.evaluate("localStorage.getItem('ot_q')") is None
    # the beacon was lost: nothing to replay (page two may flush in one batch or two)
    assert metric(ot, REPLAYED) == 0 and metric(ot, BATCH_OK) >= 1


def test_a_refused_beacon_falls_back_to_fetch_keepalive_and_the_next_load(ot, pages, tabs):
    """sendBeacon refuses (it returns false, as over its quota): ot.js sends by fetch with
    keepalive and keeps the events for the next load too; the server stores each once (the
    next load's copy repeats their idempotency keys)."""
    site = "refused.test"
    context = tabs.context(init_script="Navigator.prototype.sendBeacon = () => false;")
    page = load(tabs, context, pages.add("/f1", page_html(
        ot.port, site, attrs='data-flush-interval="60000"')))
    page.evaluate("ot.track('leaving')")
    tabs.pump(0.2)
    page.goto(pages.add("/f2", page_html(ot.port, site, attrs='data-flush-interval="50"')))
    page.wait_for_function(READY)
    ot.wait(site, 3)
    tabs.pump(0.5)
    events = ot.stored(site)
    assert [(e["ev"], e.get("url", "")[-3:]) for e in events] == [
        ("pageview", "/f1"), ("leaving", ""), ("pageview", "/f2")]
    [(_, _, sent)] = context.traffic.requests  # the second load's fetch
    assert [e["ev"] for e in sent] == ["pageview", "leaving", "pageview"]
    # the keepalive fetch did arrive (Playwright does not see it during the unload): two
    # batches answered, and the second load's copy of the first page's events replayed
    assert wait_metric(ot, tabs, BATCH_OK, 2) == 2
    assert wait_metric(ot, tabs, REPLAYED, 2) == 2
    assert page.evaluate("localStorage.getItem('ot_q')") is None


# ------------------------------------------------------------------------------ privacy, safety


def test_respect_dnt_sends_nothing_when_dnt_or_gpc_is_on(ot, pages, tabs):
    gpc = "Object.defineProperty(Navigator.prototype, 'globalPrivacyControl', {get: () => true})"
    dnt = "Object.defineProperty(Navigator.prototype, 'doNotTrack', {get: () => '1'})"
    respecting = pages.add("/dnt", page_html(ot.port, "dnt.test", before=(
        "window.ot = window.ot || []; ot.push(['track', 'queued'])"),
        attrs='data-respect-dnt data-flush-interval="50"'))
    for script, flag in ((gpc, "navigator.globalPrivacyControl === true"),
                         (dnt, "navigator.doNotTrack === '1'")):
        context = tabs.context(init_script=script)
        page = load(tabs, context, respecting)
        assert page.evaluate(flag)
        page.evaluate("ot.track('x', {a: 1}); ot.identify('u'); ot.push(['track', 'y'])")
        tabs.pump(0.3)
        assert page.evaluate("Object.keys(localStorage)") == []
        page.close()
        assert context.traffic.requests == []
    # without data-respect-dnt the same browser is tracked
    context = tabs.context(init_script=gpc)
    load(tabs, context, pages.add("/nodnt", page_html(ot.port, "nodnt.test",
                                                      attrs='data-flush-interval="50"')))
    ot.wait("nodnt.test", 1)
    assert ot.stored("dnt.test") == []
    assert ot.server.counts()["events"] == 1


def test_loaded_twice_sends_once(ot, pages, tabs):
    site = "twice.test"
    url = pages.add("/2", page_html(ot.port, site, tags=2, attrs='data-flush-interval="50"'))
    page = load(tabs, tabs.context(), url)
    page.evaluate("history.pushState({}, '', '/2/next')")
    page.evaluate("ot.track('once')")
    ot.wait(site, 3)
    page.close()
    tabs.pump(0.5)
    events = ot.stored(site)
    assert [e["ev"] for e in events] == ["pageview", "pageview", "once"]


def test_blocked_storage_and_no_random_uuid(ot, pages, tabs):
    """localStorage throws (blocked storage) and crypto.randomUUID is missing: ids live in
    memory, keys come from getRandomValues, and nothing is thrown into the page."""
    site = "hostile.test"
    script = ("Object.defineProperty(window, 'localStorage', {get() {"
              "  throw new DOMException('blocked', 'SecurityError') }});"
              "delete Crypto.prototype.randomUUID;")
    attrs = 'data-flush-interval="50"'
    context = tabs.context(init_script=script)
    page = load(tabs, context, pages.add("/b1", page_html(ot.port, site, attrs=attrs)))
    assert page.evaluate("typeof crypto.randomUUID") == "undefined"
    page.evaluate("ot.track('a'); ot.identify('member')")
    page.evaluate("ot.track('b')")
    ot.wait(site, 3)
    page.goto(pages.add("/b2", page_html(ot.port, site, attrs=attrs)))
    page.wait_for_function(READY)
    events = ot.wait(site, 4)
    assert [e["ev"] for e in events] == ["pageview", "a", "b", "pageview"]
    assert events[0]["uid"] == events[1]["uid"] != "member" and events[2]["uid"] == "member"
    assert events[3]["uid"] not in (events[0]["uid"], "member")  # memory is per page
    assert all(UUID4.match(e["idempotency_key"]) for e in context.traffic.events())


def test_served_gzipped_and_small(ot):
    raw = OT_JS.read_bytes()
    resp = ot.server.get("/ot.js", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200 and resp.headers["content-encoding"] == "gzip"
    assert resp.headers["content-type"].startswith("application/javascript")
    assert gzip.decompress(resp.body) == raw
    assert len(resp.body) <= GZIP_BOUND, f"ot.js is {len(resp.body)} bytes gzipped"
    # every data- option the code reads is documented in the header comment, with a default
    text = raw.decode()
    header, code = text.split("*/", 1)
    options = set(re.findall(r"\b(?:attr|num)\('([a-z-]+)'", code))
    assert options >= {"site", "endpoint", "session-timeout", "flush-interval", "respect-dnt"}
    for name in options:
        assert re.search(rf"data-{name}\b.*?\[[^\]]+\]", header, re.S), name
