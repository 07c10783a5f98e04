"""Idempotent retries (SPEC 2.7), the part that needs no store: which keys a request carries and
what each covers. Pure: no I/O. The check itself runs in the log's write transaction
(log.EventLog.append_groups), so it holds across workers, processes and restarts.

A request carries *units*, each a key over some of its events:
- the `Idempotency-Key` header: a request unit over all of the request's events;
- the property `idempotency_key` of an event (a batch line, a JSON object, a single event): an
  item unit over that event. The property is taken out of the stored properties.

Invariants:
- A unit is (key digest, body digest, first event, events, kind). The key digest names the
  site, the kind and the key (blake2b, 16 bytes): the same key on two sites, or as a header and
  as an item key, is two keys.
- The body digest covers what the client sent for those events (every property, with its item
  key), never what the server adds (time, eids, captured fields): a retry from the same client
  digests the same.
- A request's request unit, when it has one, comes first in its list of units.
"""
from __future__ import annotations

import struct
from hashlib import blake2b

from .errors import BadRequest
from .model import packb

KEY_PROPERTY = "idempotency_key"
HEADER = b"idempotency-key"
MAX_KEY_CHARS = 255
REQUEST, ITEM = 0, 1
# The wire format (writer.py to appender.py): key digest, body digest, the request's number in
# the batch, its first event, events, kind.
UNIT = struct.Struct("=16s16sIIII")
_KEY_CHARS = bytes(range(0x20, 0x7F))


class Unit:
    __slots__ = ("key", "digest", "body", "first", "count", "kind", "text")

    def __init__(self, site: str, text: str, body: bytes, first: int, count: int, kind: int):
        self.text = text
        self.kind = kind
        self.key = blake2b(b"%d\0%s\0%s" % (kind, site.encode(), text.encode()),
                           digest_size=16).digest()
        self.body = body
        self.first = first
        self.count = count

    def pack(self, group: int) -> bytes:
        return UNIT.pack(self.key, self.body, group, self.first, self.count, self.kind)


class Conflict(Exception):
    """A key already stored with another body (the writer names the unit): 422."""

    def __init__(self, unit: int):
        super().__init__(f"idempotency conflict on unit {unit}")
        self.unit = unit


def header_key(headers: dict) -> str | None:
    raw = headers.get(HEADER)
    if raw is None:
        return None
    return _checked(raw, "the Idempotency-Key header")


def take_item_key(props: dict) -> str | None:
    """Take the event's own key out of its properties (it is never stored)."""
    value = props.pop(KEY_PROPERTY, None)
    if value is None:
        return None
    return _checked(value.encode("utf-8", "surrogatepass"), f"property {KEY_PROPERTY}")


def _checked(raw: bytes, what: str) -> str:
    if not 1 <= len(raw) <= MAX_KEY_CHARS or raw.translate(None, _KEY_CHARS):
        raise BadRequest(f"{what}: a key is 1 to {MAX_KEY_CHARS} printable ASCII characters")
    return raw.decode("ascii")


def body_digest(props: dict, key: str | None) -> bytes:
    """What the client sent for one event (before ids are resolved), as 16 bytes."""
    return blake2b(packb([sorted(props.items()), key]), digest_size=16).digest()


def units_of(events: list, bodies: list, item_keys: list, request_key: str | None) -> list:
    """The units of one request: its header key first, then its events' own keys."""
    units = []
    if request_key is not None:
        whole = blake2b(b"".join(bodies), digest_size=16).digest()
        units.append(Unit(events[0].si, request_key, whole, 0, len(events), REQUEST))
    for index, key in enumerate(item_keys):
        if key is not None:
            units.append(Unit(events[index].si, key, bodies[index], index, 1, ITEM))
    return units


def conflict_reason(units: list, unit: int, part: str | None) -> str:
    """The 422's reason; `part` names a batch's parts ("line", "item"), None for one event."""
    found = units[unit]
    if found.kind == REQUEST:
        return (f"Idempotency-Key {found.text} was used with another request body; send a new "
                "key for a new request")
    where = f"{part} {found.first + 1}: " if part else ""
    return (f"{where}{KEY_PROPERTY} {found.text} was used with another event; send a new key "
            "for a new event")
