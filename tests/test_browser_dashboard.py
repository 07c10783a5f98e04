"""The dashboard (`GET /dashboard`) in a real browser (Debian's Chromium via Playwright) against
a real otserver seeded over HTTP: whatever the page shows is compared with what the report API
answers for the same range, with the same token. Every test also fails on a console error or
warning or an uncaught page error (but for Chromium's own "Failed to load resource" line where a
test makes requests fail on purpose: a 401, a stopped server).

`python tests/test_browser_dashboard.py docs/dashboard.png` writes the README's screenshot: a
store seeded with a week of varied events (appended straight to the log, with past times),
served, and shown at 1280 px.
"""
from __future__ import annotations

import re
import sys
import time
import uuid
from datetime import datetime
from types import SimpleNamespace
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import expect, sync_playwright

from browser import WatchedPages, launch
from conftest import RunningServer

SITE, OTHERS, LIVE = "shop.dash.test", ("blog.dash.test", "docs.dash.test"), "live.dash.test"
TOKEN_KEY = "otserver.dashboard.token"  # dashboard.js keeps the token under this name
CHROME_WINDOWS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like "
                  "Gecko) Chrome/124.0.0.0 Safari/537.36")
IPHONE_SAFARI = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
                 "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
HOSTILE = '/<img src=x onerror="window.pwned=1">'  # a page path that must stay text
TABLES = ("url", "referrer_host", "utm_source", "utm_campaign", "browser", "os", "device")
TOTALS = ("events", "sessions", "visitors")  # shown as #total-events, ...
TIMEZONE = "Europe/Berlin"


def post_batch(server, lines: list[dict], user_agent: str):
    resp = server.post("/batch", "\n".join(urlencode(line) for line in lines),
                       headers={"Content-Type": "text/plain", "User-Agent": user_agent})
    assert resp.status == 200, resp
    return resp.text.split()


def seed(server) -> None:
    """~60 events of SITE in 12 sessions of 7 users, a third of them Googlebot's, from
    news.example and search; a few events of two other sites."""
    paths = ["/", "/pricing", "/docs", "/blog/launch", HOSTILE]
    for n in range(12):
        agent = (CHROME_WINDOWS, IPHONE_SAFARI, GOOGLEBOT)[n % 3]
        source, campaign = (("news", "launch"), ("search", "spring"), ("mail", "launch"))[n % 3]
        lines = []
        for i in range(5):
            path = paths[(n + i) % len(paths)]
            line = {"si": SITE, "sid": f"s{n}", "uid": f"u{n % 7}", "ev": "pageview",
                    "url": f"https://{SITE}{path}"}
            if i == 0:
                line["url"] += f"?utm_source={source}&utm_campaign={campaign}"
                line.update(utm_source=source, utm_campaign=campaign,
                            referrer=("https://news.example/a" if n % 2
                                      else "https://www.google.com/"))
            elif i == 4:
                line["ev"] = "signup"
            lines.append(line)
        post_batch(server, lines, agent)
    for si in OTHERS:
        post_batch(server, [{"si": si, "sid": "o1", "ev": "pageview", "url": f"https://{si}/"}] * 3,
                   CHROME_WINDOWS)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    server = RunningServer(tmp_path_factory.mktemp("dash") / "otdata",
                           ["--fold-delay", "1ms"]).start()
    token = server.create_token("*")
    seed(server)
    post_batch(server, [{"si": LIVE, "ev": "pageview", "url": f"https://{LIVE}/"}], CHROME_WINDOWS)
    yield SimpleNamespace(server=server, token=token,
                          url=f"http://127.0.0.1:{server.port}/dashboard")
    server.kill()


class Watch(WatchedPages):
    """Pages whose console errors and warnings and page errors are collected; closing checks
    there were none."""

    def page(self, **options):
        options.setdefault("viewport", {"width": 1280, "height": 900})
        options.setdefault("timezone_id", TIMEZONE)
        context = self.browser.new_context(**options)
        self.contexts.append(context)
        return self.watch(context.new_page())

    def _console(self, message):
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")


@pytest.fixture
def watch(browser):
    watch = Watch(browser)
    yield watch
    watch.close()


# ---------------------------------------------------------------------------------- helpers


def ready(page) -> None:
    """Until the page's last load has every report on screen."""
    page.wait_for_selector("body[data-ready='1']", state="attached")


