"""CSV of a site's events: csvformat's columns, quoting, UTF-8 and formula-injection guard as
exact bytes; `otserver export --format csv` against a real store, parsed back with
csv.DictReader to the events sent; and (last section) `GET /api/v1/events?format=csv`."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from urllib.parse import urlencode

import pytest

from otserver import admin
from otserver.config import from_env
from otserver.csvformat import (FIXED, check_columns, columns_for, csv_header, csv_rows,
                                parse_columns)
from otserver.store import open_store

LEADS = ("=", "+", "-", "@", "\t", "\r")


def payload(ts=1, eid="e1", si="s.example", sid="s1", uid="u1", captured=None, **props):
    record = {"unixtimestamp": ts, "si": si, **props, "eid": eid, "sid": sid, "uid": uid}
    return {"event": record, "captured": captured or {}}


def parse(data: bytes) -> list[list[str]]:
    assert not data.startswith(b"\xef\xbb\xbf")  # no BOM
    return list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))


# --------------------------------------------------------------------------- csvformat

def test_exact_bytes_of_a_header_and_rows():
    events = [payload(a='x,"y"', captured={"ip": "1.2.3.0"}),
              payload(ts=2, eid="e2", b="line\nbreak", c="cr\rhere")]
    columns = columns_for(events)
    assert columns == [*FIXED, "a", "b", "c", "captured.ip"]
    assert csv_header(columns) == b"unixtimestamp,eid,si,sid,uid,a,b,c,captured.ip\r\n"
    assert csv_rows(events, columns) == (
        b'1,e1,s.example,s1,u1,"x,""y""",,,1.2.3.0\r\n'
        b'2,e2,s.example,s1,u1,,"line\nbreak","cr\rhere",\r\n')


def test_values_round_trip_through_a_csv_reader():
    values = ["plain", "a,b", 'say "hi"', "two\nlines", "crlf\r\nin it", ",", '"', "",
              "trailing space ", "ünïcödé ✓ 日本語 \u2028 🎉"]
    events = [payload(eid=f"e{i}", v=value) for i, value in enumerate(values)]
    columns = columns_for(events)
    rows = parse(csv_header(columns) + csv_rows(events, columns))
    assert rows[0] == [*FIXED, "v"]
    assert [row[-1] for row in rows[1:]] == values
    assert "ünïcödé ✓ 日本語".encode() in csv_rows(events, columns)  # UTF-8, not escaped


@pytest.mark.parametrize("lead", LEADS)
def test_a_cell_that_could_start_a_formula_gets_a_quote_mark(lead):
    text = lead + "1+2"
    events = [payload(sid=text, v=text, w="a" + text)]
    columns = columns_for(events)
    row = parse(csv_rows(events, columns))[0]
    assert row[columns.index("sid")] == "'" + text
    assert row[columns.index("v")] == "'" + text
    assert row[columns.index("w")] == "a" + text  # only a leading character counts


def test_negative_numbers_are_prefixed_too_and_other_cells_are_not():
    events = [payload(n="-5", p="+1", m="5", x="'quoted", lf="\nfirst")]
    columns = columns_for(events)
    row = dict(zip(columns, parse(csv_rows(events, columns))[0]))
    assert row["n"] == "'-5" and row["p"] == "'+1"
    assert row["m"] == "5" and row["x"] == "'quoted" and row["lf"] == "\nfirst"


def test_booleans_and_numbers_are_written_as_in_the_json():
    events = [payload(ts=1796183259377, captured={"bot": True, "seen": False, "n": 3})]
    columns = columns_for(events)
    assert csv_rows(events, columns) == b"1796183259377,e1,s.example,s1,u1,true,false,3\r\n"


def test_header_names_are_guarded_too():
    header = parse(csv_header(["=cmd", "@x", "ok", "captured.ip"]))[0]
    assert header == ["'=cmd", "'@x", "ok", "captured.ip"]


def test_columns_fixed_first_then_properties_then_captured_in_first_appearance_order():
    events = [
        payload(z="1", a="2", captured={"ip": "1.1.1.0"}),
        payload(m="3", z="4", captured={"user_agent": "UA", "ip": "1.1.1.0"}),
        payload(b="5", captured={"referer": "https://r/"}),
    ]
    assert columns_for(events) == [*FIXED, "z", "a", "m", "b", "captured.ip",
                                   "captured.user_agent", "captured.referer"]
    assert columns_for([]) == list(FIXED)
    assert columns_for(iter(events)) == columns_for(events)  # any iterable, read once


