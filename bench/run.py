"""otserver benchmark: the baseline server and otserver under the same wrk load, in one run.

    python bench/run.py                       # the standard scenarios, ~4 minutes
    python bench/run.py --quick               # short runs (a smoke test of the harness)
    python bench/run.py --scenarios c64,batch # a subset
    python bench/run.py --big-store           # also: ingest with 10 million events stored

For each scenario the baseline (bench/baseline.py: uvloop + httptools, query decoded, fixed
answer) and otserver (durable: every 200 is committed and synced, with session and user folds)
are started fresh on loopback ports the OS picks, and driven by wrk with bench/realistic.lua.
Printed: a table; written: bench/results/latest.json (and a PNG plot when matplotlib is there).
Ratios are otserver / baseline measured in the same run, since the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LUA = HERE / "realistic.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# name: (connections, wrk threads, env for the Lua script, compare with baseline)
SCENARIOS = {
    "c1": dict(connections=1, path="/", pipeline=1),
    "c64": dict(connections=64, path="/", pipeline=1),
    "c256": dict(connections=256, path="/", pipeline=1),
    "pipelined": dict(connections=64, path="/", pipeline=16),
    "batch": dict(connections=16, path="/batch", pipeline=1, batch=100),
    "c10k": dict(connections=10_000, path="/", pipeline=1),
}
DEFAULT = ["c1", "c64", "c256", "pipelined", "batch", "c10k"]


# ---------------------------------------------------------------------- processes

class Proc:
    """A server process we started, with CPU and peak memory read from /proc."""

    def __init__(self, argv: list[str], ready: re.Pattern, env=None, log_name="server"):
        self.log = tempfile.NamedTemporaryFile(prefix=f"otbench-{log_name}-", suffix=".log",
                                               delete=False)
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, cwd=ROOT)
        self.port = self._wait_port(ready)

    def _wait_port(self, ready: re.Pattern) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            match = ready.search(text)
            if match:
                return int(match.group(1))
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.popen.args} exited:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.popen.args} did not start")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        os.unlink(self.log.name)


def start_baseline() -> Proc:
    return Proc([sys.executable, str(HERE / "baseline.py"), "0"], re.compile(r"^(\d+)$", re.M),
                log_name="baseline")


def start_otserver(data_dir: str, extra=()) -> Proc:
    return Proc([sys.executable, "-m", "otserver", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--data-dir", data_dir, "--no-capture-referer", *extra],
                re.compile(r"listening on http://[^:]+:(\d+)"), log_name="otserver")


def start_fastapi(data_dir: str) -> Proc:
    return Proc([sys.executable, str(HERE / "fastapi_peer.py"), data_dir, "0"],
                re.compile(r"Uvicorn running on http://[^:]+:(\d+)"), log_name="fastapi")


# ---------------------------------------------------------------------- load

def run_wrk(port: int, scenario: dict, seconds: float) -> dict:
    env = {**os.environ, "OT_PATH": scenario["path"], "OT_PIPELINE": str(scenario["pipeline"]),
           "OT_BATCH": str(scenario.get("batch", 100)),
           "OT_POOL": "1000" if scenario["path"] == "/batch" else "4000"}
    connections = scenario["connections"]
    threads = min(2, connections)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
            "--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 120)
    match = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if not match:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    result = json.loads(match.group(1))
    per_request = scenario.get("batch", 1) if scenario["path"] == "/batch" else 1
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["events_per_s"] = result["rps"] * per_request
    return result


def measure(proc: Proc, scenario: dict, seconds: float, warmup: float) -> dict:
    if warmup:
        run_wrk(proc.port, scenario, warmup)
    cpu0, t0 = proc.cpu_seconds(), time.monotonic()
    result = run_wrk(proc.port, scenario, seconds)
    result["cpu_percent"] = 100 * (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    result["peak_rss_mb"] = proc.peak_rss_mb()
    return result


# ---------------------------------------------------------------------- big store

def prefill(data_dir: str, events: int, age_ms: int = 0) -> float:
    """Write `events` realistic events `age_ms` old straight into the store (no HTTP);
    returns seconds."""
    code = f"""
