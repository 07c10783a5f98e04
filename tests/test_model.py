"""Pure units: eids, property decoding, id resolution, folds, settings."""
from __future__ import annotations

import uuid

import pytest

from otserver.config import Config, from_env, parse_duration, parse_size
from otserver.errors import BadRequest
from otserver.model import (EidGenerator, eid_to_key, fold, folded_record, ident_key,
                            key_to_eid, make_event, parse_properties)

CONFIG = Config()


def test_eids_are_uuid7_strictly_increasing_even_within_one_millisecond():
    gen = EidGenerator()
    out = [gen.next(1_700_000_000_000) for _ in range(10_000)]
    texts = [eid for eid, _, _ in out]
    keys = [key for _, key, _ in out]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for eid, key, ms in out[:50]:
        u = uuid.UUID(eid)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert str(u) == eid and u.bytes == key
        assert int.from_bytes(key[:6], "big") == ms
    assert eid_to_key(texts[0]) == keys[0] and key_to_eid(keys[0]) == texts[0]


def test_eids_move_forward_when_the_clock_goes_back():
    gen = EidGenerator()
    _, first, _ = gen.next(2_000_000)
    _, second, ms = gen.next(1_000_000)
    assert second > first and ms == 2_000_000


def test_properties_decode_plus_percent_and_last_name_wins():
    props = parse_properties(b"a=1&b=x+y%21&a=2&&c", CONFIG)
    assert props == {"a": "2", "b": "x y!", "c": ""}


@pytest.mark.parametrize("raw, words", [
    (b"a%20b=1", "bad property name"),
    (b"=1", "empty property name"),
    (b"n=%FF", "property n: value is not valid UTF-8"),
    (b"n=%zz", "bad percent-encoding"),
    (b"x" * 129 + b"=1", "bad property name"),
    (b"n=" + b"v" * (8 * 1024 + 1), "property n: value longer"),
    (b"&".join(b"p%d=1" % i for i in range(257)), "too many properties"),
])
def test_bad_properties_are_refused_naming_the_problem(raw, words):
    with pytest.raises(BadRequest) as info:
        parse_properties(raw, CONFIG)
    assert words in info.value.reason


@pytest.mark.parametrize("given, sid_is, uid_is", [
    ({}, "eid", "eid"),
    ({"sid": "S"}, "S", "S"),
    ({"uid": "U"}, "eid", "U"),
    ({"sid": "S", "uid": "U"}, "S", "U"),
    ({"sid": "", "uid": ""}, "eid", "eid"),
])
def test_id_resolution_follows_the_seed_table(given, sid_is, uid_is):
    ev = make_event({"si": "site", **given}, None, EidGenerator(), 1, CONFIG)
    assert ev.sid == (ev.eid if sid_is == "eid" else sid_is)
    assert ev.uid == (ev.eid if uid_is == "eid" else uid_is)
    assert "sid" not in ev.props and "uid" not in ev.props and "si" not in ev.props


@pytest.mark.parametrize("name", ["eid", "unixtimestamp"])
def test_server_assigned_names_are_refused(name):
    with pytest.raises(BadRequest, match=name):
        make_event({"si": "s", name: "x"}, None, EidGenerator(), 1, CONFIG)


def test_fold_keeps_last_values_and_first_utm_values():
    gen = EidGenerator()
    a = make_event({"si": "s", "sid": "1", "utm_source": "ads", "page": "/a"}, None, gen, 10, CONFIG)
    b = make_event({"si": "s", "sid": "1", "utm_source": "mail", "page": "/b", "x": "1"}, None, gen, 20, CONFIG)
    record = fold(fold(None, a, "1", "1"), b, "1", "1")
    flat = folded_record(record, "session")
    assert flat["utm_source"] == "ads" and flat["page"] == "/b" and flat["x"] == "1"
    assert flat["eid"] == b.eid and flat["unixtimestamp"] == 20
    assert record[2] == 10 and record[3] == 2  # first seen, count


def test_long_ids_are_hashed_and_cannot_collide_with_short_ones():
    long_id = "é" * 255
    key = ident_key(long_id)
    assert len(key) == 17 and key[0] == 0xFF
    assert ident_key("short") == b"short"


def test_settings_take_units_and_environment():
    assert parse_duration("60d") == 60 * 86400 and parse_duration("90s") == 90
    assert parse_duration("12h") == 12 * 3600
    assert parse_size("1MiB") == 1 << 20 and parse_size("512") == 512
    config = from_env({"OTSERVER_PORT": "9000", "OTSERVER_TTL": "12h",
                       "OTSERVER_CAPTURE_IP": "0", "OTSERVER_MAX_BODY_BYTES": "1KiB"})
    assert (config.port, config.ttl_s, config.capture_ip, config.max_body_bytes) == (9000, 43200, False, 1024)
    with pytest.raises(ValueError, match="OTSERVER_TTL"):
        from_env({"OTSERVER_TTL": "soon"})
