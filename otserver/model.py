"""The data model, pure: properties -> Event, id resolution, UUIDv7 eids, record folding, keys.

Invariants kept here:
- A property name is 1..max_name_chars printable ASCII (0x21-0x7E) after percent-decoding; a
  value is valid UTF-8 of at most max_value_bytes after decoding ('+' is a space).
- `eid` and `unixtimestamp` come only from the server; `si` is required; an empty `sid` or `uid`
  is absent. Ids resolve exactly as the seed document says (see `make_event`).
- Eids are UUIDv7 (RFC 9562), strictly increasing within a process.
- A log entry is `ts(8) kind(1) id(16) msgpack(body)`: the time and the id sit at fixed offsets,
  so the log can clamp a time, index an id and binary-search by time without unpacking.
- Session and user records are folds: later values overwrite, except names starting with `utm_`,
  which keep their first value (campaign attribution).
"""
from __future__ import annotations

import json
import os
import random
import time
from codecs import escape_decode
from hashlib import blake2b

import msgpack

from .errors import BadRequest

packb = msgpack.Packer(use_bin_type=True).pack  # one Packer: no allocation per call
unpackb = msgpack.unpackb

PRINTABLE_ASCII = bytes(range(0x21, 0x7F))
MAX_PAIRS_PER_PROPERTY = 16  # name=value pairs allowed per distinct property (repeats)
SERVER_ASSIGNED = ("eid", "unixtimestamp")


# --------------------------------------------------------------------------- properties