import random, sys
from otserver.config import Config
from otserver.model import EidGenerator, make_event, now_ms
from otserver.store import Store
config = Config()
store = Store({data_dir!r}, max_bytes=config.max_store_bytes)
gen = EidGenerator()
rand = random.Random(7)
total = {events}
done = 0
while done < total:
    batch = []
    for _ in range(min(20000, total - done)):
        s = rand.randrange(500000)
        props = {{"si": "shop.example.com", "sid": f"old{{s}}", "uid": f"oldu{{s % 100000}}",
                 "ev": "pageview", "url": "https://shop.example.com/p/%d" % rand.randrange(1000),
                 "title": "Example Shop"}}
        batch.append(make_event(props, None, gen, now_ms() - {age_ms}, config))
    store.write_batch(batch)
    done += len(batch)
    if done % 1000000 < 20000:
        print(f"prefill {{done}}/{{total}}", file=sys.stderr, flush=True)
store.close()
"""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return time.monotonic() - started


def _event_count(data_dir: str) -> int:
    code = ("import sys; from otserver.store import Store; s = Store(sys.argv[1], readonly=True); "
            "print(s.counts()['events'])")
    out = subprocess.run([sys.executable, "-c", code, data_dir], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return int(out.stdout)


# ---------------------------------------------------------------------- report

def machine() -> dict:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip()}


def table(rows: list[dict]) -> str:
    head = (f"{'scenario':<22}{'server':<10}{'req/s':>10}{'events/s':>11}{'p50 ms':>9}"
            f"{'p99 ms':>9}{'p99.9 ms':>10}{'CPU %':>7}{'RSS MB':>8}{'errors':>8}{'ratio':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        errors = r["status_errors"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else ""
        # wrk keeps no per-request latency for pipelined requests: its percentiles read 0
        p99 = f"{r['p99_us'] / 1000:>9.2f}" if r["p99_us"] else f"{'n/a':>9}"
        p999 = f"{r['p999_us'] / 1000:>10.2f}" if r["p999_us"] else f"{'n/a':>10}"
        lines.append(
            f"{r['scenario']:<22}{r['server']:<10}{r['rps']:>10.0f}{r['events_per_s']:>11.0f}"
            f"{r['p50_us'] / 1000:>9.2f}{p99}{p999}"
            f"{r['cpu_percent']:>7.0f}{r['peak_rss_mb']:>8.0f}{errors:>8}{ratio:>7}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_server: dict[str, list] = {}
    for r in rows:
        if r["scenario"] in ("c1", "c64", "c256", "c10k"):
            by_server.setdefault(r["server"], []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for server, rs in by_server.items():
        xs = [r["connections"] for r in rs]
        ax1.plot(xs, [r["rps"] for r in rs], marker="o", label=server)
        ax2.plot(xs, [r["p99_us"] / 1000 for r in rs], marker="o", label=server)
    ax2.set_yscale("log")
    for ax, title in ((ax1, "requests/s"), (ax2, "p99 latency (ms, log scale)")):
        ax.set_xscale("log")
        ax.set_xlabel("connections")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("GET /?si=... realistic tracking load, one process, loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


# ---------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(DEFAULT),
                        help=f"comma-separated, from {', '.join(SCENARIOS)}")
    parser.add_argument("--seconds", type=float, default=15, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds before each run")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    parser.add_argument("--big-store", type=int, nargs="?", const=10_000_000, default=0,
                        metavar="EVENTS", help="also measure ingest into a store already holding "
                        "EVENTS events (default 10 million) against an empty store")
    parser.add_argument("--sweep-backlog", type=int, nargs="?", const=1_000_000, default=0,
                        metavar="EVENTS", help="also measure ingest while the sweeper deletes "
                        "EVENTS expired events (default 1 million) against a store of as many "
                        "young events (nothing to sweep)")
    parser.add_argument("--fastapi", action="store_true",
                        help="also run the FastAPI/uvicorn peer (pip install -e '.[bench]')")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup = 3, 1
    if shutil.which("wrk") is None:
        print("bench: wrk is needed: apt-get install wrk (Debian/Ubuntu)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))

    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="otbench-") as tmp:
        for index, name in enumerate(names):
            scenario = SCENARIOS[name]
            baseline = start_baseline()
            try:
                base = measure(baseline, scenario, args.seconds, args.warmup)
            finally:
                baseline.stop()
            ot = start_otserver(os.path.join(tmp, f"{name}-{index}"))
            try:
                mine = measure(ot, scenario, args.seconds, args.warmup)
            finally:
                ot.stop()
            base.update(scenario=name, server="baseline", connections=scenario["connections"], ratio=None)
            if scenario["path"] == "/batch":  # the baseline reads no body: no events to compare
                base["events_per_s"] = 0.0
            mine.update(scenario=name, server="otserver", connections=scenario["connections"],
                        ratio=mine["events_per_s"] / base["events_per_s"] if base["events_per_s"] else None)
            rows += [base, mine]
            print(table([base, mine]).split("\n", 2)[2], flush=True)

        if args.fastapi:
            scenario = SCENARIOS["c64"]
            peer = start_fastapi(os.path.join(tmp, "fastapi"))
            try:
                fa = measure(peer, scenario, args.seconds, args.warmup)
            finally:
                peer.stop()
            ot_c64 = next((r for r in rows if r["scenario"] == "c64" and r["server"] == "otserver"), None)
            fa.update(scenario="c64", server="fastapi", connections=64,
                      ratio=(fa["events_per_s"] / ot_c64["events_per_s"]) if ot_c64 else None)
            rows.append(fa)

        if args.big_store:
            scenario = SCENARIOS["c64"]
            empty_dir = os.path.join(tmp, "empty")
            big_dir = os.path.join(tmp, "big")
            fill_s = prefill(big_dir, args.big_store)
            results = {}
            for label, data_dir in (("empty store", empty_dir), (f"{args.big_store:,} stored", big_dir)):
                ot = start_otserver(data_dir)
                try:
                    results[label] = measure(ot, scenario, args.seconds, args.warmup)
                finally:
                    ot.stop()
            empty = results["empty store"]
            for label, r in results.items():
                r.update(scenario=f"c64 {label}", server="otserver", connections=64,
                         ratio=r["events_per_s"] / empty["events_per_s"], prefill_s=fill_s)
                rows.append(r)

        if args.sweep_backlog:
            scenario = SCENARIOS["c64"]
            results = {}
            day_ms = 86_400_000
            for label, age in (("nothing to sweep", day_ms), ("sweeping backlog", 61 * day_ms)):
                data_dir = os.path.join(tmp, label.replace(" ", "-"))
                fill_s = prefill(data_dir, args.sweep_backlog, age)
                ot = start_otserver(data_dir, ["--sweep-interval", "1s"])
                try:
                    results[label] = measure(ot, scenario, args.seconds, args.warmup)
                finally:
                    ot.stop()
                    results[label]["left_after"] = _event_count(data_dir)
                    results[label]["prefill_s"] = fill_s
            calm = results["nothing to sweep"]
            for label, r in results.items():
                r.update(scenario=f"c64 {label} ({args.sweep_backlog:,} old)", server="otserver",
                         connections=64, ratio=r["events_per_s"] / calm["events_per_s"])
                rows.append(r)
                print(f"{label}: {r['left_after']:,} events left in the store after the run")

    print()
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out)
    payload = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
               "seconds": args.seconds, "rows": rows,
               "ratio_meaning": "otserver/baseline events per second in the same run; fastapi: "
                                "fastapi/otserver; big store: vs the empty store"}
    out.write_text(json.dumps(payload, indent=2))
    if plot(rows, out.with_suffix(".png")):
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out} (no plot: pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
