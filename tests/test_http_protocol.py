"""The HTTP/1.1 layer over raw sockets: limits, framing, methods, CORS, keep-alive, pipelining,
timeouts (SPEC 2.1 and 2.6).

Every refusal is checked twice: the answer the client gets (status, short plain-text reason,
`Connection: close` and a closed socket where SPEC says so) and that nothing was stored. "Nothing
stored" is proven with a sentinel: after the refusal a valid event is sent on a new connection and
its 200 awaited; commits are FIFO, so anything the refused bytes might have submitted would be
on disk by then, and the store must then hold exactly the sentinel.
"""
from __future__ import annotations

import select
import socket
import time

import pytest

from conftest import FreshView, RunningServer, parse_responses, read_response

SITE = "proto.test"
SMUGGLED = b"GET /?si=smuggled.test HTTP/1.1\r\nHost: x\r\n\r\n"
KIB = 1024
MIB = 1024 * KIB


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    server = RunningServer(tmp_path_factory.mktemp("protocol") / "otdata",
                           ["--fold-delay", "1ms"]).start()  # FreshView waits for a fold
    yield server
    assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()[-3000:]


@pytest.fixture
def server(module_server) -> FreshView:
    """One server for the module (its tests only add events): each test sees what it stored."""
    return FreshView(module_server)


