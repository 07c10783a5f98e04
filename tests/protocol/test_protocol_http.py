"""HttpProtocol over a fake transport and a fake clock: exact bytes out for bytes in, every
deadline in milliseconds of no real time, the state table, and the hand-over of a live stream.
(The same protocol over real sockets is in tests/test_http_protocol.py.)"""
from __future__ import annotations

import logging

import pytest
from protocol_mocks import DATE, Harness, error, fixed_date, ok_eid  # noqa: F401 (fixture)

from otserver import http
from otserver.config import Config
from otserver.handler import Deferred, LiveStream
from otserver.live import LiveConnection
from otserver.protocol import (BODY, CLOSED, FAILED, HEAD, IDLE, LINGER, LINGER_S, OPEN,
                               STATE_NAMES, TRANSITIONS, WAIT, deadlines)

GET = b"GET /?si=a&sid=s HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def h() -> Harness:
    return Harness()


# ------------------------------------------------------------------ answers, exact bytes

def test_an_event_is_answered_only_after_its_commit(h):
    h.send(GET)
    assert h.transport.take() == b""  # nothing before the log has it
    assert len(h.writer.jobs) == 1
    h.writer.commit()
    assert h.transport.take() == ok_eid(1)
    assert not h.transport.closed and h.protocol._state == IDLE


