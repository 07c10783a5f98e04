"""Allowed origins (`otserver site add SITE --origins ...`) in a real browser (Debian's Chromium
via Playwright) against a real otserver: two page servers are two origins, one registered for
the site (allowed), one not (refused). Every test checks both what the page saw (statuses,
bodies, the Access-Control-Allow-Origin the browser got) and what the store holds (the log's
event ids before and after, and the site's events as the read API lists them): an allowed
origin's events are stored, a refused origin's are answered 403 and never stored. A refused
check sends an allowed control event after the refused one and waits for it, so "absent" is
not "not yet".

Every test also fails on a console error or an uncaught page error, but for the lines
Chromium itself logs for the refusals a test makes on purpose.
"""
from __future__ import annotations

import time
import uuid
from urllib.parse import quote, urlencode, urlsplit

import pytest
from playwright.sync_api import sync_playwright

from browser import PageServer, WatchedPages, launch, page_html, parse_lines, stored
from conftest import RunningServer, run_cli, wait_until

SITE = "origins.browser.test"  # registered with the allowed origin only
PROBE = "probe.origins.browser.test"  # registered after SITE: polled until the server has both
READY = "window.ot && window.ot._ot === 1"  # ot.js has run
CORS_NOISE = "blocked by CORS policy"  # what Chromium logs for a failed preflight
BLANK = '<!doctype html><meta charset="utf-8"><title>Blank</title><link rel="icon" href="data:,">'
ORIGIN_REFUSALS = 'otserver_guard_refusals_total{guard="origin"}'


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def allowed():
    server = PageServer()
    server.add("/blank", BLANK)
    yield server
    server.close()


@pytest.fixture(scope="module")
def refused():
    server = PageServer()
    server.add("/blank", BLANK)
    yield server
    server.close()


class Ot:
    """The module's otserver, SITE registered with `allowed`'s origin (and picked up)."""

    def __init__(self, server: RunningServer, token: str):
        self.server = server
        self.port = server.port
        self.base = f"http://127.0.0.1:{server.port}"
        self.token = token

    def ids(self) -> list[str]:
        return self.server.event_ids()

    def events(self, **match) -> list[dict]:
        """SITE's stored events (read API) whose properties include `match`."""
        return [e for e in stored(self.server, self.token, SITE)
                if all(e.get(k) == v for k, v in match.items())]

    def metric(self, line_start: str) -> float:
        for line in self.server.get("/metrics").text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def control(self, origin: str) -> str:
        """An event for SITE from the allowed origin, sent after whatever a test checks is
        absent: the store answers in order, so once it is there, the other would be too."""
        resp = self.server.track(headers={"Origin": origin}, si=SITE, ev="control",
                                 marker=uuid.uuid4().hex)
        assert resp.status == 200, resp
        assert resp.headers["access-control-allow-origin"] == origin, resp.headers
        return resp.text


@pytest.fixture(scope="module")
def ot(tmp_path_factory, allowed, refused):
    server = RunningServer(tmp_path_factory.mktemp("origins") / "otdata",
                           ["--fold-delay", "1ms"]).start()
    try:
        token = server.create_token("*")
        data_dir = str(server.data_dir)
        # beside the running server, as an operator does; PROBE last (the registry is reloaded
        # whole: once PROBE's origin is answered, SITE's is in force too)
        for si in (SITE, PROBE):
            done = run_cli("site", "add", si, "--origins", allowed.origin, "--data-dir", data_dir)
            assert done.returncode == 0, done.stderr
            assert allowed.origin in done.stderr, done.stderr
        def picked_up():  # each poll stores a PROBE event (never one of SITE)
            resp = server.track(headers={"Origin": allowed.origin}, si=PROBE, ev="probe")
            assert resp.status == 200, resp
            return resp.headers["access-control-allow-origin"] == allowed.origin

        wait_until(picked_up, timeout=10, interval=0.05)
        # and the refused origin is refused for both (so SITE's origins are in force too),
        # storing nothing
        before = server.event_ids()
        for si in (PROBE, SITE):
            resp = server.track(headers={"Origin": refused.origin}, si=si, ev="probe")
            assert resp.status == 403, resp
        assert server.event_ids() == before
        yield Ot(server, token)
        assert server.proc.poll() is None, "otserver died during the tests:\n" + server.log()
    finally:
        server.kill()