def test_a_captured_column_reads_the_captured_field_never_a_property():
    events = [payload(**{"captured.ip": "6.6.6.6", "note": "forged"}),
              payload(eid="e2", captured={"ip": "1.2.3.0"})]
    columns = columns_for(events)
    assert columns == [*FIXED, "note", "captured.ip"]
    rows = parse(csv_rows(events, columns))
    assert [row[-1] for row in rows] == ["", "1.2.3.0"]


def test_wanted_columns_are_exactly_those_and_missing_values_are_empty():
    events = [payload(a="1", captured={"ip": "1.2.3.0"}), payload(eid="e2", b="2")]
    wanted = ["b", "eid", "captured.ip", "nosuch", "captured.user_agent"]
    columns = columns_for(events, wanted)
    assert columns == wanted
    assert csv_header(columns) == b"b,eid,captured.ip,nosuch,captured.user_agent\r\n"
    assert csv_rows(events, columns) == b",e1,1.2.3.0,,\r\n2,e2,,,\r\n"


@pytest.mark.parametrize("wanted, named", [
    (["a", ""], "column 2 is empty"),
    (["a b"], "'a b'"),
    (["ünï"], "'ünï'"),
    (["tab\there"], "'tab\\there'"),
    (["x" * 129], "x" * 40),
    (["a", "b", "a"], "'a' is given twice"),
    (["captured."], "'captured.'"),
    ([f"c{i}" for i in range(257)], "too many columns: 257"),
    ([], "no columns"),
])
def test_a_bad_column_is_refused_by_name(wanted, named):
    with pytest.raises(ValueError) as caught:
        columns_for([payload()], wanted)
    assert named in str(caught.value)


def test_the_longest_name_and_the_most_columns_are_taken():
    assert check_columns(["x" * 128]) == ["x" * 128]
    assert len(check_columns([f"c{i}" for i in range(256)])) == 256
    assert check_columns(["!~", "utm_source", "captured.ip"]) == ["!~", "utm_source",
                                                                  "captured.ip"]


def test_parse_columns():
    assert parse_columns(None) is None
    assert parse_columns("") is None
    assert parse_columns("eid,page,captured.ip") == ["eid", "page", "captured.ip"]
    for bad, named in (("a,,b", "column 2 is empty"), ("a,", "column 2 is empty"),
                       ("a, b", "' b'"), ("x,x", "'x' is given twice")):
        with pytest.raises(ValueError, match="column") as caught:
            parse_columns(bad)
        assert named in str(caught.value)


# --------------------------------------------------------------------------- the CLI

SITE = "csv.example"
UA = {"User-Agent": "CsvTest/1 (x, y)", "Referer": "https://ref.example/a,b"}
SENT = [  # (headers, properties): sid and uid given, so every id is known
    ({}, {"sid": "s1", "uid": "u1", "page": "/", "title": "Home"}),
    (UA, {"sid": "s1", "uid": "u1", "note": 'has, commas\nnew lines\r\nand "quotes"',
          "page": "/p"}),
    ({}, {"sid": "s2", "uid": "u2", "text": "ünïcödé ✓ 日本語 🎉", "formula": "=HYPERLINK(1)",
          "n": "-5"}),
    ({}, {"sid": "s2", "uid": "u2", "last": "only in the last event"}),
]
PROPERTIES = ["page", "title", "note", "text", "formula", "n", "last"]


def shown(text: str) -> str:
    return "'" + text if text.startswith(LEADS) else text


def cli(*args: str) -> subprocess.CompletedProcess:
    """`otserver ARGS` with stdout as bytes (CRLF must reach the test untranslated)."""
    done = subprocess.run([sys.executable, "-m", "otserver", *args], capture_output=True,
                          timeout=60)
    done.stderr = done.stderr.decode("utf-8", "replace")
    return done


