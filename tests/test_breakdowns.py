"""Breakdowns, distinct sessions and visitors, bots, and the site list, against a hand count
over a seeded multi-day data set (imported with its own times, then live ingest on top), with
bots in and out. Real server, real LMDB, real CLI; every refusal checked for its answer and for
storing nothing."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from urllib.parse import urlencode, urlsplit

import pytest
from conftest import assert_json_error
from test_reports import DAY, HOUR, MIN, make_eid, ok_eid, ok_json

CHROME = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
          "like Gecko) Version/17.5 Mobile/15E148 Safari/604.1")
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
AGENTS = {CHROME: ("Chrome", "Windows", "desktop", False),
          IPHONE: ("Mobile Safari", "iOS", "mobile", False),
          GOOGLEBOT: ("Googlebot", "Unknown", "bot", True)}
PAGES = ["/", "/pricing", "/docs", "/blog/a", "/blog/b"]
REFERRERS = ["", "https://www.google.com/search?q=x", "https://news.example/item",
             "https://t.co/x"]
SI, OTHER_SI = "shop.example", "other.example"


def expected_values(event: dict, captured: dict) -> dict:
    """What a person reads off an event for each dimension (independent of the server)."""
    url = event.get("url")
    path = urlsplit(url).path if url else "(none)"
    query = dict(p.split("=", 1) for p in urlsplit(url).query.split("&") if "=" in p) \
        if url else {}
    referrer = event.get("referrer")
    if referrer:
        host = urlsplit(referrer).hostname.removeprefix("www.")
        source = "(internal)" if host == "shop.example" else host
    else:
        source = "(direct)"
    browser, os_, device, bot = AGENTS[captured["user_agent"]]
    values = {"url": path, "referrer_host": source, "ev": event.get("ev") or "(none)",
              "browser": browser, "os": os_, "device": device,
              "plan": event.get("plan") or "(none)"}
    for name in ("utm_source", "utm_medium", "utm_campaign"):
        values[name] = event.get(name) or query.get(name) or "(none)"
    return values | {"bot": bot}


def seed(tmp_path, rng: random.Random, now: int) -> list[dict]:
    """Three days of one site's traffic (and a little of another site), as imported payloads
    in time order; returns every payload."""
    payloads = []
    ts = now - 3 * DAY + 7 * MIN
    n = 0
    while ts < now - 2 * HOUR:
        visitor = rng.randrange(12)
        agent = GOOGLEBOT if visitor >= 10 else (IPHONE if visitor % 3 == 0 else CHROME)
        sid = f"v{visitor}-{ts // (6 * HOUR)}"  # a session per visitor and six hours
        page = rng.choice(PAGES)
        url = f"https://shop.example{page}"
        if n % 5 == 0:
            url += f"?utm_source=news{n % 2}&utm_campaign=spring"
        event = {"unixtimestamp": ts, "si": SI, "ev": rng.choice(["pageview", "pageview", "buy"]),
                 "url": url, "referrer": rng.choice(REFERRERS),
                 "eid": make_eid(ts, rng), "sid": sid, "uid": f"visitor-{visitor}"}
        if n % 7 == 0:
            event["utm_medium"] = "email"
        if n % 4 == 0:
            event["plan"] = rng.choice(["free", "pro"])
        if n % 11 == 0:
            event["increment"] = "false"  # stored, never counted
        payloads.append({"event": event, "captured": {"user_agent": agent, "ip": "127.0.0.0"}})
        if n % 9 == 0:
            other = dict(event, si=OTHER_SI, eid=make_eid(ts, rng))
            other.pop("increment", None)
            payloads.append({"event": other, "captured": {"user_agent": CHROME}})
        ts += rng.randrange(5 * MIN, 40 * MIN)
        n += 1
    source = tmp_path / "seed.ndjson"
    source.write_text("".join(json.dumps(p) + "\n" for p in payloads))
    return payloads


def hand_breakdown(payloads, by: str, start: int, end: int, bots: bool) -> list[dict]:
    rows: dict[str, list] = {}
    for p in payloads:
        event = p["event"]
        if event["si"] != SI or event.get("increment") == "false":
            continue
        if not start <= event["unixtimestamp"] < end:
            continue
        values = expected_values(event, p["captured"])
        if values["bot"] and not bots:
            continue
        row = rows.setdefault(values[by], [0, set(), set()])
        row[0] += 1
        row[1].add(event["sid"])
        row[2].add(event["uid"])
    return sorted(({"value": v, "events": r[0], "sessions": len(r[1]), "visitors": len(r[2])}
                   for v, r in rows.items()), key=lambda r: (-r["events"], r["value"].encode()))


def hand_uniques(payloads, start: int, end: int, bots: bool) -> tuple[int, int, int]:
    events, sessions, users = 0, set(), set()
    for p in payloads:
        event = p["event"]
        if event["si"] != SI or event.get("increment") == "false":
            continue
        if start <= event["unixtimestamp"] < end and (bots or not AGENTS[
                p["captured"]["user_agent"]][3]):
            events += 1
            sessions.add(event["sid"])
            users.add(event["uid"])
    return events, len(sessions), len(users)


def api(server, token, kind: str, **params) -> dict:
    return ok_json(server.api(f"/api/v1/{kind}?" + urlencode(params), token))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A server over the imported days plus live events now; (server, token, payloads)."""
    from conftest import RunningServer
    tmp_path = tmp_path_factory.mktemp("breakdowns")
    rng = random.Random(13)
    now = int(time.time() * 1000)
    payloads = seed(tmp_path, rng, now)
    data_dir = tmp_path / "data"
    # import folds what it stores: with the same dimensions as the server that follows
    done = subprocess.run(
        [sys.executable, "-m", "otserver", "import", str(tmp_path / "seed.ndjson"),
         "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OTSERVER_BREAKDOWN_PROPERTIES": "plan"})
    assert done.returncode == 0, done.stderr
    server = RunningServer(data_dir, ("--breakdown-properties", "plan", "--fold-delay", "1ms"))
    server.start()
    try:
        token = server.create_token("*")
        live = [("v1", "visitor-1", CHROME, "/pricing", "https://www.google.com/"),
                ("v1", "visitor-1", CHROME, "/docs", "https://shop.example/pricing"),
                ("new", "visitor-new", IPHONE, "/", ""),
                ("crawl", "crawler", GOOGLEBOT, "/blog/a", "")]
        for sid, uid, agent, page, referrer in live:
            resp = server.track({"User-Agent": agent}, si=SI, sid=sid, uid=uid, ev="pageview",
                                url=f"https://shop.example{page}", referrer=referrer)
            eid = ok_eid(resp)
            event = ok_json(server.api(f"/api/v1/events/{eid}?si={SI}", token))
            payloads.append({"event": event["event"], "captured": {"user_agent": agent}})
        yield server, token, payloads
    finally:
        server.stop()