def request(method: str, target: str, headers=(), body: bytes = b"", version: str = "1.1",
            content_length: bool | int = True) -> bytes:
    """One request as bytes. `headers` is a sequence of (name, value); Host is added."""
    lines = [f"{method} {target} HTTP/{version}", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if content_length is True and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    elif content_length is not True and content_length is not False:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def form_post(target: str, body: bytes, headers=(), **kw) -> bytes:
    return request("POST", target,
                   (("Content-Type", "application/x-www-form-urlencoded"), *headers), body, **kw)


def exchange(server, data: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send `data` on a new connection; read until the server closes or `timeout` passes.
    -> (bytes received, whether the server closed the connection)."""
    with server.connect(timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock, timeout)


def read_all(sock: socket.socket, timeout: float = 3.0) -> tuple[bytes, bool]:
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return b"".join(chunks), False
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closed `sock` (EOF or reset), None if still open at `timeout`.
    Any bytes received before the close are ignored."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return None
        except ConnectionResetError:
            return time.monotonic() - start
        if not chunk:
            return time.monotonic() - start


def stream_until_answer(sock: socket.socket, first: bytes, piece: bytes, max_bytes: int,
                        timeout: float = 5.0) -> tuple[int, bytes, bool]:
    """Send `first`, then `piece` repeatedly (up to `max_bytes` in all), stopping as soon as the
    server answers. -> (bytes sent, bytes received, closed). Never buffers without bound on our
    side either: if the server never answers we stop at `max_bytes`."""
    sent = 0
    sock.sendall(first)
    sent += len(first)
    deadline = time.monotonic() + timeout
    try:
        while sent < max_bytes and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.002)
            if readable:
                break
            sock.sendall(piece)
            sent += len(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data, closed = read_all(sock, max(0.5, deadline - time.monotonic()))
    return sent, data, closed


def only_response(data: bytes):
    responses = parse_responses(data)
    assert len(responses) == 1, f"expected exactly one answer, got {len(responses)}: {data[:600]!r}"
    return responses[0]


def assert_refusal(resp, status: int, *, close: bool = False, reason: str | None = None):
    """A refusal: the status, a short plain-text reason, `Connection: close` when asked."""
    assert resp.status == status, resp
    assert resp.headers.get("content-type", "").startswith("text/plain"), resp.headers
    text = resp.body.decode("utf-8")
    assert text.strip(), "a refusal carries a reason"
    assert len(resp.body) <= 200 and "\n" not in text.strip(), f"not a short reason: {text!r}"
    if reason is not None:
        assert reason.lower() in text.lower(), f"reason {text!r} should mention {reason!r}"
    if close:
        assert resp.headers.get("connection", "").lower() == "close", resp.headers


def stored_eids(server) -> set[str]:
    """Every stored eid apart from a sentinel sent (and awaited) now, so anything submitted
    before is committed by the time this reads the store."""
    resp = server.track(si="sentinel.test")
    assert resp.status == 200, resp
    ids = set(server.event_ids())
    assert resp.text in ids
    assert server.counts()["events"] == len(ids)
    ids.discard(resp.text)
    return ids


def assert_nothing_stored(server, before: set[str] = frozenset()):
    assert stored_eids(server) == set(before)
    assert server.counts()["events"] == len(before) + 1  # + the sentinel


def assert_cors(resp):
    assert resp.headers.get("access-control-allow-origin") == "*", resp.headers
    assert resp.headers.get("cache-control") == "no-store", resp.headers


def track_request(target: str = f"/?si={SITE}", **kw) -> bytes:
    return request("GET", target, **kw)


# --------------------------------------------------------------------------- 414: URL

def test_url_of_exactly_8_kib_is_accepted(server):
    target = "/?si=a&v="
    target += "x" * (8 * KIB - len(target))
    assert len(target) == 8 * KIB
    data, _ = exchange(server, track_request(target, headers=(("Connection", "close"),)))
    resp = only_response(data)
    assert resp.status == 200, resp
    assert stored_eids(server) == {resp.text}


def test_url_over_8_kib_is_414_and_closed(server):
    target = "/?si=a&v="
    target += "x" * (8 * KIB + 1 - len(target))
    data, closed = exchange(server, track_request(target) + SMUGGLED)
    assert_refusal(only_response(data), 414, close=True)
    assert closed
    assert_nothing_stored(server)


def test_url_trickled_in_small_sends_is_414_without_buffering_it_all(server):
    with server.connect() as sock:
        sent, data, closed = stream_until_answer(sock, b"GET /?si=a&v=", b"x" * KIB, 4 * MIB)
    assert_refusal(only_response(data), 414, close=True)
    assert closed
    assert sent < 64 * KIB, f"the server read {sent} bytes of URL before refusing"
    assert_nothing_stored(server)


# --------------------------------------------------------------------------- 431: headers

def test_headers_just_under_16_kib_are_accepted(server):
    headers = [(f"X-Pad-{i:02d}", "p" * 1000) for i in range(15)]  # ~15.1 KiB with the rest
    data, _ = exchange(server, track_request(headers=(*headers, ("Connection", "close"))))
    resp = only_response(data)
    assert resp.status == 200, resp
    assert stored_eids(server) == {resp.text}


def test_one_header_over_16_kib_is_431_and_closed(server):
    data, closed = exchange(server, track_request(headers=(("X-Big", "b" * (16 * KIB + 10)),))
                            + SMUGGLED)
    assert_refusal(only_response(data), 431, close=True)
    assert closed
    assert_nothing_stored(server)


def test_many_headers_together_over_16_kib_are_431(server):
    headers = [(f"X-Pad-{i:02d}", "p" * 1000) for i in range(20)]  # 20 KiB, each one small
    data, closed = exchange(server, track_request(headers=headers) + SMUGGLED)
    assert_refusal(only_response(data), 431, close=True)
    assert closed
    assert_nothing_stored(server)


def test_exactly_100_header_fields_are_accepted(server):
    # Host + Connection + 98 more = 100 fields.
    headers = [(f"X-H{i}", "v") for i in range(98)]
    data, _ = exchange(server, track_request(headers=(*headers, ("Connection", "close"))))
    resp = only_response(data)
    assert resp.status == 200, resp
    assert stored_eids(server) == {resp.text}


def test_101_header_fields_are_431_and_closed(server):
    headers = [(f"X-H{i}", "v") for i in range(100)]  # + Host = 101
    data, closed = exchange(server, track_request(headers=headers) + SMUGGLED)
    assert_refusal(only_response(data), 431, close=True)
    assert closed
    assert_nothing_stored(server)


def test_giant_header_value_split_across_many_sends_is_431_not_buffered(server):
    with server.connect() as sock:
        sent, data, closed = stream_until_answer(
            sock, b"GET /?si=a HTTP/1.1\r\nHost: x\r\nX-Giant: ", b"g" * KIB, 8 * MIB)
    assert_refusal(only_response(data), 431, close=True)
    assert closed
    # SPEC limit 16 KiB of headers (+ 8 KiB request line): refused long before 64 KiB.
    assert sent < 64 * KIB, f"the server buffered {sent} bytes of one header before refusing"
    assert_nothing_stored(server)


def test_giant_header_name_split_across_many_sends_is_431_not_buffered(server):
    with server.connect() as sock:
        sent, data, closed = stream_until_answer(
            sock, b"GET /?si=a HTTP/1.1\r\nHost: x\r\nX-", b"n" * KIB, 8 * MIB)
    assert_refusal(only_response(data), 431, close=True)
    assert closed
    assert sent < 64 * KIB, f"the server buffered {sent} bytes of one header name"
    assert_nothing_stored(server)


# --------------------------------------------------------------------------- 413: body

def _fill_form(size: int) -> bytes:
    """A valid single-event form body of exactly `size` bytes (values at most 8 KiB)."""
    body = b"si=" + SITE.encode()
    i = 0
    while len(body) < size:
        head = b"&p%d=" % i
        room = size - len(body) - len(head)
        if room < 0:  # pad the previous value instead
            body += b"z" * (size - len(body))
            break
        body += head + b"v" * min(room, 8000)
        i += 1
    assert len(body) == size
    return body


def test_post_body_of_exactly_64_kib_is_accepted(server):
    body = _fill_form(64 * KIB)
    data, _ = exchange(server, form_post("/", body, headers=(("Connection", "close"),)))
    resp = only_response(data)
    assert resp.status == 200, resp
    assert stored_eids(server) == {resp.text}


@pytest.mark.parametrize("path,limit", [("/", 64 * KIB), ("/?si=a", 64 * KIB),
                                        ("/batch", 1 * MIB)])
def test_content_length_over_the_limit_is_413_before_the_body_is_sent(server, path, limit):
    head = form_post(path, b"", content_length=limit + 1)
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: %d" % (limit + 1) in head
    with server.connect() as sock:
        sock.sendall(head)  # only the head: the answer must come without the body
        data, closed = read_all(sock, 3.0)
    assert_refusal(only_response(data), 413, close=True)
    assert closed
    assert_nothing_stored(server)


def test_batch_accepts_a_body_of_exactly_1_mib(server):
    line = b"si=" + SITE.encode() + b"&v="
    lines = []
    total = 0
    while total < 1 * MIB - 9000:
        entry = line + b"b" * 8000 + b"\n"
        lines.append(entry)
        total += len(entry)
    last = line + b"b" * (1 * MIB - total - len(line) - 1) + b"\n"
    lines.append(last)
    body = b"".join(lines)
    assert len(body) == 1 * MIB
    with server.connect(timeout=10) as sock:
        sock.sendall(form_post("/batch", body, headers=(("Connection", "close"),)))
        data, _ = read_all(sock, 10.0)
    resp = only_response(data)
    assert resp.status == 200, resp
    eids = resp.body.decode().splitlines()
    assert len(eids) == len(lines)
    assert stored_eids(server) == set(eids)


def test_batch_body_over_1_mib_sent_eagerly_is_413_and_closed(server):
    # The client does not wait for the verdict and streams its (valid) body right away.
    line = b"si=" + SITE.encode() + b"&v=" + b"b" * 8000 + b"\n"
    body = line * (MIB // len(line) + 1)
    assert MIB < len(body) < MIB + 10 * KIB
    with server.connect() as sock:
        sent, data, closed = stream_until_answer(
            sock, form_post("/batch", b"", content_length=len(body)), line, len(body))
    assert_refusal(only_response(data), 413, close=True)
    assert closed
    assert_nothing_stored(server)


@pytest.mark.parametrize("path,limit", [("/", 64 * KIB), ("/batch", 1 * MIB)])
def test_chunked_body_over_the_limit_is_413_and_closed(server, path, limit):
    head = request("POST", path, (("Content-Type", "text/plain"),
                                  ("Transfer-Encoding", "chunked")), content_length=False)
    piece_body = b"si=" + SITE.encode() + b"&v=" + b"c" * 4000 + b"\n"  # valid batch lines
    piece = b"%x\r\n" % len(piece_body) + piece_body + b"\r\n"
    with server.connect() as sock:
        sent, data, closed = stream_until_answer(sock, head, piece, 4 * limit)
    assert_refusal(only_response(data), 413, close=True)
    assert closed
    assert sent < limit + 256 * KIB, f"read {sent} bytes of a body limited to {limit}"
    assert_nothing_stored(server)


def test_too_many_chunked_trailer_fields_are_431(server):
    head = request("POST", f"/?si={SITE}", CHUNKED, content_length=False)
    trailers = b"".join(b"X-T%d: v\r\n" % i for i in range(150))
    reply, closed = exchange(server, head + b"4\r\na=b1\r\n0\r\n" + trailers + b"\r\n")
    assert_refusal(only_response(reply), 431, close=True)
    assert closed
    assert_nothing_stored(server)


def test_giant_chunked_trailer_split_across_sends_is_refused_not_buffered(server):
    head = request("POST", f"/?si={SITE}", CHUNKED, content_length=False)
    with server.connect() as sock:
        sent, data, closed = stream_until_answer(
            sock, head + b"4\r\na=b1\r\n0\r\nX-Trailer: ", b"t" * (16 * KIB), 2 * MIB,
            timeout=3.0)
    assert data, f"no answer after {sent} bytes of one trailer field"
    assert only_response(data).status in (400, 413, 431), data[:200]
    assert closed
    assert sent < 1 * MIB, f"the server buffered {sent} bytes of one trailer field"
    assert_nothing_stored(server)


def test_smuggled_request_behind_an_oversized_content_length_is_never_run(server):
    data, closed = exchange(server, form_post("/", b"", content_length=64 * KIB + 1) + SMUGGLED)
    assert_refusal(only_response(data), 413, close=True)
    assert closed
    assert_nothing_stored(server)


# --------------------------------------------------------------------------- 400: framing

CHUNKED = (("Content-Type", "text/plain"), ("Transfer-Encoding", "chunked"))
POST_HEAD = b"POST /?si=a HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"

MALFORMED = {
    "garbage request line": b"HELLO THERE\r\n\r\n",
    "binary garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "bad HTTP version": b"GET /?si=a HTTP/1.x\r\nHost: x\r\n\r\n",
    "lower-case method": b"get /?si=a HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare LF line endings": b"GET /?si=a HTTP/1.1\nHost: x\n\n",
    "bare LF inside the headers": b"GET /?si=a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "bare CR inside a header": b"GET /?si=a HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
    "NUL in a header value": b"GET /?si=a HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "NUL in a header name": b"GET /?si=a HTTP/1.1\r\nHost: x\r\nX\x00A: bc\r\n\r\n",
    "NUL in the request line": b"GET /?si=a\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "space before the colon": b"GET /?si=a HTTP/1.1\r\nHost : x\r\n\r\n",
    "header without a colon": b"GET /?si=a HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
    "obs-fold continuation line": b"GET /?si=a HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    "Content-Length with Transfer-Encoding":
        POST_HEAD + b"Content-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsi=a\r\n0\r\n\r\n",
    "Transfer-Encoding with Content-Length":
        POST_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n4\r\nsi=a\r\n0\r\n\r\n",
    "duplicate Content-Length, same value":
        POST_HEAD + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nsi=a",
    "duplicate Content-Length, different values":
        POST_HEAD + b"Content-Length: 4\r\nContent-Length: 9\r\n\r\nsi=a",
    "Content-Length list": POST_HEAD + b"Content-Length: 4, 4\r\n\r\nsi=a",
    "signed Content-Length": POST_HEAD + b"Content-Length: +4\r\n\r\nsi=a",
    "negative Content-Length": POST_HEAD + b"Content-Length: -4\r\n\r\nsi=a",
    "hex Content-Length": POST_HEAD + b"Content-Length: 0x4\r\n\r\nsi=a",
    "Transfer-Encoding gzip": POST_HEAD + b"Transfer-Encoding: gzip\r\n\r\nsi=a",
    "Transfer-Encoding identity":
        POST_HEAD + b"Transfer-Encoding: identity\r\n\r\nsi=a",
    "Transfer-Encoding gzip, chunked":
        POST_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n4\r\nsi=a\r\n0\r\n\r\n",
    "Transfer-Encoding chunked twice":
        POST_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"4\r\nsi=a\r\n0\r\n\r\n",
    "HTTP/1.0 with chunked":
        b"POST /?si=a HTTP/1.0\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nsi=a\r\n0\r\n\r\n",
    "bad chunk size": POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nsi=a\r\n0\r\n\r\n",
    "negative chunk size": POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n-4\r\nsi=a\r\n0\r\n\r\n",
    "chunk longer than its size":
        POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nsi=a\r\n0\r\n\r\n",
    "chunk size with bare LF": POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n4\nsi=a\n0\n\n",
    "chunk size overflowing 64 bits":
        POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n10000000000000004\r\nsi=a\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_http_is_400_closed_and_the_rest_never_run(server, data):
    reply, closed = exchange(server, data + SMUGGLED)
    assert_refusal(only_response(reply), 400, close=True)
    assert closed
    assert_nothing_stored(server)


@pytest.mark.parametrize("data, reason", [
    pytest.param(b"GET /?si=a HTTP/1.1\r\n\r\n", b"needs a Host header", id="no Host"),
    pytest.param(b"GET /?si=a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"more than one Host header", id="two Hosts"),
    pytest.param(b"POST /?si=a HTTP/1.1\r\nContent-Length: 4\r\n\r\n", b"needs a Host header",
                 id="no Host, a body announced and never sent"),
    pytest.param("GET /?si=a&näme=v HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                 b"byte 0xC3 at offset 8 (in the query", id="a raw UTF-8 name"),
    pytest.param(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                 + b"".join(b"1;" + b"e" * 200 + b"\r\nx\r\n" for _ in range(300))
                 + b"0\r\n\r\n", b"too much chunked framing", id="chunk extensions, no body"),
])
def test_first_hour_refusals_answer_at_once_close_and_store_nothing(server, data, reason):
    reply, closed = exchange(server, data + SMUGGLED)  # answered without waiting for a body
    resp = only_response(reply)
    assert_refusal(resp, 400, close=True)
    assert reason in resp.body, resp.body
    assert closed
    assert_nothing_stored(server)


def test_a_body_in_one_byte_chunks_is_stored(server):
    body = b"si=" + SITE.encode() + b"".join(b"&p%d=" % i + b"x" * 7_500 for i in range(4))
    chunks = b"".join(b"1\r\n%s\r\n" % body[i:i + 1] for i in range(len(body)))
    reply, _ = exchange(server, POST_HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n"
                        b"\r\n" + chunks + b"0\r\n\r\n", timeout=10)
    resp = only_response(reply)
    assert resp.status == 200, resp
    assert stored_eids(server) == {resp.body.decode()}


@pytest.mark.parametrize("line", [
    pytest.param(b"GET /?si=a", id="no HTTP version (0.9 request line with headers)"),
    pytest.param(b"GET /?si=a HTTP/0.9", id="HTTP/0.9"),
    pytest.param(b"GET /?si=a HTTP/2.0", id="HTTP/2.0 in an HTTP/1 request line"),
    pytest.param(b"GET /?si=a HTTP/1.2", id="HTTP/1.2"),
    pytest.param(b"GET /?si=a HTTP/11", id="HTTP/11"),
])
def test_request_line_without_a_supported_http_version_is_refused(server, line):
    # SPEC 2.1 speaks HTTP/1.1 and HTTP/1.0; anything else is malformed HTTP (400) or an
    # unsupported version (505), and in either case nothing is stored.
    reply, closed = exchange(server, line + b"\r\nHost: x\r\n\r\n" + SMUGGLED)
    resp = only_response(reply)
    assert resp.status in (400, 505), resp
    assert closed
    assert_nothing_stored(server)


def test_request_before_a_malformed_one_is_answered_first_then_400_and_close(server):
    good = track_request()
    reply, closed = exchange(server, good + b"HELLO THERE\r\n\r\n" + SMUGGLED)
    responses = parse_responses(reply)
    assert [r.status for r in responses] == [200, 400], reply
    assert_refusal(responses[1], 400, close=True)
    assert closed
    assert stored_eids(server) == {responses[0].body.decode()}


def test_cl_te_smuggling_is_refused_and_the_hidden_request_never_run(server):
    # A front end honouring Content-Length would forward all of this as one request; one
    # honouring Transfer-Encoding would see a second, hidden request. otserver must do neither.
    hidden = b"GET /?si=hidden.test HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    data = (b"POST /?si=a HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)) + body
    reply, closed = exchange(server, data)
    assert_refusal(only_response(reply), 400, close=True)
    assert closed
    assert_nothing_stored(server)


# --------------------------------------------------------------------------- Upgrade, CONNECT

UPGRADES = {
    "websocket": request("GET", f"/?si={SITE}", (
        ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))),
    "h2c": request("GET", f"/?si={SITE}", (
        ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
        ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"))),
    "Upgrade without Connection": request("GET", f"/?si={SITE}", (("Upgrade", "websocket"),)),
    "CONNECT": b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
    "CONNECT with a body": b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n"
                           b"Content-Length: 4\r\n\r\nsi=a",
}


@pytest.mark.parametrize("data", list(UPGRADES.values()), ids=list(UPGRADES))
def test_upgrade_and_connect_are_refused_and_closed(server, data):
    reply, closed = exchange(server, data + SMUGGLED)
    resp = only_response(reply)
    assert resp.status in (400, 501), resp
    assert_refusal(resp, resp.status, close=True)
    assert closed
    assert_nothing_stored(server)


# --------------------------------------------------------------------------- 405, 404, OPTIONS

@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/", "GET, POST, OPTIONS"),
    ("DELETE", "/", "GET, POST, OPTIONS"),
    ("PATCH", "/", "GET, POST, OPTIONS"),
    ("GET", "/batch", "POST, OPTIONS"),
    ("PUT", "/batch", "POST, OPTIONS"),
    ("POST", "/pixel.gif", "GET, OPTIONS"),
    ("DELETE", "/pixel.gif", "GET, OPTIONS"),
])
def test_method_not_allowed_is_405_with_allow(server, method, path, allow):
    body = f"si={SITE}".encode()
    data = request(method, f"{path}?si={SITE}",
                   (("Content-Type", "application/x-www-form-urlencoded"),), body)
    with server.connect() as sock:
        sock.sendall(data)
        resp = read_response(sock)
        assert_refusal(resp, 405)
        assert resp.headers.get("allow") == allow
        # Not a framing error: the connection stays usable and the next request is answered.
        sock.sendall(track_request(headers=(("Connection", "close"),)))
        after = read_response(sock)
        assert after.status == 200, after
    assert stored_eids(server) == {after.body.decode()}


@pytest.mark.parametrize("target", ["/nope", "/index.html?si=a", "/batch/x", "/pixel.png?si=a",
                                    "//?si=a", "/favicon.ico"])
def test_unknown_path_is_404_and_stores_nothing(server, target):
    reply, _ = exchange(server, track_request(target, headers=(("Connection", "close"),)))
    assert_refusal(only_response(reply), 404)
    assert_nothing_stored(server)


@pytest.mark.parametrize("path", ["/", "/batch", "/pixel.gif", "/?si=a"])
def test_options_preflight_is_204_with_cors(server, path):
    data = request("OPTIONS", path, (("Origin", "https://example.com"),
                                     ("Access-Control-Request-Method", "POST"),
                                     ("Access-Control-Request-Headers", "content-type")))
    with server.connect() as sock:
        sock.sendall(data)
        resp = read_response(sock)
        assert resp.status == 204, resp
        assert resp.body == b""
        assert_cors(resp)
        assert "POST" in resp.headers.get("access-control-allow-methods", "")
        # 204 has no body: the next request on the connection is parsed cleanly.
        sock.sendall(track_request(headers=(("Connection", "close"),)))
        after = read_response(sock)
        assert after.status == 200, after
    assert stored_eids(server) == {after.body.decode()}


# --------------------------------------------------------------------------- CORS everywhere

FORM = (("Content-Type", "application/x-www-form-urlencoded"),)

INGEST_ANSWERS = [
    pytest.param(track_request(), 200, id="GET / 200"),
    pytest.param(form_post("/", f"si={SITE}&a=1".encode()), 200, id="POST / 200"),
    pytest.param(request("POST", "/", (("Content-Type", "text/plain"),), f"si={SITE}".encode()),
                 200, id="POST / text/plain 200"),
    pytest.param(form_post("/batch", f"si={SITE}\nsi={SITE}\n".encode()), 200, id="POST /batch 200"),
    pytest.param(track_request(f"/pixel.gif?si={SITE}"), 200, id="GET /pixel.gif 200"),
    pytest.param(track_request("/?a=1"), 400, id="GET / missing si 400"),
    pytest.param(track_request(f"/?si={SITE}&eid=x"), 400, id="GET / eid sent 400"),
    pytest.param(track_request("/pixel.gif?a=1"), 400, id="GET /pixel.gif missing si 400"),
    pytest.param(form_post("/batch", f"si={SITE}\na=1\n".encode()), 400, id="POST /batch bad line 400"),
    pytest.param(form_post("/", b"a=1"), 400, id="POST / missing si 400"),
    pytest.param(request("PUT", "/"), 405, id="PUT / 405"),
    pytest.param(request("GET", "/batch"), 405, id="GET /batch 405"),
    pytest.param(request("POST", "/", (("Content-Type", "application/xml"),), b'<si>a</si>'),
                 415, id="POST / xml 415"),
    pytest.param(request("POST", "/", (("Content-Type", "application/json"),), b'{"si":'),
                 400, id="POST / bad json 400"),
    pytest.param(form_post("/", b"", content_length=64 * KIB + 1), 413, id="POST / 413"),
    pytest.param(form_post("/batch", b"", content_length=MIB + 1), 413, id="POST /batch 413"),
]


@pytest.mark.parametrize("data,status", INGEST_ANSWERS)
def test_every_ingest_answer_carries_cors_and_no_store(server, data, status):
    with server.connect() as sock:
        sock.sendall(data)
        resp = read_response(sock)
    assert resp.status == status, resp
    assert_cors(resp)
    stored = stored_eids(server)
    if status == 200:
        eids = resp.headers["x-eid"] if "x-eid" in resp.headers else resp.body.decode()
        assert stored and stored == set(eids.split())
    else:
        assert stored == set()


def test_pixel_answer_is_a_gif_with_the_eid_in_x_eid(server):
    with server.connect() as sock:
        sock.sendall(track_request(f"/pixel.gif?si={SITE}"))
        resp = read_response(sock)
    assert resp.status == 200
    assert resp.headers["content-type"] == "image/gif"
    assert resp.body.startswith(b"GIF89a") and len(resp.body) == 43
    assert stored_eids(server) == {resp.headers["x-eid"]}


# --------------------------------------------------------------------------- keep-alive, pipelining

def test_several_requests_on_one_keep_alive_connection(server):
    eids = []
    with server.connect() as sock:
        for i in range(5):
            sock.sendall(track_request(f"/?si={SITE}&n={i}"))
            resp = read_response(sock)
            assert resp.status == 200, resp
            assert resp.headers.get("connection", "").lower() != "close"
            eids.append(resp.body.decode())
        sock.sendall(form_post("/", f"si={SITE}".encode()))
        resp = read_response(sock)
        assert resp.status == 200
        eids.append(resp.body.decode())
        # still open, not closed behind our back
        assert closed_within(sock, 0.3) is None
    assert len(set(eids)) == 6
    assert stored_eids(server) == set(eids)


def read_responses(sock: socket.socket, count: int, timeout: float = 5.0) -> list:
    """Read exactly `count` Content-Length framed answers from a kept-alive connection."""
    buf = b""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(rest) >= length:
                out.extend(parse_responses(head + sep + rest[:length]))
                buf = rest[length:]
                continue
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} answers in {timeout} s"
        sock.settimeout(left)
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(out)} of {count} answers"
        buf += chunk
    assert buf == b"", f"bytes after the last expected answer: {buf[:200]!r}"
    return out


def test_pipelined_requests_are_answered_in_order(server):
    count = 50
    data = b"".join(track_request(f"/?si={SITE}&n={i}") for i in range(count))
    with server.connect(timeout=10) as sock:
        sock.sendall(data)  # all 50 in one send
        responses = read_responses(sock, count)
        assert closed_within(sock, 0.3) is None  # keep-alive: still open, nothing more sent
    assert all(r.status == 200 for r in responses), [r.status for r in responses]
    eids = [r.body.decode() for r in responses]
    assert len(set(eids)) == count
    assert eids == sorted(eids), "eids are time-ordered UUIDv7: answers must be in request order"
    assert stored_eids(server) == set(eids)
    assert server.event_ids() == sorted(server.event_ids())


def test_pipelining_past_the_in_flight_bound_still_answers_everything(server):
    # More than max_pipelined (64) in one send: reading pauses and must resume.
    count = 200
    data = b"".join(track_request(f"/?si={SITE}&n={i}") for i in range(count - 1))
    data += track_request(f"/?si={SITE}&n=last", headers=(("Connection", "close"),))
    reply, closed = exchange(server, data, timeout=8)
    responses = parse_responses(reply)
    assert len(responses) == count, f"{len(responses)} answers to {count} requests"
    assert all(r.status == 200 for r in responses)
    eids = [r.body.decode() for r in responses]
    assert eids == sorted(eids) and len(set(eids)) == count
    assert closed
    assert stored_eids(server) == set(eids)


def test_pipelined_mixed_answers_keep_request_order(server):
    data = b"".join([
        track_request(f"/?si={SITE}&n=1"),                 # 200, async (commit)
        track_request("/nope"),                            # 404, sync
        request("PUT", "/"),                               # 405, sync
        request("OPTIONS", "/batch"),                      # 204, sync
        track_request(f"/pixel.gif?si={SITE}"),            # 200, async
        track_request("/?a=1"),                            # 400, sync
        form_post("/batch", f"si={SITE}\nsi={SITE}\n".encode()),  # 200, async
        track_request(f"/?si={SITE}&n=2", headers=(("Connection", "close"),)),  # 200, closes
        SMUGGLED,                                          # after close: never run
    ])
    reply, closed = exchange(server, data)
    responses = parse_responses(reply)
    assert [r.status for r in responses] == [200, 404, 405, 204, 200, 400, 200, 200], reply
    assert closed
    eids = [responses[0].body.decode(), responses[4].headers["x-eid"],
            *responses[6].body.decode().split(), responses[7].body.decode()]
    assert eids == sorted(eids)
    assert stored_eids(server) == set(eids)


@pytest.mark.parametrize("extra", [(), (("Connection", "keep-alive"),)],
                         ids=["plain", "with Connection: keep-alive"])
def test_http_1_0_is_answered_then_closed(server, extra):
    data = request("GET", f"/?si={SITE}", extra, version="1.0")
    reply, closed = exchange(server, data + SMUGGLED)
    resp = only_response(reply)
    assert resp.status == 200, resp
    assert resp.headers.get("connection", "").lower() == "close"
    assert closed
    assert stored_eids(server) == {resp.body.decode()}


def test_connection_close_is_honoured_and_later_requests_ignored(server):
    data = track_request(headers=(("Connection", "close"),)) + SMUGGLED
    reply, closed = exchange(server, data)
    resp = only_response(reply)
    assert resp.status == 200
    assert resp.headers.get("connection", "").lower() == "close"
    assert closed
    assert stored_eids(server) == {resp.body.decode()}


def test_client_half_close_gets_its_answer_then_close(server):
    with server.connect() as sock:
        sock.sendall(track_request())
        sock.shutdown(socket.SHUT_WR)
        reply, closed = read_all(sock, 3.0)
    resp = only_response(reply)
    assert resp.status == 200
    assert closed
    assert stored_eids(server) == {resp.body.decode()}


def test_chunked_post_body_works(server):
    parts = [f"si={SITE}".encode(), b"&a=", b"1&b=hello", b"+world"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    head = request("POST", "/?a=query&c=3", CHUNKED, content_length=False)
    with server.connect() as sock:
        sock.sendall(head)
        sock.sendall(body[:7])  # split across sends, inside a chunk
        time.sleep(0.05)
        sock.sendall(body[7:])
        resp = read_response(sock)
        assert resp.status == 200, resp
        assert_cors(resp)
        # the connection is still usable after a chunked body
        sock.sendall(track_request(headers=(("Connection", "close"),)))
        after = read_response(sock)
        assert after.status == 200
    assert stored_eids(server) == {resp.body.decode(), after.body.decode()}


def test_chunked_batch_works(server):
    lines = f"si={SITE}&n=1\nsi={SITE}&n=2\nsi={SITE}&n=3\n".encode()
    body = b"%x\r\n%s\r\n" % (10, lines[:10]) + b"%x\r\n%s\r\n" % (len(lines) - 10, lines[10:])
    body += b"0\r\n\r\n"
    reply, _ = exchange(server, request("POST", "/batch", CHUNKED, content_length=False) + body
                        + track_request(headers=(("Connection", "close"),)))
    responses = parse_responses(reply)
    assert [r.status for r in responses] == [200, 200], reply
    eids = responses[0].body.decode().split()
    assert len(eids) == 3
    assert stored_eids(server) == {*eids, responses[1].body.decode()}


# --------------------------------------------------------------------------- timeouts
# Each deadline is tested in tests/protocol/ over a fake clock; here only that the server's
# clock really enforces them on a socket.

def test_the_server_clock_closes_a_slowloris_at_the_header_timeout(make_server):
    srv = make_server("--header-timeout", "300ms")
    with srv.connect() as sock:
        sock.sendall(b"GET /?si=slow HTTP/1.1\r\nHo")
        after = closed_within(sock, 3.0)
    assert after is not None and 0.2 <= after <= 1.5, after
    assert_nothing_stored(srv)


# --------------------------------------------------------------------------- many properties

def test_ten_thousand_query_parameters_are_400_too_many_properties(make_server):
    srv = make_server("--max-url-bytes", "256KiB")  # so the URL limit is not what refuses it
    target = "/?si=a&" + "&".join(f"p{i}=1" for i in range(10_000))
    assert 8 * KIB < len(target) < 256 * KIB
    reply, _ = exchange(srv, track_request(target, headers=(("Connection", "close"),)))
    resp = only_response(reply)
    assert_refusal(resp, 400, reason="too many properties")
    assert_cors(resp)
    assert_nothing_stored(srv)


def test_ten_thousand_query_parameters_at_default_limits_are_refused(server):
    # With the default 8 KiB URL limit the URL itself is too long: still refused, nothing stored.
    target = "/?si=a&" + "&".join(f"p{i}=1" for i in range(10_000))
    reply, closed = exchange(server, track_request(target))
    assert_refusal(only_response(reply), 414, close=True)
    assert closed
    assert_nothing_stored(server)


def test_ten_thousand_body_parameters_are_400_too_many_properties(server):
    body = b"si=a&" + b"&".join(b"p%d" % i for i in range(10_000))
    assert len(body) < 64 * KIB
    reply, _ = exchange(server, form_post("/", body, headers=(("Connection", "close"),)))
    resp = only_response(reply)
    assert_refusal(resp, 400, reason="too many properties")
    assert_nothing_stored(server)