def world(server) -> tuple[list[str], list[dict]]:
    """Send SENT; the header and rows a CSV of them must parse back to (times, and captured
    fields the read API derives, such as browser from User-Agent, from the store's NDJSON)."""
    eids = []
    for headers, props in SENT:
        resp = server.track(headers, si=SITE, **props)
        assert resp.status == 200, resp
        eids.append(resp.text)
    server.track(si="other.example", sid="s1", uid="u1", secret="not this site")
    ndjson = cli("export", "--si", SITE, "--data-dir", str(server.data_dir))
    assert ndjson.returncode == 0, ndjson.stderr
    stored = [json.loads(line) for line in ndjson.stdout.decode().split("\n")[:-1]]
    assert [p["event"]["eid"] for p in stored] == eids
    captured = list(dict.fromkeys(name for item in stored for name in item["captured"]))
    assert captured[0] == "ip"  # the first event's only one (http.client sends no User-Agent)
    header = [*FIXED, *PROPERTIES, *("captured." + name for name in captured)]
    expected = []
    for (headers, props), eid, item in zip(SENT, eids, stored):
        assert item["captured"]["ip"] == "127.0.0.0"  # anonymised by default
        assert item["captured"].get("user_agent") == headers.get("User-Agent")
        assert item["captured"].get("referer") == headers.get("Referer")
        row = dict.fromkeys(header, "")
        row.update({name: shown(value) for name, value in props.items()})
        row.update(unixtimestamp=str(item["event"]["unixtimestamp"]), eid=eid, si=SITE)
        row.update({"captured." + name: json.dumps(value) if isinstance(value, bool)
                    else shown(str(value)) for name, value in item["captured"].items()})
        expected.append(row)
    return header, expected