class Pages(WatchedPages):
    """Browser contexts whose pages' console errors (and anything ot.js logs) and page errors
    fail the test at close; `allow_network_errors` and `allow_cors_errors` let through the
    lines Chromium logs for a refusal a test makes on purpose."""

    def __init__(self, browser):
        super().__init__(browser)
        self.allow_cors_errors = False
        self._clock = None

    def _console(self, message):
        if message.type == "error" or "/ot.js" in (message.location or {}).get("url", ""):
            self.problems.append(f"console {message.type}: {message.text}")

    def open(self, url: str, **context_options):
        """A new visitor (its own context) on `url`; the page's answers from otserver are
        collected in `page.answers` (Playwright Response objects, in arrival order)."""
        context = self.browser.new_context(**context_options)
        self.contexts.append(context)
        page = self.watch(context.new_page())
        page.answers = []
        page.on("response", lambda r: page.answers.append(r)
                if urlsplit(r.url).hostname == "127.0.0.1" else None)
        page.goto(url)
        return page

    def pump(self, seconds: float):
        """Wait, dispatching the browser's events meanwhile (the sync API dispatches them only
        inside its own calls), on a blank page of its own."""
        if self._clock is None:
            self._clock = self.browser.new_context().new_page()
        self._clock.wait_for_timeout(int(seconds * 1000))

    def wait(self, predicate, timeout: float = 10.0):
        """wait_until, pumping the browser's events between polls."""
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"still not true after {timeout} s: {predicate}")
            self.pump(0.05)
        return result

    def close(self):
        if self._clock is not None:
            self._clock.context.close()
        if self.allow_cors_errors:
            self.problems = [p for p in self.problems if CORS_NOISE not in p]
        super().close()


@pytest.fixture
def pages(browser):
    pages = Pages(browser)
    yield pages
    pages.close()


def answers_to(page, path: str, count: int, pages: Pages) -> list:
    """The page's first `count` answers from otserver to `path`, once they have arrived."""
    def arrived():
        found = [r for r in page.answers if urlsplit(r.url).path == path]
        return found[:count] if len(found) >= count else None
    return pages.wait(arrived)


# Sends one event each way a page's script can (POST / as text/plain, GET /?, POST /batch, a
# fetched GET /pixel.gif) and reports what the page could read of each answer.
SEND_ALL = """async ([base, site, marker]) => {
  const q = ev => `si=${encodeURIComponent(site)}&ev=${ev}&marker=${marker}`;
  const read = async (how, r) => ({how, status: r.status,
                                    text: how == 'pixel' ? '' : await r.text(),
                                    eid: r.headers.get('X-Eid'),
                                    type: r.headers.get('Content-Type')});
  return [
    await read('post', await fetch(base + '/', {method: 'POST', body: q('post')})),
    await read('get', await fetch(base + '/?' + q('get'))),
    await read('batch', await fetch(base + '/batch', {method: 'POST',
                                                       body: q('batch1') + '\\n' + q('batch2')})),
    await read('pixel', await fetch(base + '/pixel.gif?' + q('pixel'))),
  ];
}"""


def _check_browser_sent(answers, origin: str):
    """Each answer's request carried the page's Origin (else the guard would not apply)."""
    assert [a.request.method for a in answers] == ["POST", "GET", "POST", "GET"]
    for answer in answers:
        assert answer.request.all_headers().get("origin") == origin, answer.request.url


# ------------------------------------------------------------------------------ fetch


