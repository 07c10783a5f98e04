"""sd_notify: tell systemd (or anything speaking its notify protocol) what the process is doing.

`Notifier.from_env(os.environ)` reads the three variables the service manager sets:
  NOTIFY_SOCKET   where to send: an absolute filesystem path, or `@name` for a Linux abstract
                  socket (the `@` stands for the leading NUL byte). Absent: notifications off.
  WATCHDOG_USEC   the watchdog timeout in microseconds (`WatchdogSec=` of the unit).
  WATCHDOG_PID    the pid the watchdog is meant for; when set and not this process's pid, the
                  watchdog is off for this process (a child that inherited the environment).

Invariants:
- Without a usable NOTIFY_SOCKET every method is a cheap no-op that returns False: it builds no
  message and opens no socket.
- A notification is one datagram of `KEY=value` lines, sent over a fresh non-blocking
  AF_UNIX SOCK_DGRAM socket (SOCK_CLOEXEC) that is closed at once, so a Notifier holds no file
  descriptor, needs no close(), and stays valid across fork. Each method returns True when the
  datagram was handed to the kernel.
- Sending never blocks and never raises: a missing socket, a full receive queue (EAGAIN), a
  refused connection or any other OSError is logged at debug level and reported as False.
  Only a malformed key (empty, or holding `=` or a newline) raises ValueError: that is a
  programming error, not a send error. A newline inside a value is replaced by a space, so a
  value can never forge another field.
- `watchdog_interval_s` is half of WATCHDOG_USEC in seconds (ping at least that often, as
  sd_watchdog_enabled(3) advises), or None when no watchdog is requested for this process or
  when there is no socket to ping. `watchdog()` sends WATCHDOG=1 only when it is not None.
- The environment is only read: NOTIFY_SOCKET is NOT removed from os.environ, so processes this
  one starts inherit it. With `NotifyAccess=main` systemd ignores what they send, and
  WATCHDOG_PID keeps them from believing the watchdog is theirs.
"""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def _address(notify_socket: str | None) -> bytes | None:
    """NOTIFY_SOCKET as a sockaddr_un path (bytes), or None when absent or unusable."""
    if not notify_socket:
        return None
    if notify_socket.startswith("@"):
        if len(notify_socket) < 2:
            return None
        return b"\0" + os.fsencode(notify_socket[1:])
    if notify_socket.startswith("/"):
        return os.fsencode(notify_socket)
    # sd_notify(3) accepts only an absolute path or '@'; anything else (relative paths,
    # vsock:... of newer systemd) is not something this client can talk to.
    log.debug("NOTIFY_SOCKET=%r is neither an absolute path nor '@name': notify off",
              notify_socket)
    return None


def _watchdog_usec(environ, pid: int) -> int | None:
    """WATCHDOG_USEC as a positive int when the watchdog is meant for `pid`, else None."""
    text = environ.get("WATCHDOG_USEC")
    if not text:
        return None
    try:
        usec = int(text)
    except ValueError:
        log.debug("WATCHDOG_USEC=%r is not an integer: watchdog off", text)
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            log.debug("WATCHDOG_PID=%r is not an integer: watchdog off", owner)
            return None
    return usec


def _format(fields: dict) -> bytes:
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"not a notify field name: {key!r}")
        if value is True:
            value = "1"
        elif value is False:
            value = "0"
        lines.append(f"{key}={str(value).replace(chr(10), ' ')}")
    return "\n".join(lines).encode("utf-8", "replace")


class Notifier:
    """One process's link to the service manager. Build it with `Notifier.from_env`."""

    __slots__ = ("address", "watchdog_usec")

    def __init__(self, address: bytes | None = None, watchdog_usec: int | None = None):
        self.address = address
        # no socket, no way to ping: a watchdog without one is not ours to keep
        self.watchdog_usec = watchdog_usec if address is not None else None

    @classmethod
    def from_env(cls, environ=None) -> "Notifier":
        environ = os.environ if environ is None else environ
        return cls(_address(environ.get("NOTIFY_SOCKET")),
                   _watchdog_usec(environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to call watchdog(): half the watchdog timeout, or None for never."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, **fields) -> bool:
        """Send one datagram `KEY=value\\n...`; True when the kernel took it."""
        if self.address is None or not fields:
            return False
        message = _format(fields)
        try:
            with socket.socket(socket.AF_UNIX,
                               socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
                               ) as sock:
                sock.sendto(message, self.address)
        except OSError as exc:
            log.debug("sd_notify %r to %r failed: %s", message[:80], self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup finished (for Type=notify, systemd starts waiting on us no more)."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown (draining) has begun."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def status(self, text: str) -> bool:
        """STATUS=text: a line shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: still alive. A no-op unless a watchdog is requested for this process."""
        if self.watchdog_usec is None:
            return False
        return self.notify(WATCHDOG=1)

    def __repr__(self) -> str:
        return f"Notifier(address={self.address!r}, watchdog_usec={self.watchdog_usec!r})"


__all__ = ["Notifier"]