def sign_in(page, url: str, token: str, fragment: str = "") -> None:
    page.goto(url + fragment)
    page.wait_for_selector("#signin-form", state="visible")
    page.fill("#token", token)
    page.click("#signin-submit")
    ready(page)


def newest(page, text: str, timeout: float = 5) -> None:
    """Until the live feed's first (newest) entry shows `text`. (The page's Content Security
    Policy forbids eval, so waits are selectors and expectations, never wait_for_function.)"""
    expect(page.locator("#live li").first).to_contain_text(text, timeout=timeout * 1000)


def choose(page, selector: str, value: str) -> None:
    page.select_option(selector, value)  # the change starts a load at once (ready "0")
    ready(page)


def api(dash, path: str, **params) -> dict:
    resp = dash.server.api(f"/api/v1/{path}?{urlencode(params)}", dash.token)
    assert resp.status == 200, resp
    return resp.json()


def digits(text: str) -> int:
    return int(re.sub(r"\D", "", text))


def shown_totals(page) -> dict:
    """The totals as shown (value attribute and text), the range and bots they are for."""
    return page.evaluate("""() => {
        const box = document.getElementById('totals').dataset;
        const num = id => { const el = document.getElementById(id);
                            return [el.dataset.value, el.textContent] };
        return {from: +box.from, to: +box.to, bucket: box.bucket, bots: box.bots,
                now: num('visitors-now'), events: num('total-events'),
                sessions: num('total-sessions'), visitors: num('total-visitors')};
    }""")


def shown_table(page, by: str) -> list[tuple]:
    return [tuple(row) for row in page.evaluate("""by => [...document.querySelectorAll(
        `#t-${by} tbody tr[data-value]`)].map(tr => [tr.dataset.value,
            +tr.querySelector('.visitors').dataset.value,
            +tr.querySelector('.events').dataset.value,
            tr.querySelector('.v').textContent, tr.querySelector('.visitors').textContent,
            tr.querySelector('.events').textContent])""", by)]


def check_numbers(page, dash, si: str, bots: bool) -> dict:
    """Totals, visitors now and every table as shown equal the API's answers for the range
    the page asked for; returns the API's stats."""
    shown = shown_totals(page)
    assert shown["bots"] == ("true" if bots else "false")
    extra = {"include_bots": "true"} if bots else {}
    stats = api(dash, "stats", si=si, bucket=shown["bucket"], **{"from": shown["from"]},
                to=shown["to"], **extra)
    for name in TOTALS:
        value, text = shown[name]
        assert int(value) == stats["totals"][name] == digits(text), (name, shown, stats["totals"])
    now = int(time.time() * 1000)
    recent = api(dash, "stats", si=si, bucket="minute", **{"from": now - 300_000}, to=now, **extra)
    assert int(shown["now"][0]) == recent["totals"]["sessions"] == digits(shown["now"][1])
    span = page.evaluate("() => { const d = document.getElementById('tables').dataset;"
                         " return [+d.from, +d.to] }")
    for by in TABLES:
        rows = api(dash, "breakdown", si=si, by=by, limit=10, **{"from": span[0]}, to=span[1],
                   **extra)["rows"]
        table = shown_table(page, by)
        assert [(v, n, e) for v, n, e, *_ in table] == \
            [(r["value"], r["visitors"], r["events"]) for r in rows], by
        for value, visitors, events, text, visitors_text, events_text in table:
            assert (text, digits(visitors_text), digits(events_text)) == (value, visitors, events)
        if by == "url":
            assert rows, "no top pages"
    return stats


def hash_of(page) -> dict:
    return dict(re.findall(r"([^&=#]+)=([^&]*)", page.evaluate("location.hash")))