DIMENSIONS = ["url", "referrer_host", "utm_source", "utm_medium", "utm_campaign", "ev",
              "browser", "os", "device", "plan"]


@pytest.mark.parametrize("by", DIMENSIONS)
def test_breakdowns_equal_a_hand_count_over_days_and_hours_bots_in_and_out(seeded, by):
    server, token, payloads = seeded
    now = int(time.time() * 1000)
    ranges = [
        (now - 4 * DAY, now + HOUR),                          # everything: days and hours
        ((now - 2 * DAY) // HOUR * HOUR, (now - DAY) // HOUR * HOUR),  # a day of whole hours
        ((now - 30 * HOUR) // HOUR * HOUR, now + HOUR),        # yesterday's end and today
    ]
    for start, end in ranges:
        for bots in (False, True):
            got = api(server, token, "breakdown", si=SI, by=by, limit="1000",
                      include_bots=str(bots).lower(), **{"from": str(start), "to": str(end)})
            assert (got["si"], got["by"], got["include_bots"]) == (SI, by, bots)
            assert got["from"] == start // HOUR * HOUR and got["to"] == -(-end // HOUR) * HOUR
            want = hand_breakdown(payloads, by, got["from"], got["to"], bots)
            assert got["rows"] == want, (by, start, end, bots)
    # limit: the top rows, in the same order
    top = api(server, token, "breakdown", si=SI, by=by, limit="2",
              **{"from": str(now - 4 * DAY), "to": str(now + HOUR)})["rows"]
    assert top == hand_breakdown(payloads, by, (now - 4 * DAY) // HOUR * HOUR,
                                 -(-(now + HOUR) // HOUR) * HOUR, False)[:2]


def test_stats_count_distinct_sessions_and_visitors_per_bucket_and_range(seeded):
    server, token, payloads = seeded
    now = int(time.time() * 1000)
    start, end = now - 4 * DAY, now + MIN
    for bucket, size in (("minute", MIN), ("hour", HOUR), ("day", DAY)):
        for bots in (False, True):
            got = api(server, token, "stats", si=SI, bucket=bucket,
                      include_bots=str(bots).lower(), **{"from": str(start), "to": str(end)})
            assert got["include_bots"] is bots
            for row in got["buckets"]:
                lo, hi = max(row["start"], start // MIN * MIN), min(row["start"] + size, end)
                events, sessions, visitors = hand_uniques(payloads, lo, hi, bots)
                assert (row["events"], row["sessions"], row["visitors"]) == \
                    (events, sessions, visitors), (bucket, row)
            events, sessions, visitors = hand_uniques(payloads, start // MIN * MIN,
                                                      -(-end // MIN) * MIN, bots)
            assert (got["totals"]["events"], got["totals"]["sessions"],
                    got["totals"]["visitors"]) == (events, sessions, visitors), bucket
    # visitors now: the sessions of the last five minutes (the live events)
    now_stats = api(server, token, "stats", si=SI, bucket="minute",
                    **{"from": str(now - 5 * MIN), "to": str(now + MIN)})
    assert now_stats["totals"]["sessions"] == 2  # v1 and new; the crawler is a bot
    assert now_stats["totals"]["visitors"] == 2


def test_bots_are_stored_flagged_and_left_out_of_reports(seeded):
    server, token, payloads = seeded
    listing = server.api(f"/api/v1/events?si={SI}&limit=10000", token)
    assert listing.status == 200
    events = [json.loads(line) for line in listing.text.splitlines()]
    crawler = [e for e in events if e["event"]["uid"] == "crawler"]
    assert len(crawler) == 1  # stored, never dropped
    assert crawler[0]["captured"] | {} == {"user_agent": GOOGLEBOT, "ip": "127.0.0.0",
                                           "browser": "Googlebot", "os": "Unknown",
                                           "device": "bot", "bot": True}
    human = [e for e in events if e["event"]["uid"] == "visitor-new"][0]
    assert human["captured"]["device"] == "mobile" and "bot" not in human["captured"]
    # the session record says it too
    session = ok_json(server.api(f"/api/v1/sessions/crawl?si={SI}", token))
    assert session["captured"]["bot"] is True
    devices = {r["value"] for r in api(server, token, "breakdown", si=SI, by="device",
                                       **{"from": str(0)})["rows"]}
    assert "bot" not in devices
    devices = {r["value"] for r in api(server, token, "breakdown", si=SI, by="device",
                                       include_bots="true", **{"from": str(0)})["rows"]}
    assert "bot" in devices


def test_sites_lists_each_site_to_an_admin_and_its_own_to_a_site_token(seeded):
    server, token, payloads = seeded
    got = api(server, token, "sites")
    by_si = {row["si"]: row for row in got["sites"]}
    assert set(by_si) == {SI, OTHER_SI}
    for si, row in by_si.items():
        times = [p["event"]["unixtimestamp"] for p in payloads if p["event"]["si"] == si]
        assert row == {"si": si, "first_seen": min(times), "last_event": max(times),
                       "events": len(times)}, si
    own = server.create_token(OTHER_SI)
    assert api(server, own, "sites") == {"sites": [by_si[OTHER_SI]]}
    none_yet = server.create_token("quiet.example")
    assert api(server, none_yet, "sites") == {"sites": []}
    assert_json_error(server.api("/api/v1/sites", None), 401)


@pytest.mark.parametrize("params, reason", [
    ({"by": "colour"}, "by must be one of"),
    ({}, "by must be one of"),
    ({"by": "url", "include_bots": "maybe"}, "include_bots must be true or false"),
    ({"by": "url", "limit": "0"}, "limit must be"),
    ({"by": "url", "from": "2000", "to": "1000"}, "from must be before to"),
])
def test_breakdown_refusals_are_400_json_naming_the_parameter(shared_server, params, reason):
    token = shared_server.create_token("*")
    resp = shared_server.api("/api/v1/breakdown?" + urlencode({"si": "x.example", **params}),
                             token)
    error = assert_json_error(resp, 400)
    assert reason in error, error


def test_values_past_the_bound_count_as_other_and_rows_still_add_up(make_server):
    server = make_server("--breakdown-values", "3", "--fold-delay", "1ms")
    token = server.create_token("*")
    si = "bound.example"
    sent = {"/a": 4, "/b": 3, "/c": 2, "/d": 2, "/e": 1}  # a, b, c take the hour's 3 slots
    for page, count in sent.items():
        for i in range(count):
            ok_eid(server.track(si=si, sid=f"{page}-{i % 2}", uid=f"u{i}",
                                url=f"https://bound.example{page}"))
    rows = api(server, token, "breakdown", si=si, by="url")["rows"]
    assert rows == [{"value": "/a", "events": 4, "sessions": 2, "visitors": 4},
                    {"value": "(other)", "events": 3, "sessions": 3, "visitors": 2},
                    {"value": "/b", "events": 3, "sessions": 2, "visitors": 3},
                    {"value": "/c", "events": 2, "sessions": 2, "visitors": 2}]
    assert sum(r["events"] for r in rows) == sum(sent.values())


def test_erasure_takes_the_user_out_of_breakdowns_and_distinct_counts(make_server):
    server = make_server("--fold-delay", "1ms")
    token = server.create_token("*")
    si = "erase-counts.example"
    for uid, sid, page in (("keep", "k1", "/a"), ("keep", "k1", "/b"), ("gone", "g1", "/a"),
                           ("gone", "g2", "/c"), ("other", "k1", "/a")):
        ok_eid(server.track({"User-Agent": CHROME}, si=si, sid=sid, uid=uid,
                            url=f"https://erase.example{page}"))
    before = api(server, token, "breakdown", si=si, by="url")["rows"]
    assert before[0] == {"value": "/a", "events": 3, "sessions": 2, "visitors": 3}
    resp = server.request("DELETE", f"/api/v1/users/gone?si={si}",
                          headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, resp
    after = api(server, token, "breakdown", si=si, by="url")["rows"]
    assert after == [{"value": "/a", "events": 2, "sessions": 1, "visitors": 2},
                     {"value": "/b", "events": 1, "sessions": 1, "visitors": 1}]
    totals = api(server, token, "stats", si=si)["totals"]
    assert (totals["events"], totals["sessions"], totals["visitors"]) == (3, 1, 2)
    sites = api(server, token, "sites")["sites"]
    assert [(s["si"], s["events"]) for s in sites] == [(si, 3)]


def test_erasing_the_user_of_a_sites_last_days_leaves_no_day_counters(make_server, tmp_path):
    """B on the first day, A on the two after (those days derived as the site moved on):
    erase A and the site's last day is B's again; A must not come back from the days that
    were derived for it, not even once the site has a new day, and the views equal a refold."""
    from storecheck import views_equal_a_refold
    rng = random.Random(3)
    now = int(time.time() * 1000)
    plan = [(now - 3 * DAY, "b", "/b-page"), (now - 2 * DAY, "a", "/a-one"),
            (now - DAY - HOUR, "a", "/a-two")]
    lines = []
    for ts, uid, page in plan:
        event = {"unixtimestamp": ts, "si": SI, "eid": make_eid(ts, rng), "sid": f"{uid}-s",
                 "uid": uid, "url": f"https://shop.example{page}"}
        lines.append(json.dumps({"event": event, "captured": {"user_agent": CHROME}}))
    source = tmp_path / "days.ndjson"
    source.write_text("\n".join(lines) + "\n")
    data_dir = tmp_path / "days"
    done = subprocess.run([sys.executable, "-m", "otserver", "import", str(source),
                           "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    server = make_server("--fold-delay", "1ms", data_dir=data_dir)
    token = server.create_token("*")
    span = {"from": str(now - 4 * DAY), "to": str(now + HOUR)}
    pages = [r["value"] for r in api(server, token, "breakdown", si=SI, by="url", **span)["rows"]]
    assert sorted(pages) == ["/a-one", "/a-two", "/b-page"]
    resp = server.request("DELETE", f"/api/v1/users/a?si={SI}",
                          headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, resp
    for _ in range(2):  # right after the erasure, and once the site has a new day
        rows = api(server, token, "breakdown", si=SI, by="url", **span)["rows"]
        assert [r["value"] for r in rows if r["value"] != "/now"] == ["/b-page"], rows
        totals = api(server, token, "stats", si=SI, bucket="day", **span)["totals"]
        assert totals["visitors"] == len({r["value"] for r in rows}), totals
        ok_eid(server.track({"User-Agent": CHROME}, si=SI, sid="c-s", uid="c",
                            url="https://shop.example/now"))
    assert server.stop() == 0
    views_equal_a_refold(data_dir, tmp_path)