def dict_rows(data: bytes) -> tuple[list[str], list[dict]]:
    assert not data.startswith(b"\xef\xbb\xbf")
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def test_export_csv_parses_back_to_the_events_sent(make_server):
    server = make_server()
    want_header, expected = world(server)
    done = cli("export", "--si", SITE, "--format", "csv", "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    assert "exported 4 events" in done.stderr
    header, rows = dict_rows(done.stdout)
    assert header == want_header
    assert header[:len(FIXED) + len(PROPERTIES) + 3] == [
        *FIXED, *PROPERTIES, "captured.ip", "captured.user_agent", "captured.referer"]
    assert rows == expected
    assert done.stdout.startswith(",".join(want_header).encode() + b"\r\n")
    assert done.stdout.endswith(b"\r\n")
    assert "ünïcödé ✓ 日本語 🎉".encode() in done.stdout
    assert b'"has, commas\nnew lines\r\nand ""quotes"""' in done.stdout
    assert b",'=HYPERLINK(1),'-5," in done.stdout

    # the same bytes whatever the page size (the column pass and the write pass page too)
    config = from_env({}).replace(data_dir=str(server.data_dir))
    store = open_store(config)
    try:
        for page in (1, 2, 3, 4, 5):
            out = io.BytesIO()
            assert admin.export(store, config, SITE, None, None, fmt="csv", out=out,
                                err=io.StringIO(), page=page) == 0
            assert out.getvalue() == done.stdout, page
    finally:
        store.close()

    # the default is NDJSON, as before
    default = cli("export", "--si", SITE, "--data-dir", str(server.data_dir))
    ndjson = cli("export", "--si", SITE, "--format", "ndjson", "--data-dir",
                 str(server.data_dir))
    assert default.stdout == ndjson.stdout and default.stdout.count(b"\n") == 4


def test_export_csv_with_columns_and_time_range(make_server):
    server = make_server()
    _, expected = world(server)
    columns = ["eid", "note", "captured.user_agent", "nosuch", "n"]
    done = cli("export", "--si", SITE, "--format", "csv", "--columns", ",".join(columns),
               "--data-dir", str(server.data_dir))
    assert done.returncode == 0, done.stderr
    header, rows = dict_rows(done.stdout)
    assert header == columns
    assert rows == [{name: row.get(name, "") for name in columns} for row in expected]

    ts = [int(row["unixtimestamp"]) for row in expected]
    part = cli("export", "--si", SITE, "--format", "csv", "--from", str(ts[1]), "--to",
               str(ts[3]), "--data-dir", str(server.data_dir))
    assert part.returncode == 0, part.stderr
    header, rows = dict_rows(part.stdout)
    inside = [row for row in expected if ts[1] <= int(row["unixtimestamp"]) < ts[3]]
    assert rows == [{name: row[name] for name in header} for row in inside]
    assert "last" not in header  # the union over what is exported, not over the site

    none = cli("export", "--si", "nobody.example", "--format", "csv", "--data-dir",
               str(server.data_dir))
    assert none.returncode == 0 and none.stdout == ",".join(FIXED).encode() + b"\r\n"
    fixed = cli("export", "--si", "nobody.example", "--format", "csv", "--columns", "eid,x",
                "--data-dir", str(server.data_dir))
    assert fixed.returncode == 0 and fixed.stdout == b"eid,x\r\n"


def test_export_refuses_bad_flags_naming_them(make_server):
    server = make_server()
    assert server.track(si=SITE, page="/").status == 200
    for args, message in [
        (("--format", "csv", "--columns", "a,,b"), "--columns: column 2 is empty"),
        (("--format", "csv", "--columns", "a,a"), "--columns: column 'a' is given twice"),
        (("--format", "csv", "--columns", "a b"), "--columns: column 'a b'"),
        (("--columns", "eid"), "--columns needs --format csv"),
        (("--format", "xml"), "invalid choice: 'xml'"),
    ]:
        done = cli("export", "--si", SITE, *args, "--data-dir", str(server.data_dir))
        assert done.returncode != 0, args
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == b""


# --------------------------------------------------------------------------- the read API
#
# GET /api/v1/events?si=S&format=csv[&columns=...]


def listing(server, token, **params):
    return server.api("/api/v1/events?" + urlencode(params), token)


def ndjson_page(resp) -> list[dict]:
    assert resp.status == 200, resp
    return [json.loads(line) for line in resp.body.decode().split("\n")[:-1]]


def assert_csv(resp):
    assert resp.status == 200, resp
    assert resp.headers["content-type"] == "text/csv; charset=utf-8", resp.headers
    assert "access-control-allow-origin" not in resp.headers


def assert_error_naming(resp, word: str) -> None:
    assert resp.status == 400, resp
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    assert word in resp.json()["error"], resp.json()


def test_api_csv_pages_are_the_ndjson_pages_as_csv(make_server):
    server = make_server()
    _, expected = world(server)
    token = server.create_token(SITE)
    after = None
    seen = []
    for _ in range(10):
        params = dict(si=SITE, limit="3", **({"after": after} if after else {}))
        page = ndjson_page(listing(server, token, **params))
        resp = listing(server, token, format="csv", **params)
        assert_csv(resp)
        columns = columns_for(page)  # each page's own columns
        assert resp.body == csv_header(columns) + csv_rows(page, columns)
        header, rows = dict_rows(resp.body)
        assert header == columns
        seen += rows
        if not page:
            assert "x-next-after" not in resp.headers
            assert resp.body == ",".join(FIXED).encode() + b"\r\n"  # the header only
            break
        after = resp.headers["x-next-after"]
        assert after == listing(server, token, **params).headers["x-next-after"]
    else:
        raise AssertionError("the listing never ended")
    assert len(seen) == len(expected)
    for row, want in zip(seen, expected):  # a page lists the columns of its own events
        assert {k: v for k, v in row.items() if v} == {k: v for k, v in want.items() if v}

    explicit = listing(server, token, si=SITE, format="ndjson")
    assert explicit.body == listing(server, token, si=SITE).body


def test_api_csv_with_columns(make_server):
    server = make_server()
    _, expected = world(server)
    token = server.create_token(SITE)
    columns = ["eid", "note", "captured.ip", "nosuch"]
    resp = listing(server, token, si=SITE, format="csv", columns=",".join(columns))
    assert_csv(resp)
    header, rows = dict_rows(resp.body)
    assert header == columns
    assert rows == [{name: row.get(name, "") for name in columns} for row in expected]
    last = resp.headers["x-next-after"]
    empty = listing(server, token, si=SITE, format="csv", columns="eid,x", after=last)
    assert_csv(empty)
    assert empty.body == b"eid,x\r\n" and "x-next-after" not in empty.headers


def test_api_csv_refusals_name_the_parameter(make_server):
    server = make_server()
    token = server.create_token(SITE)
    assert server.track(si=SITE, page="/").status == 200
    assert_error_naming(listing(server, token, si=SITE, format="xml"), "format")
    for bad in ("a,,b", "a b", "x,x", ",".join(f"c{i}" for i in range(257))):
        assert_error_naming(listing(server, token, si=SITE, format="csv", columns=bad),
                            "column")
    assert listing(server, None, si=SITE, format="csv").status == 401