def test_allowed_origin_fetches_are_answered_with_its_origin_and_stored(ot, allowed, pages):
    marker = uuid.uuid4().hex
    before = set(ot.ids())
    page = pages.open(allowed.origin + "/blank")
    seen = page.evaluate(SEND_ALL, [ot.base, SITE, marker])
    # what the page read: 200 and the eids
    assert [(s["how"], s["status"]) for s in seen] == [
        ("post", 200), ("get", 200), ("batch", 200), ("pixel", 200)], seen
    post, get, batch, pixel = seen
    eids = {"post": post["text"], "get": get["text"]}
    eids["batch1"], eids["batch2"] = batch["text"].split()
    eids["pixel"] = pixel["eid"]  # X-Eid is exposed by the origin's own CORS block too
    assert pixel["type"] == "image/gif"
    assert all(len(eid) == 36 for eid in eids.values()), eids
    # what the browser got: the page's origin, not *, and Vary: Origin, on every answer
    answers = answers_to(page, "/", 2, pages) + answers_to(page, "/batch", 1, pages) \
        + answers_to(page, "/pixel.gif", 1, pages)
    _check_browser_sent(answers, allowed.origin)
    for answer in answers:
        headers = answer.all_headers()
        assert answer.status == 200
        assert headers["access-control-allow-origin"] == allowed.origin, (answer.url, headers)
        assert "origin" in headers.get("vary", "").lower(), (answer.url, headers)
    # what was stored: exactly these events, each under the eid the page read
    assert set(ot.ids()) - before == set(eids.values())
    events = {e["ev"]: e for e in ot.events(marker=marker)}
    assert {ev: e["eid"] for ev, e in events.items()} == eids
    assert all(e["si"] == SITE for e in events.values())


def test_refused_origin_fetches_read_403_and_store_nothing(ot, allowed, refused, pages):
    pages.allow_network_errors = True  # Chromium logs each 403
    marker = uuid.uuid4().hex
    refusals = ot.metric(ORIGIN_REFUSALS)
    before = ot.ids()
    page = pages.open(refused.origin + "/blank")
    seen = page.evaluate(SEND_ALL, [ot.base, SITE, marker])
    # what the page read: 403 with the reason (the refusal's CORS header is *), no eid
    assert [(s["how"], s["status"]) for s in seen] == [
        ("post", 403), ("get", 403), ("batch", 403), ("pixel", 403)], seen
    reason = f'origin "{refused.origin}" may not send events for site "{SITE}"'
    for s in seen[:3]:
        assert reason in s["text"], s
        assert s["type"].startswith("text/plain"), s
    assert all(s["eid"] is None for s in seen), seen
    answers = answers_to(page, "/", 2, pages) + answers_to(page, "/batch", 1, pages) \
        + answers_to(page, "/pixel.gif", 1, pages)
    _check_browser_sent(answers, refused.origin)
    for answer in answers:
        assert answer.status == 403
        assert answer.all_headers()["access-control-allow-origin"] == "*", answer.url
    # what was stored: nothing (the control, sent after, is the only new event)
    assert ot.ids() == before
    control = ot.control(allowed.origin)
    assert ot.ids() == before + [control]
    assert ot.events(marker=marker) == []
    assert wait_until(lambda: ot.metric(ORIGIN_REFUSALS) - refusals == 4)


# ------------------------------------------------------------------------------ sendBeacon


BEACON = """([base, site, ev, marker]) => navigator.sendBeacon(base + '/',
    `si=${encodeURIComponent(site)}&ev=${ev}&marker=${marker}`)"""


