"""`otserver serve --workers N`: a supervisor and N worker processes on one port.

Invariants:
- Workers are forked before anything opens the store: each opens its own LMDB environments
  after the fork (an inherited environment is never used), so N workers append to one log the
  way separate processes do (LMDB's write lock; positions assigned inside the transaction).
- Every worker listens on the same port with SO_REUSEPORT; the kernel spreads connections.
- One folder for the store: a child process of the supervisor (it also runs the sweeper),
  replaced when it dies, stopped after the workers have drained.
- A worker that dies (for any reason but a stop) is replaced; the supervisor passes SIGTERM and
  SIGINT on and exits 0 once every worker has drained and exited 0.
- systemd: the supervisor is the main process. It sends READY=1 when the port answers,
  STOPPING=1 on a stop, and WATCHDOG=1 only while every worker proves it is healthy (a worker
  refreshes its metrics snapshot once a second only while its loop runs and its writer is
  not wedged).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import time

import uvloop

from .errors import PortInUse
from .folder import FolderProcess
from .relay import start_relay
from .metrics import alive
from .notify import Notifier
from .server import serve

log = logging.getLogger("otserver")
PR_SET_PDEATHSIG = 1


def _reserve_port(config) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket to learn the port when it is 0, and hold it
    so the workers can all bind the same one."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    port = config.port
    # First a plain bind: it fails while anyone (another supervisor's reserved socket too)
    # holds the port, which a SO_REUSEPORT bind alone would share instead.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((config.host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(config.host, port) from None
            raise
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((config.host, port))
    return sock, sock.getsockname()[1]


def _clean_snapshots(directory: str) -> None:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        stem = name.split(".", 1)[0]
        if stem.isdigit() and not alive(int(stem)):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def supervise(config, workers: int) -> int:
    notifier = Notifier.from_env()
    reserved, port = _reserve_port(config)
    config = config.replace(port=port)
    metrics_dir = os.path.join(config.data_dir, "metrics")
    _clean_snapshots(metrics_dir)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    parent = os.getpid()

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _die_with_parent(parent)
                reserved.close()
                code = uvloop.run(serve(config, workers=workers, notifier=Notifier()))
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        log.info("otserver supervisor: worker %d started (pid %d)", index, pid)

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            notifier.stopping("draining workers")
            log.info("otserver supervisor: %s, draining %d workers",
                     signal.Signals(signum).name, len(children))
            for pid in list(children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    folder = FolderProcess(config)
    folder.start()
    if not folder.wait_running():
        log.error("otserver supervisor: the folder process did not start")
    relay = start_relay(config)  # with --nats
    helpers = [folder] + ([relay] if relay is not None else [])
    for index in range(workers):
        spawn(index)
    log.info("otserver supervisor: %d workers on port %d", workers, port)
    _wait_until_listening(config.host, port, children)
    notifier.ready(f"{workers} workers listening on port {port}")

    interval = notifier.watchdog_interval_s
    next_ping = time.monotonic() + (interval or 0)
    exit_code = 0
    restarts: list[float] = []
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.1)
            if not stopping:
                for helper in helpers:
                    helper.check()
            if interval and time.monotonic() >= next_ping:
                next_ping = time.monotonic() + interval
                if _workers_healthy(metrics_dir, children, max(3.0, 2 * interval)):
                    notifier.watchdog()
                else:
                    log.error("otserver supervisor: a worker is not healthy; watchdog withheld")
            continue
        if pid not in children:  # the folder or the relay (reaped here): check() replaces it
            for helper in helpers:
                if helper.proc is not None and pid == helper.proc.pid:
                    helper.proc.returncode = os.waitstatus_to_exitcode(status)
            continue
        index = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            # -SIGTERM: a worker replaced just before the stop, ended by our SIGTERM before
            # it had set its handler (it had not listened yet: nothing to drain).
            if code not in (0, -signal.SIGTERM):
                log.error("otserver supervisor: worker %d (pid %d) exited with %d while "
                          "draining", index, pid, code)
                exit_code = 1
            continue
        log.error("otserver supervisor: worker %d (pid %d) exited with %d; replacing it",
                  index, pid, code)
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < 10] + [now]
        if len(restarts) > 5 * workers:
            time.sleep(1.0)  # a crash loop: do not spin
        spawn(index)
    if relay is not None:
        relay.stop()  # after the workers drained: it publishes what they appended last
    folder.stop()
    reserved.close()
    log.info("otserver supervisor: stopped")
    return exit_code


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM (and drains) if the supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _wait_until_listening(host: str, port: int, children: dict, timeout: float = 30.0) -> None:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and children:
        try:
            socket.create_connection((target, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)


def _workers_healthy(directory: str, children: dict, fresh_s: float) -> bool:
    now = time.time()
    for pid in children:
        try:
            if now - os.path.getmtime(os.path.join(directory, f"{pid}.json")) > fresh_s:
                return False
        except OSError:
            return False
    return True
