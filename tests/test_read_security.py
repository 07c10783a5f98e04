"""Read-side security (SPEC 5, README "Read API"): where tokens are accepted, what they reach,
that they never leak (log, answers, the store), that input is never reflected into answer
headers, that the read API grants no CORS, and that a near-miss token is not measurably faster
or slower to refuse than a random one.

Decisions taken from the README and the RFCs it follows, tested as such:
- A token is accepted only as `Authorization: Bearer TOKEN`. The scheme is matched without
  regard to case and may be followed by more than one space (RFC 7235 2.1: `auth-scheme
  1*SP token68`, schemes are case-insensitive); anything else (no scheme, another scheme, a
  tab, text after the token, the token in the URL or another header) is `401`.
- Missing or wrong token: `401` with `WWW-Authenticate`; another site's token: `403`; a site's
  own token asking for another site's ids under its own site: `404`. Errors are JSON.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
from urllib.parse import quote, urlencode

import pytest

from conftest import RunningServer, read_response, read_until_close

SITE_A = "sec-a.example"
SITE_B = "sec-b.example"
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MARK = "evilmark"  # what a reflected input would carry into an answer header
ORIGIN = "https://attacker.example"

# Every answer header the read API may send (lower-case); anything else is suspect.
READ_HEADERS = {"date", "x-content-type-options", "content-type", "content-length", "connection",
                "www-authenticate", "allow", "retry-after", "x-next-after"}


# --------------------------------------------------------------------------- raw client

class Answer:
    def __init__(self, raw: bytes):
        self.raw = raw
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete answer head: {raw[:300]!r}"
        lines = head.split(b"\r\n")
        self.status_line = lines[0]
        match = re.fullmatch(rb"HTTP/1\.1 (\d{3}) [A-Za-z ]+", lines[0])
        assert match, f"bad status line {lines[0]!r}"
        self.status = int(match.group(1))
        self.header_lines = lines[1:]
        self.headers: dict[str, str] = {}
        for line in self.header_lines:
            name, colon, value = line.partition(b":")
            assert colon and re.fullmatch(rb"[A-Za-z0-9-]+", name), f"bad header line {line!r}"
            self.headers[name.decode().lower()] = value.strip().decode("latin-1")
        self.head = head

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Answer {self.status} {self.body[:200]!r}>"


ANSWERS: list[bytes] = []  # every answer this module received, for the leak scan at the end


def send(server: RunningServer, method: str, target: str, headers=(), body: bytes = b"",
         raw_head: bytes = b"") -> Answer:
    """One request on a fresh connection (Connection: close); the whole answer, raw."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n").encode("latin-1") + raw_head + b"\r\n" + body
    with server.connect(timeout=10) as sock:
        sock.sendall(data)
        raw = read_until_close(sock, 10)
    ANSWERS.append(raw)
    return Answer(raw)


def bearer(token: str) -> tuple:
    return (("Authorization", f"Bearer {token}"),)


def api_path(kind: str, ident: str | None = None, **params) -> str:
    path = f"/api/v1/{kind}" + (f"/{quote(ident, safe='')}" if ident is not None else "")
    return path + ("?" + urlencode(params) if params else "")


def assert_json_error(answer: Answer, status: int) -> str:
    assert answer.status == status, answer
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    payload = answer.json()
    assert set(payload) == {"error"} and isinstance(payload["error"], str) and payload["error"]
    return payload["error"]


def assert_no_cors(answer: Answer) -> None:
    cors = [line for line in answer.header_lines if line.lower().startswith(b"access-control-")]
    assert not cors, f"read API answer {answer.status} grants CORS: {cors}"


def assert_clean_headers(answer: Answer) -> None:
    """No header carries the marker, no unexpected header, one answer only."""
    for line in answer.header_lines:
        assert MARK.encode() not in line.lower(), f"reflected into a header: {line!r}"
        assert b"attacker" not in line.lower(), f"origin reflected: {line!r}"
    assert set(answer.headers) <= READ_HEADERS, set(answer.headers) - READ_HEADERS
    assert answer.headers.get("x-content-type-options") == "nosniff"
    # exactly one answer on the connection: nothing injected after the declared body
    assert len(answer.body) == int(answer.headers["content-length"]), answer.raw[:400]


