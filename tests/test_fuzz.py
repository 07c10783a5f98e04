"""Property-based tests (hypothesis): the property parser, the HTTP layer under hostile bytes,
and the round trip of valid events through ingest and the read API.

1. `parse_properties` on arbitrary bytes raises nothing but BadRequest, agrees with a small
   reference decoder written from the README's rules, and returns exactly the dict a client
   url-encoded (last wins on duplicates).
2. Random and mutated requests over raw sockets against one real server: the process survives,
   every answer is a well-formed HTTP/1.1 answer, no answer is a 500, and the store grows by
   exactly the eids answered with 200 (a refused request stores nothing).
3. Random valid property sets sent with GET (POST when they do not fit a request line) come back
   through `GET /api/v1/events/{eid}` with exactly those properties and the ids resolved by the
   seed's table.
4. Random read-API paths and parameters (admin token) are answered 200/400/404 in JSON, never
   500, never with CORS.

Each hostile example sends its bytes on a fresh connection, then a sentinel (`/healthz` and a
valid event) on another: commits are FIFO, so once the sentinel is answered everything the
hostile bytes submitted is committed and answered, and no example waits for a timeout.
The bugs these tests found are fixed; their dedicated tests below keep them fixed.
"""
from __future__ import annotations

import dataclasses
import json
import re
import select
import socket
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from conftest import RunningServer
from otserver.config import Config
from otserver.errors import BadRequest
from otserver.idempotency import KEY_PROPERTY
from otserver.model import parse_properties

CONFIG = Config()
SITE = "fuzz.test"
UUID7 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
UUID7_TEXT = re.compile(UUID7.pattern.decode())

PURE = settings(max_examples=300, deadline=None, database=None)
LIVE = settings(max_examples=250, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# =========================================================================== 1. pure parser

_HEX = b"0123456789abcdefABCDEF"


def _strict_unquote(raw: bytes) -> bytes:
    """'+' is a space; every '%' must start two hex digits."""
    raw = raw.replace(b"+", b" ")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25:  # '%'
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise ValueError("bad percent-encoding")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def reference_parse(raw: bytes, config) -> dict | None:
    """The README's rules, written plainly. None: refused."""
    props: dict = {}
    for part in raw.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        try:
            name = _strict_unquote(name)
            value = _strict_unquote(value)
        except ValueError:
            return None
        if not 1 <= len(name) <= config.max_name_chars:
            return None
        if any(not 0x21 <= b <= 0x7E for b in name):
            return None
        if len(value) > config.max_value_bytes:
            return None
        try:
            props[name.decode("ascii")] = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if len(props) > config.max_properties:
        return None
    return props


# Pieces that make the parser's branches likely: escapes good and bad, separators, UTF-8 good
# and bad, control bytes, the reserved names.
PIECES = [b"%", b"+", b"=", b"&", b"&&", b"a", b"Z", b"~", b"0", b"%41", b"%4", b"%g1", b"%zz",
          b"%25", b"%2B", b"%3D", b"%26", b"%20", b"%C3%A9", b"%c3", b"%FF", b"%80", b"%E2%82%AC",
          b"%F0%9F%98%80", b"%ED%A0%80", b"%00", b"\xff", b"\xc3\xa9", b"\x00", b"\x7f", b" ",
          b"\t", b"si", b"eid", b"utm_x", b"\r\n"]
ARBITRARY_BYTES = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join),
    st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=4)), max_size=40).map(b"".join),
)
SMALL_LIMITS = dataclasses.replace(CONFIG, max_name_chars=4, max_value_bytes=6)


@PURE
@given(raw=ARBITRARY_BYTES)
def test_parse_properties_on_arbitrary_bytes_raises_only_bad_request_and_matches_reference(raw):
    for config in (CONFIG, SMALL_LIMITS):
        expected = reference_parse(raw, config)
        try:
            got = parse_properties(raw, config)
        except BadRequest as exc:
            assert exc.status == 400 and exc.reason
            assert expected is None, f"refused ({exc.reason}) but the rules accept {raw!r}"
            continue
        # Any other exception propagates and fails the test.
        assert expected is not None, f"accepted {got!r} but the rules refuse {raw!r}"
        assert got == expected
        for name, value in got.items():
            assert 1 <= len(name) <= config.max_name_chars
            assert all("!" <= c <= "~" for c in name)
            assert isinstance(value, str)
            assert len(value.encode()) <= config.max_value_bytes


