"""The writer process (`otserver writer --fd N`, started by each server process): it appends
the batches that arrive on its socket to the log, every batch waiting at once in one synced
commit, and answers each in order. writer.py is the server's side.

It imports only what appending needs (no event loop), so it starts quickly.

Wire format (native byte order, one socketpair per server process):
  batch   requests(u32) count(u32) units(u32) payload_bytes(u32)
          events(u32) * requests  length(u32) * count  unit * units  payload
          (a unit: idempotency.UNIT, naming its request by number within the batch)
  answer  status(u8: 0 stored, 1 full, 2 failed) first(u64) stored(u32) lock_seconds(f64)
          body_bytes(u32) body
          body, when stored: one OUTCOME per request that had a unit replayed or refused,
            each followed by `replaced` REPLACED; else the message
(one answer per batch; the batches of one commit share its lock_seconds, given with the last;
`stored` counts the entries appended, so a batch's requests take positions first, first + 1,
... in order, skipping the events that were replayed and the requests that were refused)
"""
from __future__ import annotations

import os
import socket
import struct
import time
from array import array

from .errors import StoreFailed, StoreFull
from .idempotency import UNIT

BATCH_HEAD = struct.Struct("=IIII")
ANSWER = struct.Struct("=BQIdI")
OUTCOME = struct.Struct("=III")  # request number, refused unit (NO_CONFLICT: none), replaced
REPLACED = struct.Struct("=I16s")  # event index within its request, the original id
NO_CONFLICT = 0xFFFFFFFF
STORED, FULL, FAILED = 0, 1, 2


def run_writer(event_log, fd: int, min_free_bytes: int = 0,
               window_s: float = 86400.0) -> int:
    """The body of `otserver writer`: append the batches that arrive on socket `fd`, every
    one waiting at once in one commit (idempotency keys checked in it, `window_s` long),
    answer each, and leave when the socket closes."""
    sock = socket.socket(fileno=fd)
    store = event_log.store
    reserve = f"disk full: less than {min_free_bytes} bytes free for the data directory " \
              f"(--min-free-disk-bytes keeps them for the views)"
    frames = _Frames(sock)
    while True:
        batches = frames.take()  # at least one: waits for it; then whatever else is there
        if batches is None:
            return 0
        groups, units = [], []
        for batch_groups, batch_units in batches:
            base = len(groups)
            groups += batch_groups
            units += [unit[:2] + (unit[2] + base,) + unit[3:] for unit in batch_units]
        status, first, message, outcomes = STORED, 0, b"", {}
        try:
            if min_free_bytes and _free_bytes(event_log.path) < min_free_bytes:
                raise StoreFull(reserve)
            first, outcomes = event_log.append_groups(groups, units, time.time_ns() // 1_000_000,
                                                      int(window_s * 1000))
        except StoreFull as exc:
            status, message = FULL, str(exc).encode()
        except StoreFailed as exc:
            status, message = FAILED, str(exc).encode()
        except Exception as exc:  # never leave the server without an answer
            status, message = FAILED, f"{type(exc).__name__}: {exc}".encode()
        held = store.last_write_seconds if status == STORED else 0.0
        answers = []
        base = 0
        for n, (batch_groups, _) in enumerate(batches):
            last = n == len(batches) - 1
            body, stored = message, 0
            if status == STORED:
                body, stored = _outcomes(batch_groups, base, outcomes)
            answers.append(ANSWER.pack(status, first, stored, held if last else 0.0, len(body))
                           + body)
            first += stored
            base += len(batch_groups)
        try:
            sock.sendall(b"".join(answers))
        except OSError:
            return 0


def _outcomes(groups: list, base: int, outcomes: dict) -> tuple[bytes, int]:
    """A batch's answer body and the entries it stored, from the outcomes of the commit's
    requests (numbered across the commit from `base`)."""
    parts, stored = [], 0
    for number, group in enumerate(groups):
        outcome = outcomes.get(base + number)
        if outcome is None:
            stored += len(group)
            continue
        conflict, replaced = outcome
        if conflict is None:
            stored += len(group) - len(replaced)
        parts.append(OUTCOME.pack(number, NO_CONFLICT if conflict is None else conflict,
                                  len(replaced)))
        parts += [REPLACED.pack(index, key) for index, key in replaced.items()]
    return b"".join(parts), stored


class _Frames:
    """Batches read off the socket: `take` waits for one, then takes every other batch that
    has arrived whole, without waiting."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()

    def take(self) -> list | None:
        batches = []
        while not batches:
            if not self._fill(block=True):
                return None
            batches = self._parse()
        while self._fill(block=False):
            batches += self._parse()
        return batches

    def _fill(self, block: bool) -> bool:
        """Read what is there (waiting for something when `block`). False: nothing more."""
        try:
            chunk = self.sock.recv(1 << 20, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not chunk:
            return False  # the end of the stream (take then returns None)
        self.buffer += chunk
        return True

    def _parse(self) -> list:
        """Whole batches, each ([request: [entry, ...], ...], [unit tuple, ...])."""
        batches = []
        buffer = self.buffer
        at = 0
        while len(buffer) - at >= BATCH_HEAD.size:
            requests, count, nunits, size = BATCH_HEAD.unpack_from(buffer, at)
            offset = at + BATCH_HEAD.size
            end = offset + 4 * (requests + count) + UNIT.size * nunits + size
            if len(buffer) < end:
                break
            sizes = array("I")
            sizes.frombytes(bytes(buffer[offset:offset + 4 * (requests + count)]))
            offset += 4 * (requests + count)
            units = [UNIT.unpack_from(buffer, offset + UNIT.size * n) for n in range(nunits)]
            offset += UNIT.size * nunits
            groups = []
            lengths = iter(sizes[requests:])
            for events in sizes[:requests]:
                group = []
                for _ in range(events):
                    length = next(lengths)
                    group.append(bytes(buffer[offset:offset + length]))
                    offset += length
                groups.append(group)
            batches.append((groups, units))
            at = end
        del buffer[:at]
        return batches


def _free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