def test_beacon_from_refused_origin_stores_nothing_from_allowed_origin_stores(
        ot, allowed, refused, pages):
    """(Playwright shows a beacon's provisional headers only, without Origin: that the
    browser sent it is seen in the server's count of origin refusals.)"""
    pages.allow_network_errors = True
    refusals = ot.metric(ORIGIN_REFUSALS)
    before = ot.ids()
    # refused: the beacon is queued (true), reaches the server with its Origin, is refused
    marker = uuid.uuid4().hex
    page = pages.open(refused.origin + "/blank")
    assert page.evaluate(BEACON, [ot.base, SITE, "beacon", marker]) is True
    [answer] = answers_to(page, "/", 1, pages)
    assert answer.request.resource_type == "ping"
    assert answer.status == 403
    assert wait_until(lambda: ot.metric(ORIGIN_REFUSALS) - refusals == 1)
    # allowed: the same beacon is stored (after the refused one was answered)
    control = uuid.uuid4().hex
    page = pages.open(allowed.origin + "/blank")
    assert page.evaluate(BEACON, [ot.base, SITE, "beacon", control]) is True
    [event] = pages.wait(lambda: ot.events(marker=control))
    assert event["ev"] == "beacon" and event["si"] == SITE
    [answer] = answers_to(page, "/", 1, pages)
    assert answer.status == 200  # (Playwright keeps neither a beacon's body nor its CORS headers)
    # nothing else was stored: the refused beacon is not there, and never comes
    assert ot.ids() == before + [event["eid"]]
    assert ot.events(marker=marker) == []


# ------------------------------------------------------------------------------ ot.js


def _ot_js_page(ot, pages_server, path: str, before: str = "") -> str:
    return pages_server.add(path, page_html(ot.port, SITE, title="Origins", before=before,
                                            attrs='data-flush-interval="50"'))


def test_ot_js_on_the_allowed_origin_stores_its_pageview(ot, allowed, pages):
    url = _ot_js_page(ot, allowed, f"/ot-{uuid.uuid4().hex}")
    before = set(ot.ids())
    page = pages.open(url)
    page.wait_for_function(READY)
    [event] = pages.wait(lambda: ot.events(url=url))
    assert event["ev"] == "pageview" and event["si"] == SITE and event["title"] == "Origins"
    [answer] = answers_to(page, "/batch", 1, pages)
    assert answer.status == 200  # (ot.js does not read the body: Playwright cannot either)
    assert answer.request.all_headers().get("origin") == allowed.origin
    assert answer.all_headers()["access-control-allow-origin"] == allowed.origin
    assert set(ot.ids()) - before == {event["eid"]}


def test_ot_js_on_a_refused_origin_stores_nothing_and_does_not_retry(ot, allowed, refused,
                                                                     pages):
    """ot.js reads the 403 (the refusal carries `*`) and drops the events: one request (the
    pageview and a queued event in one batch), no retry (one would come 1 to 1.25 s after
    the first, a second 2 s later: the wait is 2.5 s), nothing kept for the next load,
    nothing stored."""
    pages.allow_network_errors = True
    url = _ot_js_page(ot, refused, f"/ot-{uuid.uuid4().hex}",
                      before="window.ot = window.ot || []; ot.push(['track', 'clicked', {n: 1}])")
    before = ot.ids()
    page = pages.open(url)
    page.wait_for_function(READY)
    [first] = answers_to(page, "/batch", 1, pages)
    assert first.status == 403 and first.request.all_headers().get("origin") == refused.origin
    assert first.all_headers()["access-control-allow-origin"] == "*"
    assert [e["ev"] for e in parse_lines(first.request.post_data)] == ["pageview", "clicked"]
    pages.pump(2.5)
    batches = [r for r in page.answers if urlsplit(r.url).path == "/batch"]
    sent = [parse_lines(r.request.post_data or "") for r in batches]
    assert len(batches) <= 2, sent
    assert len(batches) == 1, ("ot.js sent the refused events again", sent)
    # leaving the page keeps nothing for the next load (no ot_q) and beacons nothing stored
    page.goto(refused.origin + "/blank")
    assert page.evaluate("localStorage.getItem('ot_q')") is None
    control = ot.control(allowed.origin)
    assert ot.ids() == before + [control]
    assert ot.events(url=url) == [] and ot.events(ev="clicked") == []


# ------------------------------------------------------------------------------ preflight


KEYED = """async ([target, body, key]) => {
  try {
    const r = await fetch(target, {method: 'POST', body, headers: {'Idempotency-Key': key}});
    return {status: r.status, text: await r.text()};
  } catch (e) {
    return {error: String(e)};
  }
}"""