NAME_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
NAMES = st.text(NAME_CHARS, min_size=1, max_size=128)
VALUES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
# Only what must be escaped for a property set: the separators, '%', '+' and what is not
# printable ASCII. Names without any of them take the parser's no-decoding path.
_MINIMAL_SAFE = "".join(c for c in map(chr, range(0x21, 0x7F)) if c not in "%&=+")


def encode_pair(name: str, value: str, how: str) -> str:
    if how == "quote":
        return quote(name, safe="") + "=" + quote(value, safe="")
    if how == "quote_plus":
        return quote_plus(name, safe="") + "=" + quote_plus(value, safe="")
    return quote(name, safe=_MINIMAL_SAFE) + "=" + quote(value, safe=_MINIMAL_SAFE)


ENCODINGS = st.sampled_from(["quote", "quote_plus", "minimal"])


@st.composite
def property_pairs(draw, max_pairs=20, exclude=()):
    """(name, value) pairs, names sometimes repeated (to exercise last-wins)."""
    pool = draw(st.lists(NAMES.filter(lambda n: n not in exclude), min_size=1, max_size=max_pairs))
    count = draw(st.integers(0, max_pairs))
    return [(draw(st.sampled_from(pool)), draw(VALUES)) for _ in range(count)]


@PURE
@given(pairs=property_pairs(), how=ENCODINGS, sep=st.sampled_from(["&", "&&"]),
       trailing=st.sampled_from(["", "&"]))
def test_parse_properties_returns_exactly_the_encoded_dict(pairs, how, sep, trailing):
    raw = (sep.join(encode_pair(n, v, how) for n, v in pairs) + trailing).encode("ascii")
    expected = {}
    for name, value in pairs:
        expected[name] = value  # the last one wins
    assert parse_properties(raw, CONFIG) == expected


@PURE
@given(pairs=property_pairs(max_pairs=8), split=st.integers(0, 8), how=ENCODINGS)
def test_parse_properties_into_an_existing_dict_merges_last_wins(pairs, split, how):
    """POST / parses the query, then the body into the same dict: the body wins on a clash."""
    first, second = pairs[:split], pairs[split:]
    into = parse_properties("&".join(encode_pair(n, v, how) for n, v in first).encode(), CONFIG)
    got = parse_properties("&".join(encode_pair(n, v, how) for n, v in second).encode(), CONFIG,
                           into)
    assert got is into
    assert got == dict(pairs)


def test_parse_properties_reference_sanity():
    """The oracle itself refuses and accepts what the README says (so the fuzz can fail)."""
    assert reference_parse(b"a=%zz", CONFIG) is None
    assert reference_parse(b"a%20b=1", CONFIG) is None
    assert reference_parse(b"a=%FF", CONFIG) is None
    assert reference_parse(b"a=1&a=2&&b=%C3%A9+x", CONFIG) == {"a": "2", "b": "\u00e9 x"}
    with pytest.raises(BadRequest):
        parse_properties(b"a=%zz", CONFIG)
    with pytest.raises(BadRequest):
        parse_properties(b"=1", CONFIG)


def test_repeated_names_count_once_against_max_properties():
    config = dataclasses.replace(CONFIG, max_properties=3)
    assert parse_properties(b"a=1&a=2&a=3&b=4", config) == {"a": "3", "b": "4"}


def test_distinct_names_over_max_properties_are_refused():
    config = dataclasses.replace(CONFIG, max_properties=3)
    with pytest.raises(BadRequest):
        parse_properties(b"a=1&b=2&c=3&d=4", config)
    into = parse_properties(b"a=1&b=2", config)
    with pytest.raises(BadRequest):
        parse_properties(b"c=3&d=4", config, into)


# =========================================================================== 2. hostile HTTP

