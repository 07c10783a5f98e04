"""A duty in a process of its own (the folder, the relay): started by `serve` or the
supervisor with the same settings, replaced when it dies, stopped after the server drained."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque

log = logging.getLogger("otserver")


class ChildProcess:
    def __init__(self, config, command: str, what: str):
        from .config import to_env
        self.config = config
        self.command = command
        self.what = what
        self.env = {**os.environ, **to_env(config)}
        self.proc: subprocess.Popen | None = None
        self.restarts: deque = deque(maxlen=10)
        self.next_start = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otserver", self.command, "--parent", str(os.getpid())],
            env=self.env, stdin=subprocess.DEVNULL)
        log.info("%s process started (pid %d)", self.what, self.proc.pid)

    def check(self) -> None:
        """Replace the process when it has died (at most every 2 s while it keeps dying)."""
        if self.proc is None or self.proc.poll() is None:
            return
        now = time.monotonic()
        if now < self.next_start:
            return
        log.error("%s process (pid %d) exited with %s; starting another",
                  self.what, self.proc.pid, self.proc.returncode)
        self.restarts.append(now)
        self.next_start = now + (2.0 if len(self.restarts) > 3 and
                                 now - self.restarts[0] < 30 else 0.2)
        self.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("%s process did not stop in %.0f s; killing it", self.what, timeout_s)
            self.proc.kill()
            self.proc.wait()
