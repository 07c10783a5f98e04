"""Pure units: User-Agent classification (otserver.agents) over real strings, its memo's bound,
and the engines: the Rust crawler set gives crawlerdetect's verdicts, the pure-Python fallback
gives the same Agents."""
from __future__ import annotations

import importlib.util
import json
import random
import string
import subprocess
import sys

import pytest
from crawlerdetect import CrawlerDetect

from otserver import agents
from otserver.agents import (CACHE_SIZE, DEVICE_CLASSES, MAX_PARSED_CHARS, UNKNOWN_AGENT, Agent,
                             agent_fields, classify)

CHROME_WINDOWS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/124.0.0.0 Safari/537.36")

# (user agent, expected Agent). Strings as the clients send them.
TABLE = [
    (CHROME_WINDOWS, Agent("Chrome", "Windows", "desktop", False)),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.4.1 Safari/605.1.15", Agent("Safari", "Mac OS X", "desktop", False)),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
     Agent("Firefox", "Linux", "desktop", False)),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
     Agent("Firefox", "Ubuntu", "desktop", False)),
    ("Mozilla/5.0 (X11; CrOS x86_64 14541.0.0) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/124.0.0.0 Safari/537.36", Agent("Chrome", "Chrome OS", "desktop", False)),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
     "Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1", Agent("Mobile Safari", "iOS", "mobile", False)),
    ("Mozilla/5.0 (iPod touch; CPU iPhone OS 15_7 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
     "Gecko) Version/15.6 Mobile/15E148 Safari/604.1", Agent("Mobile Safari", "iOS", "mobile", False)),
    ("Mozilla/5.0 (iPad; CPU OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/17.4.1 Mobile/15E148 Safari/604.1", Agent("Mobile Safari", "iOS", "tablet", False)),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/124.0.6367.82 Mobile Safari/537.36", Agent("Chrome Mobile", "Android", "mobile", False)),
    ("Mozilla/5.0 (Linux; Android 13; SM-X200) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/124.0.0.0 Safari/537.36", Agent("Chrome", "Android", "tablet", False)),
    ("Mozilla/5.0 (Android 14; Tablet; rv:125.0) Gecko/125.0 Firefox/125.0",
     Agent("Firefox Mobile", "Android", "tablet", False)),
    ("Mozilla/5.0 (Linux; Android 9; KFMAWI) AppleWebKit/537.36 (KHTML, like Gecko) Silk/124.3.1 "
     "like Chrome/124.0.6367.219 Safari/537.36", Agent("Amazon Silk", "Android", "tablet", False)),
    (CHROME_WINDOWS + " Edg/124.0.2478.80", Agent("Edge", "Windows", "desktop", False)),
    ("Mozilla/5.0 (Linux; Android 14; SAMSUNG SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
     Agent("Samsung Internet", "Android", "mobile", False)),
    ("Mozilla/5.0 (Windows Phone 10.0; Android 6.0.1; Microsoft; Lumia 950) AppleWebKit/537.36 "
     "(KHTML, like Gecko) Chrome/52.0.2743.116 Mobile Safari/537.36 Edge/15.14977",
     Agent("Edge Mobile", "Windows Phone", "mobile", False)),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; Xbox; Xbox One) AppleWebKit/537.36 (KHTML, like "
     "Gecko) Chrome/124.0.0.0 Safari/537.36 Edge/44.18363.8131", Agent("Edge", "Windows", "other", False)),
    ("Mozilla/5.0 (SMART-TV; Linux; Tizen 6.0) AppleWebKit/537.36 (KHTML, like Gecko) "
     "SamsungBrowser/4.0 Chrome/76.0.3809.146 TV Safari/537.36",
     Agent("Samsung Internet", "Tizen", "other", False)),
    ("Mozilla/5.0 (Linux; Android 9; AFTKA Build/PS7633) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Silk/124.1.1 like Chrome/124.0.6367.118 Safari/537.36",
     Agent("Amazon Silk", "Android", "other", False)),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
     Agent("Googlebot", "Unknown", "bot", True)),
    ("Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, like "
     "Gecko) Chrome/124.0.6367.118 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
     "+http://www.google.com/bot.html)", Agent("Googlebot", "Android", "bot", True)),
    ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
     Agent("bingbot", "Unknown", "bot", True)),
    # HTTP libraries send events on purpose: not bots (crawlerdetect lists them)
    ("curl/8.5.0", Agent("curl", "Unknown", "other", False)),
    ("python-requests/2.31.0", Agent("Python Requests", "Unknown", "other", False)),
    ("okhttp/4.12.0", Agent("okhttp", "Unknown", "other", False)),
    ("Wget/1.21.4", Agent("Wget", "Unknown", "bot", True)),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "HeadlessChrome/124.0.6367.29 Safari/537.36", Agent("HeadlessChrome", "Linux", "bot", True)),
    ("Mozilla/5.0+(compatible; UptimeRobot/2.0; http://www.uptimerobot.com/)",
     Agent("UptimeRobot", "Unknown", "bot", True)),
    ("Pingdom.com_bot_version_1.4_(http://www.pingdom.com/)", Agent("PingdomBot", "Unknown", "bot", True)),
    ("", UNKNOWN_AGENT),
    (None, UNKNOWN_AGENT),
    ("   ", UNKNOWN_AGENT),
    ("asdf qwer zxcv", Agent("Unknown", "Unknown", "other", False)),
    ("\x00\ufffd\u00e9\U0001f600 ;;; (((", Agent("Unknown", "Unknown", "other", False)),
    ("x" * 4096, Agent("Unknown", "Unknown", "other", False)),
    (CHROME_WINDOWS + " " + "z" * (4096 - len(CHROME_WINDOWS) - 1),
     Agent("Chrome", "Windows", "desktop", False)),
]