def _show(raw: bytes, limit: int = 40) -> str:
    """Bytes as they may be quoted back in a refusal: printable ASCII, escaped, truncated."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    text = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(raw) > limit else "")


def _unquote(raw: bytes, name: bytes | None = None) -> bytes:
    """Percent- and plus-decode a name (name=None) or the value of property `name`.
    A '%' not followed by two hex digits is refused.

    The decoding is C's: with its backslashes doubled and each '%' turned into '\\x', the
    text is exactly what codecs.escape_decode reads back to the bytes meant, and what it
    cannot read is what a '%' with no two hex digits after it makes. (2.5 µs instead of 4.2
    for the loop over pieces it replaced, on five of the bench's values.)"""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    escaped = raw.replace(b"\\", b"\\\\") if b"\\" in raw else raw
    try:
        return escape_decode(escaped.replace(b"%", b"\\x"))[0]
    except ValueError:
        what = f"property name '{_show(raw)}'" if name is None else f"property {_show(name)}"
        raise BadRequest(f"bad percent-encoding in {what}") from None


_valid_names: dict[bytes, str] = {}  # decoded name bytes -> str, for names seen valid


def _check_name(name: bytes) -> str:
    if not name:
        raise BadRequest("empty property name")
    if name.translate(None, PRINTABLE_ASCII):
        raise BadRequest(f"bad property name '{_show(name)}': printable ASCII characters, no spaces")
    return name.decode("ascii")


def _property_name(name: bytes, max_name: int) -> str:
    """A decoded property name checked by SPEC 2.2's rules (and remembered when valid)."""
    if len(name) > max_name:
        raise BadRequest(f"bad property name '{_show(name)}': longer than {max_name} characters")
    key = _check_name(name)
    if len(_valid_names) < 4096:
        _valid_names[name] = key
    return key


def parse_properties(raw: bytes, config, into: dict | None = None) -> dict:
    """Decode one url-encoded property set (`a=1&b=2`) into `into` (a new dict by default).

    Empty segments (`a=1&&b=2`, a trailing `&`) are skipped. A name given twice: the last wins.
    Raises BadRequest naming the property for every rule of SPEC 2.2.
    """
    props = {} if into is None else into
    if not raw:
        return props
    parts = raw.split(b"&")
    if len(parts) > MAX_PAIRS_PER_PROPERTY * config.max_properties:  # bound the work first
        raise BadRequest(f"too many properties: at most {config.max_properties} per event "
                         f"(and {MAX_PAIRS_PER_PROPERTY * config.max_properties} name=value pairs)")
    max_name = config.max_name_chars
    max_value = config.max_value_bytes
    names = _valid_names
    for part in parts:
        if not part:
            continue
        name, _, value = part.partition(b"=")
        if b"%" in part or b"+" in part:
            name = _unquote(name)
            value = _unquote(value, name)
        key = names.get(name)  # the common case inline: a name seen valid before
        if key is None or len(key) > max_name:
            key = _property_name(name, max_name)
        if len(value) > max_value:
            raise BadRequest(f"property {key}: value longer than {max_value} bytes")
        try:
            props[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"property {key}: value is not valid UTF-8") from None
    if len(props) > config.max_properties:
        raise BadRequest(f"too many properties: at most {config.max_properties} per event")
    return props


def _json_number(text: str) -> str:
    return text  # a number keeps the text it was sent as (1.50 stays 1.50)


def _json_constant(name: str):
    raise BadRequest(f"{name} is not JSON")


def parse_json(body: bytes):
    """A JSON body, numbers kept as their text. BadRequest says where it is not JSON."""
    try:
        return json.loads(body.decode("utf-8"), parse_int=_json_number,
                          parse_float=_json_number, parse_constant=_json_constant)
    except UnicodeDecodeError:
        raise BadRequest("the JSON body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None


def json_properties(obj, config, into: dict | None = None) -> dict:
    """One JSON object of properties into `into` (a new dict by default), by the rules of
    `parse_properties`: strings as they are, numbers as the text they were sent as, booleans
    as true/false; null, arrays and objects are refused naming the property."""
    if not isinstance(obj, dict):
        raise BadRequest("a JSON event is an object of properties: {\"si\": \"...\", ...}")
    props = {} if into is None else into
    max_name, max_value = config.max_name_chars, config.max_value_bytes
    for key, value in obj.items():
        _property_name(key.encode("utf-8", "surrogatepass"), max_name)
        if value is True or value is False:
            value = "true" if value else "false"
        elif not isinstance(value, str):
            kind = "null" if value is None else "an array" if isinstance(value, list) else \
                "an object"
            raise BadRequest(f"property {key}: {kind} is not a property value "
                             "(send a string, a number or a boolean)")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate (\ud800) in the JSON text
            raise BadRequest(f"property {key}: value is not valid UTF-8") from None
        if size > max_value:
            raise BadRequest(f"property {key}: value longer than {max_value} bytes")
        props[key] = value
    if len(props) > config.max_properties:
        raise BadRequest(f"too many properties: at most {config.max_properties} per event")
    return props


# --------------------------------------------------------------------------- eids

class EidGenerator:
    """UUIDv7 with a monotonic random tail (RFC 9562, 6.2 method 3).

    A fresh random 74-bit tail each millisecond, incremented within it, so eids are unique
    across processes (random) and strictly increasing within one (ordered). The random source
    is a PRNG seeded from the OS at start and after fork: no syscall per eid.
    """

    __slots__ = ("_last_ms", "_seq", "_rand")

    def __init__(self) -> None:
        self._last_ms = 0
        self._seq = 0
        self._rand = random.Random(os.urandom(32))
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._rand.seed(os.urandom(32))
        self._last_ms = 0

    def next(self, now_ms: int) -> tuple[str, bytes, int]:
        """-> (eid text, 16-byte key, the millisecond it carries)."""
        if now_ms > self._last_ms:
            self._last_ms = now_ms
            self._seq = self._rand.getrandbits(73)  # half the space: room to count up
        else:
            self._seq += 1
            if self._seq >> 74:
                self._last_ms += 1
                self._seq = self._rand.getrandbits(73)
            now_ms = self._last_ms
        seq = self._seq
        n = (now_ms << 80) | 0x7000 << 64 | (seq >> 62) << 64 | 0x8000000000000000 | (seq & 0x3FFFFFFFFFFFFFFF)
        h = "%032x" % n
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", n.to_bytes(16, "big"), now_ms


def eid_to_key(eid: str) -> bytes | None:
    """The 16-byte key of an eid given as text, or None when it is not a UUID."""
    if len(eid) != 36 or eid[8] != "-" or eid[13] != "-" or eid[18] != "-" or eid[23] != "-":
        return None
    try:
        return bytes.fromhex(eid.replace("-", ""))
    except ValueError:
        return None


def key_to_eid(key: bytes) -> str:
    h = key.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- events

class Event:
    """One event, resolved: ready to be stored and folded."""

    __slots__ = ("eid", "key", "ts", "si", "sid", "uid", "props", "captured")

    def __init__(self, eid, key, ts, si, sid, uid, props, captured):
        self.eid = eid
        self.key = key
        self.ts = ts
        self.si = si
        self.sid = sid
        self.uid = uid
        self.props = props
        self.captured = captured

    def record(self) -> dict:
        return event_record(self.eid, self.ts, self.si, self.sid, self.uid, self.props)

    @property
    def utm(self) -> tuple:
        return utm_names(self.props)

    def encode(self) -> bytes:
        """The event as a log entry (see LogEntry)."""
        return b"".join((self.ts.to_bytes(8, "big"), KIND_EVENT, self.key,
                         packb([self.si, self.sid, self.uid, self.props, self.captured])))


# --------------------------------------------------------------------------- log entries
#
# Every entry of the log is   ts(8, big-endian ms) kind(1) id(16) msgpack(body)
#   kind b"E", an event:      id = the eid's 16 bytes; body [si, sid, uid, props, captured]
#   kind b"X", an erasure:    id = a fresh UUIDv7;     body [si, uid]  (erase that user's events
#                             logged before this entry; see views.Views.erase_user)

KIND_EVENT, KIND_ERASURE = b"E", b"X"
TS_END, KIND_END, ID_END = 8, 9, 25  # offsets of the fixed fields


def encode_erasure(key: bytes, ts: int, si: str, uid: str) -> bytes:
    return b"".join((ts.to_bytes(8, "big"), KIND_ERASURE, key, packb([si, uid])))


def entry_ts(value: bytes) -> int:
    return int.from_bytes(value[:TS_END], "big")


class LogEntry:
    """One entry of the log, decoded: an event, or an erasure (sid, props, captured None)."""

    __slots__ = ("position", "ts", "kind", "key", "si", "sid", "uid", "props", "captured", "utm")

    def __init__(self, position: int, value: bytes):
        self.position = position
        self.ts = int.from_bytes(value[:TS_END], "big")
        self.kind = value[TS_END:KIND_END]
        self.key = value[KIND_END:ID_END]
        body = unpackb(value[ID_END:])
        if self.kind == KIND_EVENT:
            self.si, self.sid, self.uid, self.props, self.captured = body
            # (no "utm_" in the entry's bytes: no such name; one search over ~300 bytes)
            self.utm = utm_names(self.props) if b"utm_" in value else ()
        else:
            self.si, self.uid = body
            self.sid = self.props = self.captured = None
            self.utm = ()

    @property
    def eid(self) -> str:
        return key_to_eid(self.key)

    @property
    def is_event(self) -> bool:
        return self.kind == KIND_EVENT

    def counted(self) -> bool:
        """Opentracker's `increment=false`: stored, but not counted in the stats."""
        return self.props.get("increment") != "false"

    def record(self) -> dict:
        return event_record(self.eid, self.ts, self.si, self.sid, self.uid, self.props)


def _take_id(props: dict, name: str, max_chars: int) -> str | None:
    value = props.pop(name, None)
    if not value:
        return None
    if len(value) > max_chars:
        raise BadRequest(f"property {name}: longer than {max_chars} characters")
    return value


def make_event(props: dict, captured: dict | None, eids: EidGenerator, ts_ms: int, config) -> Event:
    """Validate the reserved properties and resolve ids (SPEC 2.3, the seed's table):

    | given         | eid | sid          | uid   |
    | si            | new | = eid        | = eid |
    | si, sid       | new | given        | = sid |
    | si, uid       | new | = eid        | given |
    | si, sid, uid  | new | given        | given |

    `props` is consumed: si, sid and uid are taken out of it.
    """
    for name in SERVER_ASSIGNED:
        if name in props:
            raise BadRequest(f"property {name} is assigned by the server and cannot be sent")
    max_id = config.max_id_chars
    si = _take_id(props, "si", max_id)
    if si is None:
        raise BadRequest("missing required property: si")
    sid = _take_id(props, "sid", max_id)
    uid = _take_id(props, "uid", max_id)
    eid, key, ts = eids.next(ts_ms)
    if uid is None:
        uid = sid or eid
    if sid is None:
        sid = eid
    return Event(eid, key, ts, si, sid, uid, props, captured)


def event_record(eid: str, ts: int, si: str, sid: str, uid: str, props: dict) -> dict:
    """The flat record of the seed document."""
    record = {"unixtimestamp": ts, "si": si}
    record.update(props)
    record["eid"] = eid
    record["sid"] = sid
    record["uid"] = uid
    return record


# --------------------------------------------------------------------------- folds
#
# A session or user record is a list, stored as msgpack:
#   [si, own id, first_ts, event_count, last_ts, last eid (its 16 bytes), other id, props,
#    captured, tail]
# where "own id" is the sid of a session (the uid of a user) and "other id" the last event's uid
# (sid). props and captured are dicts folded event by event. A session's `tail` holds the log
# positions of its latest events (event_count % SESSION_CHUNK of them, 8 bytes each); every full
# SESSION_CHUNK of positions moves to the session_chunks database (see views.py).

R_SI, R_ID, R_FIRST, R_COUNT, R_LAST, R_EID, R_OTHER, R_PROPS, R_CAPTURED, R_TAIL = range(10)
SESSION_CHUNK = 64
POSITION_BYTES = 8


def position_bytes(position: int) -> bytes:
    return position.to_bytes(POSITION_BYTES, "big")


def split_positions(raw: bytes) -> list[int]:
    """A run of 8-byte positions (a session's tail or chunk) as integers."""
    return [int.from_bytes(raw[i:i + POSITION_BYTES], "big")
            for i in range(0, len(raw), POSITION_BYTES)]


def utm_names(props: dict) -> tuple:
    """The names starting with `utm_` (one C-speed search first: most events have none)."""
    if "\0utm_" not in "\0" + "\0".join(props):
        return ()
    return tuple(name for name in props if name.startswith("utm_"))


def fold(record: list | None, ev, own_id: str, other_id: str) -> list:
    """Fold one event (an Event or a LogEntry) into a session or user record (None: new)."""
    if record is None:
        record = [ev.si, own_id, ev.ts, 0, ev.ts, ev.key, other_id, {}, {}, b""]
    props = record[R_PROPS]
    utm = ev.utm
    if utm:  # utm_ names keep their first value
        first = [(name, props[name]) for name in utm if name in props]
        props.update(ev.props)
        props.update(first)
    else:
        props.update(ev.props)
    record[R_COUNT] += 1
    record[R_LAST] = ev.ts
    record[R_EID] = ev.key
    record[R_OTHER] = other_id
    if ev.captured:
        record[R_CAPTURED].update(ev.captured)
    return record


def folded_record(record: list, kind: str) -> dict:
    """The flat record of a session (kind 'session') or user ('user') as the seed shows it."""
    if kind == "session":
        sid, uid = record[R_ID], record[R_OTHER]
    else:
        uid, sid = record[R_ID], record[R_OTHER]
    return event_record(key_to_eid(record[R_EID]), record[R_LAST], record[R_SI], sid, uid,
                        record[R_PROPS])


# --------------------------------------------------------------------------- keys

_site_keys: dict[str, bytes] = {}


def site_key(si: str) -> bytes:
    """8 bytes naming a site in every key: sessions and users are scoped by site."""
    key = _site_keys.get(si)
    if key is None:
        key = blake2b(si.encode(), digest_size=8).digest()
        if len(_site_keys) < 100_000:
            _site_keys[si] = key
    return key


def ident_key(ident: str) -> bytes:
    """A sid or uid as key bytes; long ones are hashed to stay under LMDB's 511-byte key limit.

    The hashed form starts with 0xFF, a byte that UTF-8 never contains, so it cannot collide
    with a short id stored as itself.
    """
    raw = ident.encode()
    if len(raw) <= 400:
        return raw
    return b"\xff" + blake2b(raw, digest_size=16).digest()


def session_key(si: str, sid: str) -> bytes:
    return site_key(si) + ident_key(sid)


def user_key(si: str, uid: str) -> bytes:
    return site_key(si) + ident_key(uid)


def chunk_key(skey: bytes, number: int) -> bytes:
    """Key of a session's chunk of event keys: the session key, length-prefixed so that no
    session's chunks sort among another's, then the chunk's number."""
    return skey[:8] + (len(skey) - 8).to_bytes(2, "big") + skey[8:] + number.to_bytes(4, "big")


def pair_key(ukey: bytes, skey: bytes) -> bytes:
    """16 bytes naming the (user, session) pair, for 'has this user been in this session?'."""
    return blake2b(len(ukey).to_bytes(2, "big") + ukey + skey, digest_size=16).digest()