def test_keyed_fetch_preflight_from_allowed_origin_succeeds(ot, allowed, pages):
    """A custom header forces a preflight, which names the site in its query: it answers
    with the origin, then the POST is stored; sent again with the key, it is not stored
    twice."""
    marker, key = uuid.uuid4().hex, str(uuid.uuid4())
    target = f"{ot.base}/?" + urlencode({"si": SITE, "ev": "keyed", "marker": marker},
                                        quote_via=quote)
    preflights = ot.metric('otserver_requests_total{endpoint="/",status="204"}')
    before = set(ot.ids())
    page = pages.open(allowed.origin + "/blank")
    first = page.evaluate(KEYED, [target, "n=1", key])
    assert first.get("status") == 200, first
    again = page.evaluate(KEYED, [target, "n=1", key])
    assert again == first  # the same eid: replayed, not stored twice
    [answer, _] = answers_to(page, "/", 2, pages)
    assert answer.request.all_headers().get("idempotency-key") == key
    assert answer.all_headers()["access-control-allow-origin"] == allowed.origin
    # the browser did ask first (a 204 answered; the second fetch may use the cached one)
    assert wait_until(lambda: ot.metric(
        'otserver_requests_total{endpoint="/",status="204"}') - preflights >= 1)
    # the same preflight, by hand: the origin, and the header allowed
    resp = ot.server.request("OPTIONS", target[len(ot.base):],
                             headers={"Origin": allowed.origin,
                                      "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "idempotency-key"})
    assert resp.status == 204, resp
    assert resp.headers["access-control-allow-origin"] == allowed.origin, resp.headers
    assert "idempotency-key" in resp.headers["access-control-allow-headers"].lower()
    [event] = ot.events(marker=marker)
    assert event["eid"] == first["text"] and event["n"] == "1" and event["si"] == SITE
    assert set(ot.ids()) - before == {first["text"]}


def test_keyed_fetch_from_refused_origin_fails_at_the_preflight_and_stores_nothing(
        ot, allowed, refused, pages):
    pages.allow_network_errors = True
    pages.allow_cors_errors = True
    marker, key = uuid.uuid4().hex, str(uuid.uuid4())
    refusals = ot.metric(ORIGIN_REFUSALS)
    before = ot.ids()
    page = pages.open(refused.origin + "/blank")
    # si in the query: the preflight is refused (403), so the POST is never sent
    target = f"{ot.base}/?" + urlencode({"si": SITE, "ev": "keyed", "marker": marker},
                                        quote_via=quote)
    failed = page.evaluate(KEYED, [target, "n=1", key])
    assert "error" in failed and "Failed to fetch" in failed["error"], failed
    assert wait_until(lambda: ot.metric(ORIGIN_REFUSALS) - refusals >= 1)
    pages.pump(0.2)
    assert ot.metric(ORIGIN_REFUSALS) - refusals == 1  # the preflight only: no POST followed
    assert [r for r in page.answers if r.request.method == "POST"] == []
    # the same preflight, by hand: 403 naming the origin
    resp = ot.server.request("OPTIONS", target[len(ot.base):],
                             headers={"Origin": refused.origin,
                                      "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "idempotency-key"})
    assert resp.status == 403 and f'origin "{refused.origin}"' in resp.text, resp
    # si in the body only: the preflight cannot tell the site (answers *), the POST is
    # refused with a readable 403
    body_only = page.evaluate(KEYED, [ot.base + "/",
                                      f"si={SITE}&ev=keyed&marker={marker}", str(uuid.uuid4())])
    assert body_only.get("status") == 403, body_only
    assert f'may not send events for site "{SITE}"' in body_only["text"], body_only
    # stored: nothing of either (the control, sent after, is the only new event)
    control = ot.control(allowed.origin)
    assert ot.ids() == before + [control]
    assert ot.events(marker=marker) == []