def test_pipelined_requests_are_answered_in_order_in_one_write(h):
    h.send(GET + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
    assert h.transport.take() == b""  # the 404 waits behind the first event's commit
    h.writer.commit()
    not_found = (http.STATUS_LINES[404] + DATE + b"X-Content-Type-Options: nosniff\r\n"
                 b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 10\r\n\r\n"
                 b"not found\n")
    assert h.transport.take() == ok_eid(1) + not_found + ok_eid(2)


def test_connection_close_is_in_the_answer_and_nothing_after_it_is_run(h):
    h.send(b"GET /?si=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET)
    h.writer.commit()
    assert h.transport.take() == ok_eid(1, close=True)
    assert h.handler.eids.n == 1  # the request after it was never run
    # Bytes after the close are unread: half-close and drain them, so the kernel does not
    # reset the connection under the answer; then close.
    assert h.transport.eof_written and not h.transport.closed
    h.tick(LINGER_S)
    assert h.transport.closed
    assert h.statuses() == {"/ 200": 1}


def test_an_overloaded_writer_answers_503_with_retry_after_at_once(h):
    h.writer.full = True
    h.send(GET)
    assert h.transport.take() == error(
        503, "overloaded: too many events waiting for a commit", close=False,
        headers=b"Retry-After: 1\r\n")
    assert h.statuses()["/ 503"] == 1


def test_a_failed_commit_answers_503_storage_unavailable(h):
    h.send(GET)
    h.writer.commit(error="disk full")
    assert h.transport.take() == error(503, "storage unavailable: disk full", close=False,
                                       headers=b"Retry-After: 1\r\n")


def test_a_deferred_answer_to_a_closing_request_says_close_once():
    class Api:
        def handle(self, req):
            return Deferred(lambda done: done(http.render(200, b"{}", close=req.close)))

    h = Harness(api=Api())
    h.send(b"GET /api/v1/stats?si=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = h.transport.take()
    assert out.count(b"Connection: close\r\n") == 1 and out.endswith(b"\r\n\r\n{}")
    assert h.transport.closed


# ------------------------------------------------------------------ refusals, exact bytes

@pytest.mark.parametrize("data, reason", [
    (b"GET /?si=a HTTP/1.1\r\n\r\n", "an HTTP/1.1 request needs a Host header"),
    (b"GET /?si=a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host header"),
    (b"POST /?si=a HTTP/1.1\r\nContent-Length: 4\r\n\r\n", "an HTTP/1.1 request needs a Host header"),
])
def test_host_header_missing_or_repeated_is_400_at_the_head(h, data, reason):
    h.send(data)  # (with no Host and a Content-Length: refused before any body arrives)
    assert h.transport.take() == error(400, reason)
    assert h.writer.jobs == [] and h.transport.eof_written
    assert h.statuses()["/ 400"] == 1


def test_http_1_0_needs_no_host(h):
    h.send(b"GET /?si=a HTTP/1.0\r\n\r\n")
    h.writer.commit()
    assert h.transport.take() == ok_eid(1, close=True)


def test_a_raw_utf8_property_name_is_told_to_percent_encode_and_where(h):
    h.send("GET /?si=a&näme=v HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    out = h.transport.take()
    assert out.startswith(http.STATUS_LINES[400])
    assert (b"the request target holds byte 0xC3 at offset 8 (in the query, after '/?si=a&n'), "
            b"which must be percent-encoded: percent-encode property names and values as UTF-8 "
            b"(\xc3\xa4 is %C3%A4, a space %20)\n".replace(b"\xc3\xa4", "ä".encode())) in out
    assert h.writer.jobs == []


def test_a_framing_error_answers_after_the_answers_owed_then_lingers_and_closes(h):
    h.send(GET + b"GET /?si=a HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n")
    assert h.transport.take() == b"" and h.protocol._state == FAILED
    h.tick(60)  # no deadline while the answer before it is owed
    assert not h.transport.closed
    h.writer.commit()
    assert h.transport.take() == ok_eid(1) + error(
        400, "malformed HTTP request: Invalid character in Content-Length")
    assert h.transport.eof_written and h.protocol._state == LINGER
    h.tick(LINGER_S - 0.001)
    assert not h.transport.closed
    h.tick(0.001)
    assert h.transport.closed


# ------------------------------------------------------------------ chunked framing

def _chunked(body: bytes, size: int, extension: bytes = b"") -> bytes:
    chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(body[i:i + size]), extension, body[i:i + size])
                      for i in range(0, len(body), size))
    return (b"POST /?si=a HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")


def test_a_30_kb_body_in_1_byte_chunks_is_taken(h):
    body = b"p=" + b"x" * 8000 + b"&q=" + b"y" * 8000 + b"&r=" + b"z" * 8000 + b"&s=" + b"w" * 6000
    data = _chunked(body, 1)
    assert len(data) > 2 * Config().max_body_bytes + Config().max_url_bytes  # the old bound
    for start in range(0, len(data), 1460):  # as TCP segments arrive
        h.send(data[start:start + 1460])
    assert len(h.writer.jobs) == 1, h.transport.take()
    h.writer.commit()
    assert h.transport.take() == ok_eid(1)


def test_chunk_extensions_carrying_no_body_are_refused(h):
    data = _chunked(b"si=a&p=" + b"x" * 300, 1, b";" + b"e" * 200)  # 200 bytes per body byte
    for start in range(0, len(data), 100):
        h.send(data[start:start + 100])
        if h.transport.closed or h.transport.eof_written:
            break
    assert error(400, "too much chunked framing for the body it carries (more than 16 bytes "
                      "of chunk sizes and extensions per body byte)") in h.transport.take()
    assert h.writer.jobs == []


# ------------------------------------------------------------------ deadlines, no sleeping

def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(h):
    h.tick(Config().header_timeout_s - 0.001)
    assert not h.transport.closed and h.protocol._state == OPEN
    h.tick(0.001)
    assert h.transport.closed
    assert h.metrics.refusals["timeout"] == 0  # nothing began: no request timed out


def test_a_head_trickled_in_is_closed_at_the_header_timeout_and_counted(h):
    h.send(b"GET /?si=a HTTP/1.1\r\nHo")
    for _ in range(9):
        h.tick(1.0)
        h.send(b"")  # bytes that never finish the head do not move the deadline
    assert not h.transport.closed
    h.tick(1.0)
    assert h.transport.closed and h.metrics.refusals["timeout"] == 1


def test_a_body_never_finished_is_closed_at_the_body_timeout():
    h = Harness(Config(body_timeout_s=0.25))
    h.send(b"POST /?si=a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nsi=")
    assert h.protocol._state == BODY
    h.tick(0.249)
    assert not h.transport.closed
    h.tick(0.001)
    assert h.transport.closed and h.writer.jobs == []


def test_an_idle_kept_alive_connection_is_closed_at_the_keepalive_timeout():
    h = Harness(Config(keepalive_s=0.5))
    h.send(GET)
    h.writer.commit()
    h.transport.take()
    h.tick(0.499)
    assert not h.transport.closed and h.protocol._state == IDLE
    h.tick(0.001)
    assert h.transport.closed and h.metrics.refusals["timeout"] == 0


def test_a_keepalive_shorter_than_the_header_timeout_closes_on_time():
    h = Harness(Config(keepalive_s=1.0))  # the header timeout stays at its 10 s
    h.send(GET)
    h.writer.commit()
    h.tick(1.0)
    assert h.transport.closed


def test_a_new_request_on_a_kept_alive_connection_gets_the_header_timeout():
    h = Harness(Config(header_timeout_s=0.5, keepalive_s=3))
    h.send(GET)
    h.writer.commit()
    h.tick(2.0)  # idle, within keep-alive
    h.send(b"GET /?si=a HTTP/1.1\r\n")  # a slowloris on the reused connection
    h.tick(0.499)
    assert not h.transport.closed
    h.tick(0.001)
    assert h.transport.closed and h.metrics.refusals["timeout"] == 1


def test_no_deadline_while_an_answer_is_owed(h):
    h.send(GET)
    assert h.protocol._state == WAIT and h.protocol._deadline is None
    h.tick(3600)
    assert not h.transport.closed
    h.writer.commit()
    assert h.transport.take() == ok_eid(1)


def test_a_pipelined_head_waiting_on_our_answers_is_not_timed_out(h):
    h.send(GET + b"GET /?si=a HTTP/1.1\r\nHo")
    h.tick(Config().header_timeout_s * 2)  # answers are outstanding: the client waits on us
    assert not h.transport.closed


@pytest.mark.parametrize("text, seconds", [("1", 1.0), ("1s", 1.0), ("250ms", 0.25)])
def test_a_bare_number_timeout_is_seconds(text, seconds):
    from otserver.cli import build_config, build_parser
    config = build_config(build_parser().parse_args(["serve", "--header-timeout", text]), {})
    assert config.header_timeout_s == seconds
    h = Harness(config)
    h.tick(seconds - 0.001)
    assert not h.transport.closed
    h.tick(0.001)
    assert h.transport.closed


# ------------------------------------------------------------------ the state table

def test_every_state_has_a_deadline_rule_and_every_transition_lands_on_a_state():
    table = deadlines(Config())
    assert len(table) == len(STATE_NAMES)
    assert table[WAIT] is None and table[FAILED] is None and table[CLOSED] is None
    assert table[LINGER] == LINGER_S and table[HEAD] == Config().header_timeout_s
    assert table[IDLE] == Config().keepalive_s and table[BODY] == Config().body_timeout_s
    assert {target for target in TRANSITIONS.values()} <= set(range(len(STATE_NAMES)))


def test_an_impossible_transition_is_a_programming_error_answered_500(h, caplog):
    h.protocol._state = CLOSED  # as if a request began on a closed connection
    with caplog.at_level(logging.ERROR, "otserver"):
        h.send(GET)
    assert h.transport.take().startswith(http.STATUS_LINES[500])
    assert "request handling failed" in caplog.text


# ------------------------------------------------------------------ access log

def test_the_access_log_has_method_path_status_bytes_duration_and_the_stored_address(caplog):
    h = Harness(Config(access_log=True), peer="203.0.113.7")
    with caplog.at_level(logging.INFO, "otserver"):
        h.send(GET)
        h.loop.now += 0.0042
        h.writer.commit()
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("access ")]
    assert line == [f"access 203.0.113.0 GET / 200 {len(ok_eid(1))} 4.20ms"]


def test_the_access_log_shows_no_address_when_none_is_captured(caplog):
    h = Harness(Config(access_log=True, capture_ip=False))
    with caplog.at_level(logging.INFO, "otserver"):
        h.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert any(r.getMessage().startswith("access - GET /x 404 ") for r in caplog.records)


# ------------------------------------------------------------------ live streams

def test_a_live_stream_is_handed_over_after_the_answers_before_it():
    class Api:
        def handle(self, req):
            return LiveStream("a", None)

    h = Harness(api=Api())
    h.send(GET + b"GET /api/v1/live?si=a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.transport.protocol is None  # the event's answer is owed first
    h.writer.commit()
    out = h.transport.take()
    assert out == ok_eid(1) + http.SSE_HEAD + DATE + b"\r\n: live\n\n"
    live = h.transport.protocol
    assert isinstance(live, LiveConnection) and live in h.connections
    assert h.protocol not in h.connections and len(h.live) == 1
    live.push_live(b"id: 7\ndata: {}\n\n")
    assert h.transport.take() == b"id: 7\ndata: {}\n\n"
    live.connection_lost(None)
    assert len(h.live) == 0 and live not in h.connections