def test_the_header_checks_catch_reflection_cors_and_extra_answers():
    """The checks below are only as good as these helpers: they must fail on a bad answer."""
    good = (b"HTTP/1.1 404 Not Found\r\nDate: x\r\nX-Content-Type-Options: nosniff\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    assert_clean_headers(Answer(good))
    assert_no_cors(Answer(good))
    bad = [good.replace(b"Date: x", b"X-" + MARK.encode() + b": 1"),
           good.replace(b"Date: x", b"Set-Cookie: a=1"),
           good + b"HTTP/1.1 200 OK\r\n\r\n"]
    for raw in bad:
        with pytest.raises(AssertionError):
            assert_clean_headers(Answer(raw))
    with pytest.raises(AssertionError):
        assert_no_cors(Answer(good.replace(b"Date: x", b"Access-Control-Allow-Origin: *")))


# --------------------------------------------------------------------------- the world

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A server with --access-log (request paths in the log), two sites with events, tokens for
    each site, an admin token, and a token revoked before use."""
    server = RunningServer(tmp_path_factory.mktemp("readsec") / "otdata",
                           extra_args=["--access-log"]).start()
    try:
        w = {"server": server,
             "a": server.create_token(SITE_A),
             "b": server.create_token(SITE_B),
             "admin": server.create_token("*"),
             "revoked": server.create_token(SITE_A)}
        revoke = subprocess.run(
            [sys.executable, "-m", "otserver", "token", "revoke",
             hashlib.sha256(w["revoked"].encode()).hexdigest()[:12],
             "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=30)
        assert revoke.returncode == 0, revoke.stderr
        for site, sid, uid, secret in ((SITE_A, "sa", "ua", "a-secret"),
                                       (SITE_B, "sb", "ub", "b-secret")):
            resp = server.track(si=site, sid=sid, uid=uid, note=secret)
            assert resp.status == 200, resp
            w[f"eid_{site}"] = resp.text
        # near-misses: the real token with its last character changed, case-flipped, cut short
        token = w["a"]
        last = "A" if token[-1] != "A" else "B"
        w["near"] = [token[:-1] + last, token.upper() if token.upper() != token else token.lower(),
                     token[:-1], token + "x", token[3:], " " + token[1:]]
        w["random"] = "ot_" + secrets.token_urlsafe(32)
        yield w
    finally:
        server.kill()


def secrets_of(world) -> list[str]:
    """Every token string whose appearance anywhere would be a leak (the secret part of each)."""
    return [world[k] for k in ("a", "b", "admin", "revoked")]


# --------------------------------------------------------------------------- at rest

def test_tokens_are_stored_only_as_their_sha256(world):
    server = world["server"]
    raw = b"".join((server.data_dir / env / "data.mdb").read_bytes() for env in ("log", "views"))
    for token in secrets_of(world):
        assert token.encode() not in raw
        assert token[3:].encode() not in raw  # not even without its prefix
    assert hashlib.sha256(world["a"].encode()).digest() in raw  # what is stored instead
    listing = subprocess.run(
        [sys.executable, "-m", "otserver", "token", "list", "--json",
         "--data-dir", str(server.data_dir)], capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    for token in secrets_of(world):
        assert token not in listing.stdout and token[3:] not in listing.stdout
        assert token[3:15] not in listing.stdout


# --------------------------------------------------------------------------- where tokens come from

def test_the_right_token_in_the_header_reads(world):
    server = world["server"]
    answer = send(server, "GET", api_path("events", world[f"eid_{SITE_A}"], si=SITE_A),
                  bearer(world["a"]))
    assert answer.status == 200, answer
    assert answer.json()["event"]["note"] == "a-secret"
    answer = send(server, "GET", api_path("events", world[f"eid_{SITE_B}"], si=SITE_B),
                  bearer(world["admin"]))
    assert answer.status == 200 and answer.json()["event"]["note"] == "b-secret", answer


@pytest.mark.parametrize("param", ["token", "access_token", "bearer", "auth", "api_key",
                                   "authorization"])
@pytest.mark.parametrize("key", ["a", "admin"])
def test_a_token_in_the_url_is_never_accepted(world, param, key):
    server = world["server"]
    value = world[key] if param != "authorization" else f"Bearer {world[key]}"
    for target in (api_path("events", world[f"eid_{SITE_A}"], si=SITE_A, **{param: value}),
                   api_path("events", si=SITE_A, **{param: value}),
                   api_path("users", "ua", **{param: value, "si": SITE_A})):
        answer = send(server, "GET", target)
        assert_json_error(answer, 401)
        assert answer.headers.get("www-authenticate", "").startswith("Bearer")
        assert b"a-secret" not in answer.body
        # A wrong header token is not rescued by a right one in the URL.
        answer = send(server, "GET", target, bearer(world["random"]))
        assert_json_error(answer, 401)


@pytest.mark.parametrize("header", ["X-Auth-Token: {t}", "X-Access-Token: {t}",
                                    "X-Authorization: Bearer {t}", "Cookie: token={t}",
                                    "Proxy-Authorization: Bearer {t}", "Token: {t}",
                                    "Bearer: {t}", "X-Api-Key: {t}"])
def test_a_token_in_another_header_is_never_accepted(world, header):
    server = world["server"]
    name, _, value = header.format(t=world["a"]).partition(": ")
    answer = send(server, "GET", api_path("events", world[f"eid_{SITE_A}"], si=SITE_A),
                  ((name, value),))
    assert_json_error(answer, 401)
    assert b"a-secret" not in answer.body


ACCEPTED_FORMS = ["Bearer {t}", "bearer {t}", "BEARER {t}", "BeArEr {t}", "Bearer  {t}",
                  "Bearer {t}   "]
REFUSED_FORMS = ["", "Bearer", "Bearer ", "{t}", "Basic {t}", "Basic {b64}", "Token {t}",
                 "Bearer{t}", "Bearer\t{t}", "Bearer {t} {t}", "Bearer {t} x", "Bearer {t},",
                 "Bearer \"{t}\"", "Bearer {t}=", "Bearer={t}", "Bearer:{t}", "Digest {t}",
                 "Bearer, Bearer {t}", "Bearer {T}", "Bearer {t3}", "Bearer {tx}"]


@pytest.mark.parametrize("form", ACCEPTED_FORMS)
def test_authorization_forms_that_are_accepted(world, form):
    server = world["server"]
    answer = send(server, "GET", api_path("events", world[f"eid_{SITE_A}"], si=SITE_A),
                  (("Authorization", form.format(t=world["a"])),))
    assert answer.status == 200, answer


@pytest.mark.parametrize("form", REFUSED_FORMS)
def test_authorization_forms_that_are_refused_401(world, form):
    server = world["server"]
    token = world["a"]
    value = form.format(t=token, T=token.swapcase(), t3=token[3:], tx=token + "x",
                        b64=base64.b64encode(f"user:{token}".encode()).decode())
    answer = send(server, "GET", api_path("events", world[f"eid_{SITE_A}"], si=SITE_A),
                  (("Authorization", value),) if form else ())
    assert_json_error(answer, 401)
    assert answer.headers.get("www-authenticate", "").startswith("Bearer")
    assert b"a-secret" not in answer.body
    assert_no_cors(answer)


def test_every_near_miss_and_revoked_token_is_401(world):
    server = world["server"]
    target = api_path("events", world[f"eid_{SITE_A}"], si=SITE_A)
    bodies = set()
    for token in [*world["near"], world["random"], world["revoked"], "ot_", "ot_" + "A" * 43]:
        answer = send(server, "GET", target, bearer(token))
        assert_json_error(answer, 401)
        bodies.add(answer.body)
    # one refusal for them all: the answer says nothing about how close a guess was
    assert len(bodies) == 1, bodies


# --------------------------------------------------------------------------- scope

def test_other_site_token_is_403_everywhere(world):
    server = world["server"]
    eid_b = world[f"eid_{SITE_B}"]
    for key, site in (("a", SITE_B), ("b", SITE_A)):
        for target in (api_path("events", eid_b, si=site), api_path("sessions", "sb", si=site),
                       api_path("users", "ub", si=site), api_path("events", si=site),
                       api_path("stats", si=site), api_path("live", si=site)):
            answer = send(server, "GET", target, bearer(world[key]))
            assert_json_error(answer, 403)
            assert b"secret" not in answer.body
            assert_no_cors(answer)


@pytest.mark.parametrize("si", [SITE_B.upper(), SITE_B + " ", " " + SITE_B, SITE_B + "\x00",
                                SITE_B + ".", "*", "", "sec-b.example%00"])
def test_a_site_token_is_not_stretched_to_lookalike_sites(world, si):
    server = world["server"]
    answer = send(server, "GET", api_path("events", si=si), bearer(world["b"]))
    if si == "":
        assert_json_error(answer, 400)  # no site named
    else:
        assert_json_error(answer, 403)


def test_own_site_token_cannot_reach_another_sites_ids(world):
    """Ids are scoped by site: site A's token asking under si=A for B's eid/sid/uid finds
    nothing, and A's listing holds no B event."""
    server = world["server"]
    token = world["a"]
    for kind, ident in (("events", world[f"eid_{SITE_B}"]), ("sessions", "sb"), ("users", "ub")):
        answer = send(server, "GET", api_path(kind, ident, si=SITE_A), bearer(token))
        assert_json_error(answer, 404)
        assert b"b-secret" not in answer.body
    listing = send(server, "GET", api_path("events", si=SITE_A, **{"from": "0"}), bearer(token))
    assert listing.status == 200 and b"b-secret" not in listing.body


@pytest.mark.parametrize("query", [f"si={SITE_A}&si={SITE_B}", f"si={SITE_B}&si={SITE_A}",
                                   f"si={SITE_B}&SI={SITE_A}", f"si={SITE_B}%26si%3D{SITE_A}",
                                   f"si={SITE_A};si={SITE_B}"])
def test_repeated_or_smuggled_si_never_reads_another_site(world, query):
    server = world["server"]
    for kind, ident in (("events", world[f"eid_{SITE_B}"]), ("sessions", "sb"), ("users", "ub")):
        answer = send(server, "GET", f"/api/v1/{kind}/{ident}?{query}", bearer(world["a"]))
        assert answer.status in (400, 403, 404), answer
        assert b"b-secret" not in answer.body
    answer = send(server, "GET", f"/api/v1/events?{query}&from=0", bearer(world["a"]))
    assert b"b-secret" not in answer.body


def test_erasure_needs_the_right_site(world):
    server = world["server"]
    target_b = api_path("users", "ub", si=SITE_B)
    assert_json_error(send(server, "DELETE", target_b), 401)
    assert_json_error(send(server, "DELETE", target_b, bearer(world["random"])), 401)
    assert_json_error(send(server, "DELETE", target_b, bearer(world["a"])), 403)
    # A's token under A's site: B's user is not there to erase
    assert_json_error(send(server, "DELETE", api_path("users", "ub", si=SITE_A),
                           bearer(world["a"])), 404)
    still = send(server, "GET", target_b, bearer(world["admin"]))
    assert still.status == 200 and still.json()["user"]["note"] == "b-secret", still
    assert world[f"eid_{SITE_B}"] in server.event_ids()


# --------------------------------------------------------------------------- reflection

REFLECTION_CASES = [
    # (method, target, token key or None, extra headers, expected status)
    ("GET", f"/api/v1/events/%0D%0AX-{MARK}:%201?si={SITE_A}", "a", (), 404),
    ("GET", f"/api/v1/sessions/%0d%0aSet-Cookie:%20{MARK}=1?si={SITE_A}", "a", (), 404),
    ("GET", f"/api/v1/users/x%0AX-{MARK}:1%0D%0A%0D%0AHTTP/1.1%20200%20OK?si={SITE_A}", "a",
     (), 404),
    ("GET", f"/api/v1/events/{MARK}%E2%80%A8%C2%85?si={SITE_A}", "a", (), 404),
    ("GET", f"/api/v1/events?si={SITE_A}&after=%0D%0AX-{MARK}:1", "a", (), 400),
    ("GET", f"/api/v1/events?si={SITE_A}&limit=%0D%0AX-{MARK}", "a", (), 400),
    ("GET", f"/api/v1/events?si={SITE_A}&from=%0D%0AX-{MARK}", "a", (), 400),
    ("GET", f"/api/v1/users/ua?si={SITE_A}&after=%0D%0AX-{MARK}", "a", (), 400),
    ("GET", f"/api/v1/stats?si={SITE_A}&bucket=%0D%0AX-{MARK}", "a", (), 400),
    ("GET", f"/api/v1/events?si={SITE_A}%0D%0AX-{MARK}:%201", "a", (), 403),
    ("GET", f"/api/v1/events?si=%0D%0AX-{MARK}:%201&from=0", "admin", (), 200),
    ("GET", f"/api/v1/stats?si=%0D%0AX-{MARK}:%201", "admin", (), 200),
    ("GET", f"/api/v1/{MARK}%0D%0AX-{MARK}:1?si={SITE_A}", "a", (), 404),
    ("GET", f"/api/v1/events/x?si={SITE_A}", None, (("Authorization", f"Bearer X-{MARK}: 1"),),
     401),
    ("GET", f"/api/v1/events/x?si={SITE_A}", None, (("Authorization", f"{MARK} {MARK}"),), 401),
    ("GET", f"/api/v1/events/x?si={SITE_A}", "a",
     (("Origin", ORIGIN), ("Referer", f"{ORIGIN}/{MARK}"), ("User-Agent", MARK),
      ("X-Forwarded-For", MARK), ("Last-Event-ID", MARK), ("Cookie", f"{MARK}=1")), 404),
    ("PUT", f"/api/v1/events/%0D%0AX-{MARK}?si={SITE_A}", "a", (), 405),
    ("POST", f"/api/v1/users/%0D%0AX-{MARK}?si={SITE_A}", "a", (), 405),
    ("DELETE", f"/api/v1/users/%0D%0AX-{MARK}:1?si={SITE_A}", "a", (), 404),
]


@pytest.mark.parametrize("method, target, key, headers, status", REFLECTION_CASES)
def test_no_input_is_reflected_into_answer_headers(world, method, target, key, headers, status):
    server = world["server"]
    auth = bearer(world[key]) if key else ()
    answer = send(server, method, target, (*auth, *headers, ("Origin", ORIGIN)))
    assert answer.status == status, answer
    assert_clean_headers(answer)
    assert_no_cors(answer)
    assert b"\r" not in answer.body and b"set-cookie" not in answer.head.lower()
    if status != 200:
        assert_json_error(answer, status)
    # what the body quotes back is JSON-escaped: no raw line break from the input survives
    if answer.headers["content-type"].startswith("application/json"):
        assert b"\n" not in answer.body
        answer.json()


def test_live_stream_head_reflects_nothing_and_grants_no_cors(world):
    server = world["server"]

    def open_stream(last_event_id: str) -> bytes:
        request = (f"GET /api/v1/live?si={SITE_A} HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {world['a']}\r\nOrigin: {ORIGIN}\r\n"
                   f"Last-Event-ID: {last_event_id}\r\n\r\n").encode()
        with server.connect(timeout=5) as sock:
            sock.sendall(request)
            data = b""
            deadline = time.monotonic() + 5
            while b": live" not in data and b"}" not in data and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        return data

    data = open_stream("1")  # a log position: the stream starts, replaying what follows it
    head = data.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200 "), data
    assert b"text/event-stream" in head
    assert b"attacker" not in head.lower()
    assert b"access-control-" not in head.lower()
    # Anything else is refused, and quoted nowhere.
    data = open_stream(MARK)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data
    assert MARK.encode() not in data.lower() and b"attacker" not in data.lower()
    assert b"access-control-" not in head.lower()


# --------------------------------------------------------------------------- CORS

CORS_CASES = [
    # (method, target template, token key or None, extra headers, status)
    ("GET", "/api/v1/events/{eid_a}?si=" + SITE_A, "a", (), 200),
    ("HEAD", "/api/v1/events/{eid_a}?si=" + SITE_A, "a", (), 200),
    ("GET", "/api/v1/sessions/sa?si=" + SITE_A, "a", (), 200),
    ("GET", "/api/v1/users/ua?si=" + SITE_A, "a", (), 200),
    ("GET", "/api/v1/events?from=0&si=" + SITE_A, "a", (), 200),
    ("GET", "/api/v1/stats?si=" + SITE_A, "a", (), 200),
    ("GET", "/api/v1/events?limit=0&si=" + SITE_A, "a", (), 400),
    ("GET", "/api/v1/events/{eid_a}", "a", (), 400),
    ("GET", "/api/v1/events/{eid_a}?si=" + SITE_A, None, (), 401),
    ("GET", "/api/v1/events/{eid_a}?si=" + SITE_A, "random", (), 401),
    ("GET", "/api/v1/events/{eid_a}?si=" + SITE_B, "a", (), 403),
    ("GET", "/api/v1/events/01900000-0000-7000-8000-000000000000?si=" + SITE_A, "a", (), 404),
    ("GET", "/api/v1/nothing?si=" + SITE_A, "a", (), 404),
    ("GET", "/api/v2/events?si=" + SITE_A, "a", (), 404),
    ("DELETE", "/api/v1/users/nobody?si=" + SITE_A, "a", (), 404),
    ("POST", "/api/v1/events/{eid_a}?si=" + SITE_A, "a", (), 405),
    ("DELETE", "/api/v1/events/{eid_a}?si=" + SITE_A, "a", (), 405),
    ("PATCH", "/api/v1/users/ua?si=" + SITE_A, "a", (), 405),
    ("OPTIONS", "/api/v1/events/{eid_a}?si=" + SITE_A, None,
     (("Access-Control-Request-Method", "GET"),
      ("Access-Control-Request-Headers", "authorization")), 405),
    ("OPTIONS", "/api/v1/events?si=" + SITE_A, None,
     (("Access-Control-Request-Method", "GET"),), 405),
    ("OPTIONS", "/api/v1/users/ua?si=" + SITE_A, "a",
     (("Access-Control-Request-Method", "DELETE"),), 405),
]


@pytest.mark.parametrize("method, template, key, headers, status", CORS_CASES)
def test_read_api_grants_no_cors(world, method, template, key, headers, status):
    server = world["server"]
    target = template.format(eid_a=world[f"eid_{SITE_A}"])
    auth = bearer(world[key] if key != "random" else world["random"]) if key else ()
    answer = send(server, method, target, (*auth, ("Origin", ORIGIN), *headers))
    assert answer.status == status, answer
    assert_no_cors(answer)
    assert "access-control-allow-origin" not in answer.headers
    if method == "OPTIONS":
        assert "allow" in answer.headers and "OPTIONS" not in answer.headers["allow"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/v1/events?si=x HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /api/v1/events?si=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", 400),
    (b"GET /api/v1/events?si=x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
], ids=["505", "upgrade", "chunked-1.0"])
def test_protocol_refusals_on_read_paths_grant_no_cors(world, request_bytes, status):
    answer = Answer(world["server"].raw(request_bytes))
    assert answer.status == status, answer
    assert_no_cors(answer)


EARLY_REFUSALS = {
    "414": (b"GET /api/v1/events?si=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "431": (b"GET /api/v1/events?si=a HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: a\r\n" % i for i in range(101)) + b"\r\n", 431),
    "cl-te": (b"GET /api/v1/events?si=x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-gzip": (b"GET /api/v1/events?si=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n"
                b"\r\n", 400),
    "bad-header": (b"GET /api/v1/events?si=x HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n", 400),
}


@pytest.mark.parametrize("kind", sorted(EARLY_REFUSALS))
def test_early_protocol_refusals_on_read_paths_grant_no_cors(world, kind):
    data, status = EARLY_REFUSALS[kind]
    answer = Answer(world["server"].raw(data))
    assert answer.status == status, answer
    assert_no_cors(answer)


# --------------------------------------------------------------------------- timing

def _timed_401s(server: RunningServer, target: str, tokens: list[str], rounds: int) -> list:
    """Alternate the tokens over one keep-alive connection; -> seconds per request, by token."""
    requests = [(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n"
                 ).encode() for t in tokens]
    times: list[list[float]] = [[] for _ in tokens]
    with server.connect(timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(rounds + 30):
            order = range(len(tokens)) if i % 2 == 0 else reversed(range(len(tokens)))
            for k in order:
                started = time.perf_counter()
                sock.sendall(requests[k])
                answer = read_response(sock)
                took = time.perf_counter() - started
                assert answer.status == 401, answer
                if i >= 30:  # the first rounds warm up
                    times[k].append(took)
    return times


def test_near_miss_token_takes_no_measurably_different_time_than_a_random_one(world):
    """A sanity check against a comparison that stops at the first differing byte: 300 of
    each, interleaved, medians compared with a generous bound (25% or 0.3 ms). Up to three
    measurements, to ride out a noisy neighbour; a real difference fails all three."""
    server = world["server"]
    target = api_path("events", world[f"eid_{SITE_A}"], si=SITE_A)
    near = world["near"][0]
    assert near != world["a"] and len(near) == len(world["a"])
    results = []
    for _ in range(3):
        fresh_random = "ot_" + secrets.token_urlsafe(32)
        near_times, random_times = _timed_401s(server, target, [near, fresh_random], 300)
        m_near, m_random = statistics.median(near_times), statistics.median(random_times)
        bound = max(0.25 * min(m_near, m_random), 0.0003)
        results.append((m_near, m_random, bound))
        if abs(m_near - m_random) < bound:
            return
    pytest.fail("near-miss vs random token medians (s): " + "; ".join(
        f"{a:.6f} vs {b:.6f} (bound {c:.6f})" for a, b, c in results))


# --------------------------------------------------------------------------- leaks (last)

def test_tokens_never_appear_in_the_log_or_any_answer(world):
    """A round of every token kind (in the header, the query and a malformed header) of its
    own, then: no token appears in the server's log or in any answer this module received
    (its own round's, and those of every test that ran before it in this process)."""
    server = world["server"]
    target = api_path("events", world[f"eid_{SITE_A}"], si=SITE_A)
    tokens = [*secrets_of(world), *world["near"], world["random"]]
    before = len(ANSWERS)
    for token in tokens:
        send(server, "GET", target, bearer(token))
        send(server, "GET", target + "&" + urlencode({"token": token}))
        send(server, "GET", api_path("events", si=SITE_B), bearer(token))
        send(server, "GET", api_path("users", "ua", si=SITE_A), bearer(token))
        # a header httptools refuses (a control byte after the token): 400, token not quoted
        answer = send(server, "GET", target, raw_head=f"Authorization: Bearer {token}".encode()
                      + b"\x01\r\n")
        assert answer.status in (400, 401), answer
    # an ingest request carrying a token: the header is not captured with the event
    resp = server.track(headers={"Authorization": f"Bearer {world['a']}"}, si=SITE_A, k="t")
    assert resp.status == 200, resp
    answer = send(server, "GET", api_path("events", resp.text, si=SITE_A), bearer(world["admin"]))
    assert answer.status == 200 and answer.json()["event"]["k"] == "t", answer
    log = server.log()
    assert "access " in log  # the access log is on: request lines are logged
    leaked = []
    for token in [*secrets_of(world), *world["near"], world["random"]]:
        core = token.strip()[4:-1]  # a long inner part: catches partial echoes too
        if core in log:
            leaked.append(("log", token))
        for raw in ANSWERS:
            if core.encode() in raw:
                leaked.append(("answer", token, raw[:200]))
                break
    assert not leaked, leaked
    # the scan itself sees what is there: the answers hold the events read, the log the paths
    assert len(ANSWERS) - before == 5 * len(tokens) + 1
    assert any(world[f"eid_{SITE_A}"].encode() in raw for raw in ANSWERS)
    assert "/api/v1/events" in log