@pytest.mark.parametrize("user_agent, expected", TABLE, ids=lambda v: repr(v)[:40])
def test_classify_real_user_agents(user_agent, expected):
    agent = classify(user_agent)
    assert agent == expected
    assert agent.device in DEVICE_CLASSES
    assert (agent.device == "bot") is agent.bot


def test_unknown_agent_is_what_none_and_empty_give():
    assert UNKNOWN_AGENT == Agent("Unknown", "Unknown", "other", False)
    assert classify(None) is UNKNOWN_AGENT and classify("") is UNKNOWN_AGENT


def test_agent_fields_has_bot_only_for_bots():
    assert agent_fields(CHROME_WINDOWS) == {"browser": "Chrome", "os": "Windows", "device": "desktop"}
    assert agent_fields("Wget/1.21.4") == {"browser": "Wget", "os": "Unknown", "device": "bot",
                                           "bot": True}
    assert agent_fields("curl/8.5.0") == {"browser": "curl", "os": "Unknown", "device": "other"}
    assert agent_fields(None) == {"browser": "Unknown", "os": "Unknown", "device": "other"}


def test_agent_fields_is_a_fresh_dict_each_call():
    first = agent_fields(CHROME_WINDOWS)
    first["browser"] = "changed"
    first["extra"] = 1
    assert agent_fields(CHROME_WINDOWS) == {"browser": "Chrome", "os": "Windows", "device": "desktop"}
    json.dumps(agent_fields("curl/8.5.0"))  # plain JSON values only


def test_memo_is_bounded():
    assert classify.cache_info().maxsize == CACHE_SIZE == 4096
    for i in range(CACHE_SIZE + 200):
        classify(f"probe/{i}")
    assert classify.cache_info().currsize == CACHE_SIZE


def test_only_the_first_max_parsed_chars_are_read():
    padding = "z" * (MAX_PARSED_CHARS - len(CHROME_WINDOWS))
    head = CHROME_WINDOWS + padding
    assert classify(head + " (compatible; Googlebot/2.1)") == classify(head + " curl/8.5.0")
    assert not classify(head + " Googlebot/2.1").bot
    hits = classify.cache_info().hits
    classify(head + " another tail")
    assert classify.cache_info().hits == hits + 1  # one memo entry per prefix, however long


@pytest.mark.skipif(not importlib.util.find_spec("ua_parser_rs"), reason="ua-parser-rs not installed")
def test_the_rust_engines_are_chosen_when_installed():
    assert agents.UA_RESOLVER == "regex"
    assert agents.CRAWLER_ENGINE == "ua-parser-rs"


def _mutations(user_agents, seed=7):
    rnd = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \u00e9\u0130\u212a"
    for ua in user_agents:
        yield ua.upper()
        yield ua.lower()
        for _ in range(3):
            i = rnd.randrange(len(ua) + 1)
            j = min(len(ua), i + rnd.randrange(6))
            yield ua[:i] + "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(4))) + ua[j:]
    for _ in range(50):
        yield "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 120)))


def test_crawler_engine_agrees_with_crawlerdetect():
    reference = CrawlerDetect()
    # crawlerdetect's Python regex takes ~1 ms per browser string, up to ~100 ms per 4 KiB of junk
    samples = [ua for ua, _ in TABLE if ua and ua.strip() and len(ua) < 400]
    samples += ["Yandex/1.01.001 (compatible; Win16; I)", "YandexSearch/1.0", "Mozilla/5.0 YandexModule2",
                "Mozilla/5.0 (compatible; YandexBot/3.0)", "b0t", "Java/17.0.2", "Lighthouse"]
    disagreements = [ua for ua in [*samples, *_mutations(samples)]
                     if agents._engines()[2](ua) != reference.is_crawler(ua)]
    assert disagreements == []


_FALLBACK_PROGRAM = """
import json, sys
sys.modules["ua_parser_rs"] = None  # as if ua-parser were installed without its [regex] extra
from otserver import agents
print(json.dumps([agents.UA_RESOLVER, agents.CRAWLER_ENGINE,
                  [agents.classify(ua) for ua in json.loads(sys.stdin.read())]]))
"""


def test_without_the_accelerator_the_pure_python_engines_give_the_same_agents():
    user_agents = [ua for ua, _ in TABLE if ua is not None and len(ua) < 1000]
    done = subprocess.run([sys.executable, "-W", "error", "-c", _FALLBACK_PROGRAM],
                          input=json.dumps(user_agents), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resolver, engine, results = json.loads(done.stdout)
    assert (resolver, engine) == ("basic", "crawlerdetect")
    assert [Agent(*r) for r in results] == [classify(ua) for ua in user_agents]