def screenshot(page, tmp_path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


# ---------------------------------------------------------------------------------- tests


def test_totals_tables_bots_and_reload_match_the_api(dash, watch, tmp_path):
    page = watch.page()
    sign_in(page, dash.url, dash.token)
    sites = [o["value"] for o in page.evaluate(
        "[...document.querySelectorAll('#site option')].map(o => ({value: o.value}))")]
    assert set(sites) >= {SITE, *OTHERS, LIVE}
    assert sorted(sites) == sorted(s["si"] for s in api(dash, "sites")["sites"])
    choose(page, "#site", SITE)
    assert hash_of(page) == {"si": SITE, "range": "24h"}
    without = check_numbers(page, dash, SITE, bots=False)
    assert without["totals"]["events"] > 0

    page.check("#bots")
    ready(page)
    assert hash_of(page)["bots"] == "1"
    with_bots = check_numbers(page, dash, SITE, bots=True)
    assert with_bots["totals"]["events"] > without["totals"]["events"]  # Googlebot's count now

    # what the page shows is text, never markup
    urls = [row[0] for row in shown_table(page, "url")]
    assert any("<img" in url for url in urls), urls
    assert page.evaluate("window.pwned") is None
    assert page.evaluate("document.querySelectorAll('main img, main b').length") == 0
    chart = page.locator("#chart")
    assert chart.get_attribute("data-bucket") == "hour"
    assert int(chart.get_attribute("data-points")) in (24, 25)  # gaps filled with zeros
    assert page.locator("#chart canvas").count() == 1

    # a reload keeps the sign-in (sessionStorage) and the choice (hash)
    page.reload()
    ready(page)
    assert page.locator("#signin").is_hidden()
    assert page.input_value("#site") == SITE and page.input_value("#range") == "24h"
    assert page.is_checked("#bots")
    check_numbers(page, dash, SITE, bots=True)
    # every report was asked for before any answer came (and before the list of sites)
    calls = page.evaluate("""() => performance.getEntriesByType('resource')
        .filter(r => /\\/api\\/v1\\/(stats|breakdown|sites)/.test(r.name))
        .map(r => [r.name, r.startTime, r.responseEnd])""")
    reports = [c for c in calls if "/sites" not in c[0]]
    assert len(reports) == 2 + len(TABLES), calls
    assert all("include_bots=true" in c[0] for c in reports)
    assert max(c[1] for c in reports) < min(c[2] for c in reports), calls
    screenshot(page, tmp_path, "dashboard.png")


def test_ranges_pick_their_buckets_and_a_custom_range_is_local_time(dash, watch):
    page = watch.page()
    sign_in(page, dash.url, dash.token, f"#si={SITE}&range=7d")
    assert page.input_value("#range") == "7d"
    assert page.get_attribute("#chart", "data-bucket") == "hour"
    choose(page, "#range", "30d")
    assert page.get_attribute("#chart", "data-bucket") == "day"
    assert hash_of(page)["range"] == "30d"
    check_numbers(page, dash, SITE, bots=False)

    page.select_option("#range", "custom")
    assert page.locator("#from").is_visible() and page.locator("#to").is_visible()
    zone = ZoneInfo(TIMEZONE)
    start = datetime.now(zone).replace(minute=0, second=0, microsecond=0)  # this hour
    end = start.replace(hour=start.hour + 1) if start.hour < 23 else start.replace(minute=59)
    text = "%Y-%m-%dT%H:%M"
    page.fill("#from", start.strftime(text))
    page.fill("#to", end.strftime(text))
    page.wait_for_url(lambda url: url.endswith(f"to={quote(end.strftime(text), safe='')}"))
    ready(page)
    shown = shown_totals(page)
    assert (shown["from"], shown["to"]) == (int(start.timestamp() * 1000),
                                            int(end.timestamp() * 1000))
    assert shown["bucket"] == "minute"
    assert page.get_attribute("#chart", "data-bucket") == "minute"
    check_numbers(page, dash, SITE, bots=False)
    page.reload()
    ready(page)
    assert page.input_value("#range") == "custom"
    assert page.input_value("#from") == start.strftime(text)
    assert (shown_totals(page)["from"], shown_totals(page)["to"]) == (shown["from"], shown["to"])


def test_live_feed_shows_new_events_newest_first_at_most_50(dash, watch):
    page = watch.page()
    sign_in(page, dash.url, dash.token, f"#si={LIVE}&range=24h")
    page.wait_for_selector("#live-status[data-state=open]")
    marks = [f"m-{uuid.uuid4()}" for _ in range(2)]
    for mark in marks:
        post_batch(dash.server, [{"si": LIVE, "ev": "purchase", "mark": mark,
                                  "url": f"https://{LIVE}/<b>checkout</b>"}], IPHONE_SAFARI)
        newest(page, mark)
    first = page.locator("#live li").first
    assert first.locator(".ev").text_content() == "purchase"
    assert first.locator(".url").text_content() == f"https://{LIVE}/<b>checkout</b>"
    assert page.locator("#live b").count() == 0
    assert page.locator("#live li").count() == 2
    assert marks[0] in page.locator("#live li").nth(1).text_content()

    many = [f"n{i}-{uuid.uuid4()}" for i in range(55)]
    post_batch(dash.server, [{"si": LIVE, "ev": "tick", "mark": m} for m in many], CHROME_WINDOWS)
    newest(page, many[-1])
    assert page.locator("#live li").count() == 50
    assert many[-50] in page.locator("#live li").last.text_content()


def test_live_feed_resumes_after_a_restart_with_last_event_id(make_server, watch):
    watch.allow_network_errors = True  # the page's requests fail while the server is down
    server = make_server("--fold-delay", "1ms")
    token = server.create_token(LIVE)  # a site's own token lists that site only
    post_batch(server, [{"si": LIVE, "ev": "pageview"}], CHROME_WINDOWS)
    page = watch.page()
    streams = []
    page.on("request", lambda r: streams.append(r.headers) if "/api/v1/live" in r.url else None)
    sign_in(page, f"http://127.0.0.1:{server.port}/dashboard", token)
    assert page.input_value("#site") == LIVE
    page.wait_for_selector("#live-status[data-state=open]")
    post_batch(server, [{"si": LIVE, "ev": "before", "mark": "A"}], CHROME_WINDOWS)
    newest(page, "mark=A")
    seen = page.get_attribute("#live li", "data-id")
    assert seen and "last-event-id" not in streams[0]

    port = server.port
    assert server.stop() == 0
    page.wait_for_selector("#live-status:not([data-state=open])")
    again = make_server("--fold-delay", "1ms", "--port", str(port), data_dir=server.data_dir)
    post_batch(again, [{"si": LIVE, "ev": "after", "mark": "B"}], CHROME_WINDOWS)
    newest(page, "mark=B", timeout=20)
    assert streams[-1].get("last-event-id") == seen
    texts = page.locator("#live li").all_text_contents()
    assert len(texts) == 2 and "mark=A" in texts[1]  # nothing missed, nothing twice
    assert int(page.get_attribute("#live li", "data-id")) > int(seen)
    page.wait_for_selector("#live-status[data-state=open]")


def test_wrong_token_and_revoked_token_show_the_sign_in_with_the_reason(dash, watch):
    watch.allow_network_errors = True  # Chromium logs each 401
    page = watch.page()
    page.goto(dash.url)
    page.fill("#token", "ot_not_a_token")
    page.click("#signin-submit")
    error = page.locator("#signin-error")
    error.wait_for(state="visible")
    assert "invalid token" in error.text_content()
    assert page.locator("#app").is_hidden()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None

    page.fill("#token", "two words")  # refused before it is sent
    page.click("#signin-submit")
    expect(error).to_contain_text("printable ASCII")

    page.fill("#token", dash.token)
    page.click("#signin-submit")
    ready(page)
    assert error.is_hidden()
    page.evaluate(f"sessionStorage.setItem('{TOKEN_KEY}', 'ot_revoked')")
    page.reload()
    error.wait_for(state="visible")
    assert "invalid token" in error.text_content()

    page.fill("#token", dash.token)
    page.click("#signin-submit")
    ready(page)
    page.click("#signout")
    assert page.locator("#signin").is_visible() and error.is_hidden()
    assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") is None
    assert page.locator("#visitors-now").text_content() == "–"
    page.reload()
    page.wait_for_selector("#signin-form", state="visible")


def test_phone_width_is_one_column_without_horizontal_scroll(dash, watch, tmp_path):
    page = watch.page(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True,
                      device_scale_factor=2)
    page.goto(dash.url)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.fill("#token", dash.token)
    page.click("#signin-submit")
    ready(page)
    choose(page, "#site", LIVE)
    page.wait_for_selector("#live-status[data-state=open]")
    long_url = f"https://{LIVE}/" + "a-very-long-path/" * 20
    post_batch(dash.server, [{"si": LIVE, "ev": "a-rather-long-event-name-" * 4, "url": long_url,
                              "mark": "wide" * 50}], CHROME_WINDOWS)
    newest(page, "wide")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    columns = page.evaluate("""() => ['totals', 'tables'].map(id =>
        getComputedStyle(document.getElementById(id)).gridTemplateColumns.split(' ').length)""")
    assert columns == [1, 1]
    page.select_option("#range", "custom")  # from the 24 h shown, to the end of this minute
    ready(page)
    assert page.locator("#from").is_visible()
    assert any("a-very-long-path/" * 3 in row[0] for row in shown_table(page, "url"))
    check_numbers(page, dash, LIVE, bots=False)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    screenshot(page, tmp_path, "dashboard-375.png")


# ---------------------------------------------------------------------------------- docs


def write_docs_screenshot(out: str) -> None:
    """A week of a made-up shop's traffic (daily rhythm, several pages, sources, browsers),
    appended straight to a fresh store's log with past times, then served and shown."""
    import random
    import tempfile
    from pathlib import Path

    from otserver.config import Config
    from otserver.model import EidGenerator, make_event
    from otserver.store import Store

    rand = random.Random(3)
    site = "shop.example.com"
    pages = ["/", "/pricing", "/docs/getting-started", "/blog/launch-week", "/features",
             "/docs/api", "/signup", "/about", "/blog/how-we-count", "/changelog", "/careers"]
    refs = ["", "", "https://news.ycombinator.com/item", "https://www.google.com/",
            "https://duckduckgo.com/", "https://t.co/x", "https://www.reddit.com/r/selfhosted"]
    utms = [("", ""), ("", ""), ("newsletter", "december"), ("mastodon", "launch"),
            ("google", "brand")]
    agents = [CHROME_WINDOWS, CHROME_WINDOWS, IPHONE_SAFARI,
              "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like "
              "Gecko) Version/17.4 Safari/605.1.15",
              "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
              "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0.0.0 Mobile Safari/537.36", GOOGLEBOT]
    now = int(time.time() * 1000)
    sessions = []
    for _ in range(4000):  # session starts over 7 days, busier by day
        while True:
            at = now - rand.randrange(7 * 86_400_000)
            hour = datetime.fromtimestamp(at / 1000).hour
            if rand.random() < 0.25 + 0.75 * max(0.0, 1 - abs(hour - 14) / 9):
                break
        sessions.append(at)
    events = []
    for n, at in enumerate(sessions):
        uid, agent = f"u{rand.randrange(2600)}", rand.choice(agents)
        source, campaign = rand.choice(utms)
        ref = rand.choice(refs)
        for i in range(rand.choice((1, 1, 2, 3, 4, 6))):
            path = rand.choice(pages[: 4 + i * 2])
            props = {"si": site, "sid": f"s{n}", "uid": uid, "ev": "pageview",
                     "url": f"https://{site}{path}"}
            if i == 0:
                if source:
                    props.update(utm_source=source, utm_campaign=campaign)
                    props["url"] += f"?utm_source={source}&utm_campaign={campaign}"
                if ref:
                    props["referrer"] = ref
            elif rand.random() < 0.15:
                props["ev"] = "signup"
            events.append((at + i * rand.randrange(5_000, 90_000), props, agent))
    events.sort(key=lambda e: e[0])

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "otdata"
        config, eids = Config(), EidGenerator()
        store = Store(str(data_dir))
        store.log.append([make_event(dict(props), {"user_agent": agent, "ip": "192.0.2.0"},
                                     eids, at, config).encode()
                          for at, props, agent in events if at < now])
        store.close()
        server = RunningServer(data_dir, ["--fold-delay", "1ms"]).start()
        try:
            token = server.create_token("*")
            for i in range(9):  # a few visitors now
                post_batch(server, [{"si": site, "sid": f"now{i}", "uid": f"now{i}",
                                     "ev": "pageview", "url": f"https://{site}{pages[i]}"}],
                           agents[i % 6])
            with sync_playwright() as playwright:
                browser = launch(playwright)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{server.port}/dashboard#si={site}&range=7d")
                page.fill("#token", token)
                page.click("#signin-submit")
                ready(page)
                page.wait_for_selector("#live-status[data-state=open]")
                for i in range(6):
                    post_batch(server, [{"si": site, "sid": f"now{i}", "uid": f"now{i}",
                                         "ev": ("pageview", "signup")[i % 2],
                                         "url": f"https://{site}{pages[i + 1]}"}], agents[i % 6])
                    page.wait_for_timeout(300)
                page.mouse.move(0, 0)
                page.screenshot(path=out, full_page=True)
                browser.close()
        finally:
            server.stop()
    try:  # a palette of 256 colours: a third of the size, the same picture to the eye
        from PIL import Image
        Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
    except ImportError:
        pass
    print(f"{out}: {Path(out).stat().st_size} bytes")


if __name__ == "__main__":
    write_docs_screenshot(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png")
