"""The writer process (`otserver writer --fd N`, started by each server process): it appends
the batches that arrive on its socket to the log, every batch waiting at once in one synced
commit, and answers each in order. writer.py is the server's side.

It imports only what appending needs (no event loop), so it starts quickly.

Wire format (native byte order, one socketpair per server process):
  batch   count(u32) payload_bytes(u32) length(u32) * count  payload
  answer  status(u8: 0 stored, 1 full, 2 failed) first(u64) count(u32) lock_seconds(f64)
          message_bytes(u32) message
(one answer per batch; the batches of one commit share its lock_seconds, given with the last)
"""
from __future__ import annotations

import os
import socket
import struct
from array import array

from .errors import StoreFailed, StoreFull

BATCH_HEAD = struct.Struct("=II")
ANSWER = struct.Struct("=BQIdI")
STORED, FULL, FAILED = 0, 1, 2


def run_writer(event_log, fd: int, min_free_bytes: int = 0) -> int:
    """The body of `otserver writer`: append the batches that arrive on socket `fd`, every
    one waiting at once in one commit, answer each, and leave when the socket closes."""
    sock = socket.socket(fileno=fd)
    store = event_log.store
    reserve = f"disk full: less than {min_free_bytes} bytes free for the data directory " \
              f"(--min-free-disk-bytes keeps them for the views)"
    frames = _Frames(sock)
    while True:
        batches = frames.take()  # at least one: waits for it; then whatever else is there
        if batches is None:
            return 0
        values = [value for batch in batches for value in batch]
        status, first, message = STORED, 0, b""
        try:
            if min_free_bytes and _free_bytes(event_log.path) < min_free_bytes:
                raise StoreFull(reserve)
            first = event_log.append(values)
        except StoreFull as exc:
            status, message = FULL, str(exc).encode()
        except StoreFailed as exc:
            status, message = FAILED, str(exc).encode()
        except Exception as exc:  # never leave the server without an answer
            status, message = FAILED, f"{type(exc).__name__}: {exc}".encode()
        held = store.last_write_seconds if status == STORED else 0.0
        answers = []
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            answers.append(ANSWER.pack(status, first, len(batch), held if last else 0.0,
                                       len(message)) + message)
            first += len(batch)
        try:
            sock.sendall(b"".join(answers))
        except OSError:
            return 0


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
        batches = []
        buffer = self.buffer
        at = 0
        while len(buffer) - at >= BATCH_HEAD.size:
            count, size = BATCH_HEAD.unpack_from(buffer, at)
            end = at + BATCH_HEAD.size + 4 * count + size
            if len(buffer) < end:
                break
            lengths = array("I")
            lengths.frombytes(bytes(buffer[at + BATCH_HEAD.size:at + BATCH_HEAD.size + 4 * count]))
            offset = at + BATCH_HEAD.size + 4 * count
            batch = []
            for length in lengths:
                batch.append(bytes(buffer[offset:offset + length]))
                offset += length
            batches.append(batch)
            at = end
        del buffer[:at]
        return batches


def _free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