@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = RunningServer(tmp_path_factory.mktemp("fuzz") / "otdata").start()
    yield server
    server.kill()


STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) ([A-Za-z][A-Za-z ]*)\r\n")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+): ([\x20-\x7e]*)")
KNOWN_STATUSES = {200, 204, 400, 401, 403, 404, 405, 413, 414, 415, 431, 503, 505}


def parse_answers(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split what a connection received into answers, asserting each is well-formed HTTP/1.1
    with exact Content-Length framing and nothing left over."""
    answers = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end != -1, f"truncated answer head: {data[pos:pos + 300]!r}"
        head = data[pos:end + 2]
        match = STATUS_LINE.match(head)
        assert match, f"malformed status line: {head[:100]!r}"
        status = int(match.group(1))
        headers: dict[str, str] = {}
        for line in head[match.end():].split(b"\r\n")[:-1]:
            hm = HEADER_LINE.fullmatch(line)
            assert hm, f"malformed header line {line!r} in {head!r}"
            name = hm.group(1).decode().lower()
            assert name not in headers, f"header {name} twice in {head!r}"
            headers[name] = hm.group(2).decode()
        if status == 204:
            length = int(headers.get("content-length", "0"))
        else:
            assert "content-length" in headers, f"no Content-Length: {head!r}"
            length = int(headers["content-length"])
        body = data[end + 4:end + 4 + length]
        assert len(body) == length, f"body shorter than Content-Length: {data[pos:]!r}"
        answers.append((status, headers, body))
        pos = end + 4 + length
    return answers


def eids_of(answers) -> list[str]:
    """The eids that 200 answers acknowledged (body lines, or the pixel's X-Eid)."""
    eids = []
    for status, headers, body in answers:
        if status != 200:
            continue
        if "x-eid" in headers:
            eids.append(headers["x-eid"])
            continue
        for line in body.split(b"\n"):
            if UUID7.fullmatch(line):
                eids.append(line.decode())
    return eids


def _read_available(sock: socket.socket, wait: float) -> tuple[bytes, bool]:
    """What is readable now (waiting at most `wait` for each next chunk): -> (bytes, closed)."""
    chunks = []
    while True:
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            return b"".join(chunks), False
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def exchange_half_closed(server: RunningServer, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data` on a fresh connection, half-close at once, read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received, closed = _read_available(sock, timeout)
        assert closed, "the server did not close after the client's EOF"
        return received


def sentinel(server: RunningServer) -> str:
    """Alive, answering /healthz, storing a valid event: -> its eid. Commits are FIFO, so once
    the sentinel's 200 is back, whatever an earlier request submitted is on disk too, and its
    answer was written before the sentinel's."""
    assert server.proc.poll() is None, f"server died:\n{server.log()[-3000:]}"
    with server.connect(timeout=5) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     f"GET /?si={SITE}&kind=sentinel HTTP/1.1\r\nHost: x\r\n"
                     f"Connection: close\r\n\r\n".encode())
        received, closed = _read_available(sock, 5.0)
    assert closed, f"sentinel not answered within 5 s: {received!r}"
    (health_status, _, health), (status, _, eid) = parse_answers(received)
    assert health_status == 200 and health == b"ok\n", received
    assert status == 200 and UUID7.fullmatch(eid), received
    return eid.decode()


def check_one_exchange(server: RunningServer, data: bytes) -> list:
    """The invariant of every hostile example.

    The connection is not half-closed (a client that half-closes behind a malformed request
    loses answers: the bug `test_valid_then_malformed_then_half_close...` pins down, and the
    fuzz should find other things). Instead: send, give the server a moment to take the bytes
    in, then send the sentinel on another connection; once it is answered, every event the
    hostile bytes submitted is committed and answered, so the answers read then are all the
    answers there will be."""
    before = set(server.event_ids())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed before taking it all
        received, closed = _read_available(sock, 0.05)  # the parse happens on the first read
        after_sentinel = sentinel(server)
        if not closed:
            more, closed = _read_available(sock, 0.02)
            received += more
    answers = parse_answers(received)
    for status, headers, body in answers:
        assert status in KNOWN_STATUSES, (status, body, data[:300])
        assert status != 500, f"internal error for {data[:300]!r}: {body!r}"
    acknowledged = eids_of(answers)
    assert len(set(acknowledged)) == len(acknowledged)
    stored = set(server.event_ids()) - before - {after_sentinel}
    assert stored == set(acknowledged), (
        f"stored {sorted(stored)} but acknowledged {acknowledged}; "
        f"answers={[(s, b[:80]) for s, _, b in answers]}; request={data[:400]!r}")
    return answers


# ---------------------------------------------------------------- seeds and mutations

def _with_length(head: str, body: bytes) -> bytes:
    return head.replace("{n}", str(len(body))).encode() + body


SEEDS = [
    f"GET /?si={SITE}&page=home&v=%C3%A9+x&sid=s1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    f"User-Agent: fuzz/1\r\nReferer: http://r.example/\r\n\r\n".encode(),
    f"GET /pixel.gif?si={SITE}&uid=u1 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    f"GET /?si={SITE} HTTP/1.0\r\n\r\n".encode(),
    _with_length(f"POST /?si={SITE} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 "application/x-www-form-urlencoded\r\nContent-Length: {n}\r\n\r\n",
                 b"page=home&x=%20y"),
    _with_length(f"POST /batch?si={SITE}&sid=b HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain"
                 "\r\nContent-Length: {n}\r\n\r\n", b"a=1\nb=2&uid=u2\n\nc=%C3%A9\n"),
    f"POST /batch?si={SITE} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    f"Content-Type: text/plain\r\n\r\n4\r\na=1\n\r\n8\r\nb=2\nc=3\n\r\n0\r\n\r\n".encode(),
    b"OPTIONS /batch HTTP/1.1\r\nHost: x\r\nOrigin: http://o.example\r\n\r\n",
    f"GET /?si={SITE}&a=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /?si={SITE}&a=2 HTTP/1.1\r\n"
    f"Host: x\r\n\r\n".encode(),
]

INTERESTING = [b"\r\n", b"\n", b"\r", b"\x00", b" ", b":", b"%", b"%zz", b"&", b"=", b"&eid=1",
               b"&unixtimestamp=1", b"&si=", b"\xff\xfe", b"Content-Length: 5\r\n",
               b"Content-Length: 0\r\n", b"Content-Length: -1\r\n",
               b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
               b"Connection: close\r\n", b"Connection: keep-alive\r\n", b"Upgrade: h2c\r\n",
               b"Expect: 100-continue\r\n", b"0\r\n\r\n", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0",
               b"\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", f"GET /?si={SITE} HTTP/1.1\r\n\r\n".encode(),
               b"ffffffff\r\n", b"1;ext=1\r\n", b"\t", b"Content-Type: application/json\r\n"]
HEADER_NAMES = ["Content-Length", "Transfer-Encoding", "Content-Type", "Host", "Connection",
                "Upgrade", "User-Agent", "Referer", "X-Forwarded-For", "Authorization", "Expect",
                "Trailer", "TE", "Last-Event-ID", "X-Anything"]


def _header_bounds(data: bytes) -> tuple[int, int]:
    """(start of the first header line, end of the head) in a request; (0, 0) if none."""
    start = data.find(b"\r\n")
    end = data.find(b"\r\n\r\n")
    if start == -1 or end == -1 or end < start:
        return 0, 0
    return start + 2, end + 2


@st.composite
def mutation(draw, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "insert", "insert_token", "delete", "dup_header",
                                 "random_header", "replace_range"]))
    pos = draw(st.integers(0, len(data)))
    if kind == "flip" and data:
        pos = min(pos, len(data) - 1)
        return data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    if kind == "insert":
        return data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    if kind == "insert_token":
        return data[:pos] + draw(st.sampled_from(INTERESTING)) + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + draw(st.integers(1, 8)):]
    if kind == "replace_range" and data:
        pos = min(pos, len(data) - 1)
        return data[:pos] + draw(st.sampled_from(INTERESTING)) + data[pos + draw(st.integers(0, 6)):]
    start, end = _header_bounds(data)
    if start == end:
        return data
    lines = data[start:end].split(b"\r\n")[:-1]
    if kind == "dup_header" and lines:
        line = draw(st.sampled_from(lines))
        return data[:end] + line + b"\r\n" + data[end:]
    name = draw(st.one_of(st.sampled_from(HEADER_NAMES),
                          st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                                  min_size=1, max_size=12)))
    value = draw(st.one_of(st.sampled_from(["chunked", "0", "5", "close", "identity, chunked",
                                            " chunked", "text/plain", "1, 2", ""]),
                           st.binary(max_size=16)))
    if isinstance(value, str):
        value = value.encode()
    line = name.encode() + b": " + value + b"\r\n"
    return data[:start] + line + data[start:]


@st.composite
def add_property(draw, data: bytes) -> bytes:
    """A gentler mutation: one more property in the query string or a body line."""
    prop = draw(property_set()).encode() or b"&"
    spots = [i for i, c in enumerate(data) if c in b"?&\n"]
    if not spots:
        return data
    at = draw(st.sampled_from(spots)) + 1
    return data[:at] + prop + b"&" + data[at:]


@st.composite
def mutated_requests(draw) -> bytes:
    data = draw(st.sampled_from(SEEDS))
    for _ in range(pick(draw, [(4, 1), (2, 2), (1, 3), (1, 4)])):
        if draw(st.integers(0, 2)):
            data = draw(mutation(data))
        else:
            data = draw(add_property(data))
    return data


@LIVE
@given(data=mutated_requests())
def test_mutated_requests_never_crash_and_refusals_store_nothing(fuzz_server, data):
    assume(b"HEAD" not in data.upper())  # a HEAD answer has no body: framing differs
    answers = check_one_exchange(fuzz_server, data)
    event("statuses: " + (" ".join(str(s) for s, _, _ in answers) or "none"))


# ---------------------------------------------------------------- structured random requests

def pick(draw, weighted):
    """One value of [(weight, value), ...]: the likely shapes stay likely."""
    return draw(st.sampled_from([value for weight, value in weighted for _ in range(weight)]))


GOOD_NAMES = ["page", "a", "utm_source", "x-y.z", "%C3%A9", "n%3Dm", "sid", "uid", "~!$"]
GOOD_VALUES = ["", "1", "home", "%C3%A9+t", "a%26b%3Dc", "%F0%9F%98%80", "%00", "x" * 200]
BAD_PROPS = ["eid=1", "unixtimestamp=1", "a%20b=1", "=1", "%=1", "a=%zz", "a=%FF", "a=%C3",
             "x" * 129 + "=1", "si=" + "s" * 256, "sid=" + "s" * 256, "a=" + "v" * 8193,
             "\x7f=1", "si="]


@st.composite
def property_set(draw, bad_one_in: int = 5) -> str:
    parts = [f"{draw(st.sampled_from(GOOD_NAMES))}={draw(st.sampled_from(GOOD_VALUES))}"
             for _ in range(draw(st.integers(0, 4)))]
    if draw(st.integers(0, 9)):  # usually the site
        parts.insert(draw(st.integers(0, len(parts))), f"si={SITE}")
    if not draw(st.integers(0, bad_one_in - 1)):  # sometimes one bad property
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(BAD_PROPS)))
    return "&".join(parts)


def chunk_body(draw, body: bytes) -> bytes:
    """Chunked framing of `body`, sometimes broken on purpose."""
    out = []
    rest = body
    while rest:
        size = draw(st.integers(1, max(1, len(rest))))
        piece, rest = rest[:size], rest[size:]
        declared = size + pick(draw, [(12, 0), (1, -1), (1, 1), (1, 100)])
        ext = pick(draw, [(6, ""), (1, ";a=b"), (1, ";" + "x" * 40), (1, " ")])
        head = pick(draw, [(4, "%x"), (1, "%X"), (1, "%08x")]) % max(declared, 0)
        out.append(f"{head}{ext}\r\n".encode() + piece + b"\r\n")
    end = pick(draw, [(8, b"0\r\n\r\n"), (1, b"0\r\nX-T: 1\r\n\r\n"), (1, b"0\r\n"), (1, b""),
                      (1, b"g\r\n\r\n"), (1, b"00\r\n\r\n"), (1, b"0\r\n\r\n0\r\n\r\n")])
    return b"".join(out) + end


@st.composite
def random_requests(draw) -> bytes:
    method = pick(draw, [(6, "GET"), (6, "POST"), (1, "OPTIONS"), (1, "PUT"), (1, "DELETE"),
                         (1, "PATCH"), (1, "CONNECT"), (1, "TRACE"), (1, "get"), (1, "PRI")])
    path = pick(draw, [(4, "/"), (4, "/batch"), (2, "/pixel.gif"), (1, "/healthz"),
                       (1, "/nope"), (1, "/api/v1/events"), (1, "/api/v1/events/x"), (1, "*"),
                       (1, "http://h/"), (1, "//"), (1, "/batch/"), (1, "/%2F")])
    query = draw(property_set()) if draw(st.integers(0, 3)) else ""
    target = path + ("?" + query if query else "")
    version = pick(draw, [(10, "HTTP/1.1"), (2, "HTTP/1.0"), (1, "HTTP/2.0"), (1, "HTTP/0.9"),
                          (1, "HTTP/1.2"), (1, ""), (1, "http/1.1"), (1, "HTTP/1.1 x")])
    line = f"{method} {target} {version}".rstrip() + "\r\n"
    headers = [("Host", "127.0.0.1")] if draw(st.integers(0, 5)) else []
    for _ in range(draw(st.integers(0, 3))):
        headers.append(pick(draw, [
            (3, ("User-Agent", "fuzz/" + draw(st.text("abc/1. ", max_size=8)))),
            (2, ("Referer", "http://r.example/p")), (1, ("X-Forwarded-For", "10.0.0.1")),
            (1, ("Connection", "close")), (1, ("Connection", "keep-alive")),
            (1, ("Authorization", "Bearer x")), (1, ("Upgrade", "websocket")),
            (1, ("Expect", "100-continue")), (1, ("Content-Type", "application/json")),
            (1, ("X-Bad", "a\x01b")), (1, ("Bad Name", "x")), (1, ("Trailer", "X-T")),
            (1, ("Transfer-Encoding", "gzip, chunked")), (1, ("Content-Length", "+5"))]))
    if method == "POST" and draw(st.integers(0, 5)):
        headers.append(("Content-Type", pick(draw, [
            (4, "application/x-www-form-urlencoded"), (2, "text/plain;charset=UTF-8"),
            (1, "TEXT/PLAIN"), (1, "application/json"), (1, "multipart/form-data")])))
    if path.startswith("/batch"):
        lines = [draw(property_set(bad_one_in=15)) for _ in range(draw(st.integers(0, 5)))]
        body = pick(draw, [(4, "\n"), (1, "\r\n")]).join(lines).encode()
        if draw(st.booleans()):
            body += b"\n"
    elif method == "POST":
        body = draw(property_set()).encode()
    else:
        body = b"" if draw(st.integers(0, 3)) else draw(property_set()).encode()
    framing = pick(draw, [(6, "length"), (3, "chunked"), (1, "none"), (1, "wrong_length"),
                          (1, "both"), (1, "two_lengths")])
    if framing == "length" and (body or method == "POST"):
        headers.append(("Content-Length", str(len(body))))
    elif framing == "wrong_length":
        headers.append(("Content-Length", str(max(0, len(body) + pick(
            draw, [(1, -3), (1, -1), (1, 1), (1, 5)])))))
    elif framing == "both":
        headers += [("Content-Length", str(len(body))), ("Transfer-Encoding", "chunked")]
    elif framing == "two_lengths":
        headers += [("Content-Length", str(len(body)))] * 2
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    headers = draw(st.permutations(headers))
    head = line + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    if framing in ("chunked", "both"):
        wire_body = chunk_body(draw, body)
    elif framing == "none":
        wire_body = b""
    else:
        wire_body = body
    return head.encode("utf-8") + wire_body


@LIVE
@given(data=random_requests())
def test_random_requests_never_crash_and_refusals_store_nothing(fuzz_server, data):
    answers = check_one_exchange(fuzz_server, data)
    event("statuses: " + (" ".join(str(s) for s, _, _ in answers) or "none"))


def test_fuzz_oracle_sees_stored_events(fuzz_server):
    """The exchange check itself: a valid request is acknowledged and found stored."""
    answers = check_one_exchange(fuzz_server, SEEDS[0])
    assert [s for s, _, _ in answers] == [200]
    answers = check_one_exchange(fuzz_server, SEEDS[4])
    assert len(eids_of(answers)) == 3


def test_valid_then_malformed_then_half_close_answers_the_stored_event(fuzz_server):
    data = f"GET /?si={SITE}&k=half HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n".encode()
    before = set(fuzz_server.event_ids())
    answers = parse_answers(exchange_half_closed(fuzz_server, data))
    after_sentinel = sentinel(fuzz_server)
    stored = set(fuzz_server.event_ids()) - before - {after_sentinel}
    assert len(stored) == 1  # the valid event is stored (FIFO: committed before the sentinel)
    assert [s for s, _, _ in answers] == [200, 400]
    assert eids_of(answers) == sorted(stored)


def test_the_server_survives_a_fuzz_burst_with_no_traceback(fuzz_server):
    """Its own burst of mutated and random requests (so it passes or fails on its own, in any
    order, on any worker), then: still alive, still storing, no traceback in its log."""
    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.one_of(mutated_requests(), random_requests()))
    def burst(data):
        assume(b"HEAD" not in data.upper())
        check_one_exchange(fuzz_server, data)

    burst()
    eid = sentinel(fuzz_server)
    assert eid in set(fuzz_server.event_ids())
    log = fuzz_server.log()
    assert "Traceback" not in log and "request handling failed" not in log, log[-3000:]


# =========================================================================== 3. round trip

@pytest.fixture(scope="module")
def reader(fuzz_server):
    return fuzz_server, fuzz_server.create_token(SITE)


ID_VALUES = st.one_of(st.none(), st.just(""),
                      st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                              max_size=255))


def _get_json(server: RunningServer, target: str, token: str) -> dict:
    resp = server.get(target, headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, (target[:200], resp)
    assert resp.headers["content-type"].startswith("application/json")
    return resp.json()


@settings(max_examples=250, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pairs=property_pairs(exclude=("si", "sid", "uid", "eid", "unixtimestamp", KEY_PROPERTY)),
       how=ENCODINGS, sid=ID_VALUES, uid=ID_VALUES, order=st.randoms(use_true_random=False))
def test_valid_events_round_trip_through_the_read_api(reader, pairs, how, sid, uid, order):
    server, token = reader
    sent = [encode_pair(n, v, how) for n, v in pairs]  # in order: the last one wins
    ids = [("si", SITE), ("sid", sid), ("uid", uid)]
    for name, value in ids:  # the ids anywhere among them
        if value is not None:
            sent.insert(order.randint(0, len(sent)), encode_pair(name, value, how))
    query = "&".join(sent)
    if len(query) < 7 * 1024:
        resp = server.get("/?" + query)
    else:  # too long for a request line: the same set as a form body
        resp = server.post("/", query)
    assert resp.status == 200, resp
    assert UUID7_TEXT.fullmatch(resp.text), resp
    eid = resp.text

    props = dict(pairs)
    want_sid = sid or eid
    want_uid = uid or sid or eid
    got = _get_json(server, f"/api/v1/events/{eid}?si={quote(SITE)}", token)
    record = got["event"]
    assert record == {"unixtimestamp": record["unixtimestamp"], "si": SITE, **props, "eid": eid,
                      "sid": want_sid, "uid": want_uid}
    assert isinstance(record["unixtimestamp"], int)
    assert isinstance(got["captured"], dict)

    session = _get_json(server, f"/api/v1/sessions/{quote(want_sid, safe='')}?si={SITE}&limit=1",
                        token)
    assert session["session"]["eid"] == eid and session["session"]["sid"] == want_sid
    user = _get_json(server, f"/api/v1/users/{quote(want_uid, safe='')}?si={SITE}&limit=1", token)
    assert user["user"]["eid"] == eid and user["user"]["uid"] == want_uid


# =========================================================================== 4. read API inputs

@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    """A server of its own: the known bug below logs tracebacks, which the fuzz server's log
    must not hold (test_server_survives_the_fuzz)."""
    server = RunningServer(tmp_path_factory.mktemp("fuzzread") / "otdata").start()
    eid = server.track(si=SITE, sid="rs", uid="ru", page="p").text
    yield server, server.create_token("*"), eid
    server.kill()


def _known_int_bug(value: str) -> bool:
    """'²'.isdigit() is True but int('²') raises: the bug of
    test_non_decimal_digits_in_numeric_parameters_are_400_not_500, kept out of the fuzz."""
    return value.isdigit() and not value.isdecimal()


PARAM_VALUES = st.one_of(
    st.sampled_from(["", "0", "1", "10", "1000", "1001", "10000", "-1", "1.5", "1e3", " 1",
                     "\u0661\u0660", "9" * 30, "2026-11-26T10:00:00Z", "2026-11-26", "2026-11-26T10:00",
                     "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "T", "Z", "minute",
                     "hour", "day", "week", "AAAA", "AAAAAAAAAAAAAAAAAAAAAAAAAAA=", "====", "%", "\x00",
                     "01900000-0000-7000-8000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                     "01900000-0000-7000-8000-00000000000g", SITE, "*"]),
    st.text(max_size=40),
).filter(lambda v: not _known_int_bug(v))


@st.composite
def read_targets(draw, eid: str) -> str:
    kind = draw(st.sampled_from(["events", "events/{id}", "sessions/{id}", "users/{id}", "stats"]))
    ident = draw(st.one_of(st.sampled_from([eid, eid.upper(), "rs", "ru", "", ".", "..", "%",
                                            "a/b", "\u00e9"]),
                           st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)))
    path = "/api/v1/" + kind.replace("{id}", quote(ident, safe=""))
    params = draw(st.dictionaries(
        st.sampled_from(["si", "limit", "after", "from", "to", "bucket", "x"]), PARAM_VALUES,
        max_size=3))
    if draw(st.integers(0, 3)):
        params["si"] = SITE  # usually the right site, so the parameters get looked at
    query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params.items())
    return path + ("?" + query if query else "")


@LIVE
@given(data=st.data(), method=st.sampled_from(["GET", "GET", "GET", "HEAD"]))
def test_read_api_answers_any_parameters_with_json_never_500_never_cors(admin, data, method):
    server, token, eid = admin
    target = data.draw(read_targets(eid))
    resp = server.request(method, target, headers={"Authorization": f"Bearer {token}"})
    assert resp.status in (200, 400, 404), (target, resp)
    assert "access-control-allow-origin" not in resp.headers, (target, resp.headers)
    ctype = resp.headers.get("content-type", "")
    listing = target.startswith("/api/v1/events?") or target == "/api/v1/events"
    if resp.status == 200 and listing:
        assert ctype == "application/x-ndjson", (target, ctype)
        for line in resp.body.splitlines():
            assert json.loads(line)["event"]["si"] == SITE
    else:
        assert ctype == "application/json", (target, ctype)
        if method == "GET":
            payload = resp.json()
            if resp.status != 200:
                assert set(payload) == {"error"} and payload["error"], (target, payload)
    event(f"{method} {resp.status}")


@pytest.mark.parametrize("kind, query", [
    ("events", "limit=%C2%B2"), ("events", "from=%C2%B2"), ("events", "to=%C2%B9%C2%B2"),
    ("stats", "from=%C2%B2"), ("stats", "to=%C2%B2"), ("sessions/rs", "limit=%E2%91%A0"),
    ("users/ru", "limit=%C2%B2")])
def test_non_decimal_digits_in_numeric_parameters_are_400_not_500(admin, kind, query):
    server, token, _ = admin
    resp = server.get(f"/api/v1/{kind}?si={SITE}&{query}",
                      headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 400, resp
    assert resp.headers["content-type"] == "application/json"
    assert "access-control-allow-origin" not in resp.headers
