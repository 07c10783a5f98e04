"""otserver benchmark: the baseline server and otserver under the same wrk load, in one run.

    python bench/run.py                       # the standard scenarios, ~5 minutes
    python bench/run.py --quick               # short runs (a smoke test of the harness)
    python bench/run.py --scenarios c64,batch # a subset
    python bench/run.py --big-store           # also: ingest with 10 million events stored
    python bench/run.py --ab c1e1d7d          # also: the same scenarios against an older commit
    python bench/run.py --workers-ab          # also: --workers 2 against 1 at 256 connections
    python bench/run.py --guards-ab           # also: every who-may-send guard on against off

For each scenario the baseline (bench/baseline.py: uvloop + httptools, query decoded, fixed
answer) and otserver (durable: every 200 is appended to the log and synced; its folder process
folds the views meanwhile) are started fresh on loopback ports the OS picks, and driven by wrk
with bench/realistic.lua. For otserver the run also reads /metrics before and after: the log's
write-lock time per acknowledged event, the folder's rate (events folded per second of fold
transactions) against the ingest rate, and the view lag (each fold batch's oldest event's age
when the batch committed: the p99 is the bound of its histogram bucket). CPU counts the server
and its children (the folder, workers). Printed: a table; written: bench/results/latest.json
(and a PNG plot when matplotlib is there). Ratios are otserver / baseline measured in the same
run, since the machine is shared and noisy.
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
import urllib.request
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

    def __init__(self, argv: list[str], ready: re.Pattern, env=None, log_name="server",
                 cwd=ROOT):
        self.log = tempfile.NamedTemporaryFile(prefix=f"otbench-{log_name}-", suffix=".log",
                                               delete=False)
        self.popen = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, cwd=cwd)
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

    def pids(self) -> list[int]:
        """The process and its descendants (the folder, workers)."""
        out, todo = [], [self.popen.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                todo += [int(c) for c in
                         Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                pass
        return out

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / CLK_TCK

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


def start_otserver(data_dir: str, extra=(), code=ROOT) -> Proc:
    """otserver from `code` (this checkout, or a worktree of another commit for --ab)."""
    return Proc([sys.executable, "-m", "otserver", "serve", "--host", "127.0.0.1", "--port", "0",
                 "--data-dir", data_dir, "--no-capture-referer", *extra],
                re.compile(r"listening on http://[^:]+:(\d+)"), log_name="otserver",
                env={"PYTHONPATH": str(code)}, cwd=code)


def start_fastapi(data_dir: str) -> Proc:
    return Proc([sys.executable, str(HERE / "fastapi_peer.py"), data_dir, "0"],
                re.compile(r"Uvicorn running on http://[^:]+:(\d+)"), log_name="fastapi")


def checkout(commit: str, tmp: str) -> str:
    """A detached git worktree of `commit` (removed at the end of the run)."""
    path = os.path.join(tmp, f"code-{commit[:12]}")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", path, commit],
                   check=True, capture_output=True)
    return path


# ---------------------------------------------------------------------- load

def run_wrk(port: int, scenario: dict, seconds: float) -> dict:
    env = {**os.environ, "OT_PATH": scenario["path"], "OT_PIPELINE": str(scenario["pipeline"]),
           "OT_BATCH": str(scenario.get("batch", 100)),
           "OT_POOL": "1000" if scenario["path"] == "/batch" else "4000"}
    if scenario.get("origin"):
        env["OT_ORIGIN"] = scenario["origin"]
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


def measure(proc: Proc, scenario: dict, seconds: float, warmup: float,
            metrics: bool = False) -> dict:
    if warmup:
        run_wrk(proc.port, scenario, warmup)
    before = scrape(proc.port) if metrics else None
    cpu0, t0 = proc.cpu_seconds(), time.monotonic()
    result = run_wrk(proc.port, scenario, seconds)
    result["cpu_percent"] = 100 * (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    result["peak_rss_mb"] = proc.peak_rss_mb()
    if metrics:
        time.sleep(1.5)  # the folder writes its figures once a second
        result.update(view_figures(before, scrape(proc.port), result))
    return result


GUARD_FLAGS = ["--require-site", "--rate-limit-per-ip", "1000000000", "--rate-limit-per-site",
               "1000000000", "--max-events-per-site", "1000000000000"]


def guards_ab(tmp: str, seconds: float, warmup: float) -> list[dict]:
    """c64 and batch with the guards all off, then all on (nothing refused), alternating."""
    rows = []
    for name in ("c64", "batch"):
        scenario = dict(SCENARIOS[name], origin="https://shop.example.com")
        results = {}
        for label in ("guards off", "guards on"):
            data_dir = os.path.join(tmp, f"guards-{name}-{label.split()[1]}")
            ot = start_otserver(data_dir, GUARD_FLAGS if label == "guards on" else ())
            try:
                if label == "guards on":
                    subprocess.run([sys.executable, "-m", "otserver", "site", "add",
                                    "shop.example.com", "--origins", scenario["origin"],
                                    "--data-dir", data_dir], check=True, capture_output=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
                    time.sleep(1.5)  # the server picks registrations up within a second
                results[label] = measure(ot, scenario, seconds, warmup, metrics=True)
                refused = results[label].get("status_errors", 0)
                if refused:
                    raise RuntimeError(f"{label}: {refused} answers were not 200")
            finally:
                ot.stop()
        off = results["guards off"]
        for label, r in results.items():
            r.update(scenario=f"{name} {label}", server="otserver",
                     connections=scenario["connections"],
                     ratio=r["events_per_s"] / off["events_per_s"])
            rows.append(r)
        print(table(list(results.values())).split("\n", 2)[2], flush=True)
    return rows


def scrape(port: int) -> dict:
    """/metrics as {name or name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def view_figures(before: dict, after: dict, result: dict) -> dict:
    """What the log and the folder did during the measured run (otserver only)."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)
    events = delta("otserver_events_stored_total")
    folded, fold_s = delta("otserver_folded_events_total"), delta("otserver_fold_seconds_total")
    out = {"lock_us_per_event": 1e6 * delta("otserver_log_lock_seconds_total") / events
           if events else None,
           "fold_rate": folded / fold_s if fold_s else None,
           "lag_events_at_end": after.get("otserver_view_lag_events")}
    out["fold_ratio"] = out["fold_rate"] / result["events_per_s"] if out["fold_rate"] and \
        result["events_per_s"] else None
    buckets = sorted((float(k.split('le="')[1].rstrip('"}')), delta(k)) for k in after
                     if k.startswith("otserver_fold_lag_seconds_bucket") and "+Inf" not in k)
    count = delta("otserver_fold_lag_seconds_count")
    out["lag_p99_ms"] = next((bound * 1000 for bound, cum in buckets if cum >= 0.99 * count),
                             None) if count else None
    out["lag_mean_ms"] = 1000 * delta("otserver_fold_lag_seconds_sum") / count if count else None
    return out


# ---------------------------------------------------------------------- big store

def prefill(data_dir: str, events: int, age_ms: int = 0) -> float:
    """Append `events` realistic events `age_ms` old straight to the log (no HTTP) and fold
    them into the views; returns seconds."""
    code = f"""
import random, sys
from otserver.config import Config
from otserver.folder import Folder
from otserver.model import EidGenerator, make_event, now_ms
from otserver.store import Store
config = Config()
store = Store({data_dir!r}, max_bytes=config.max_store_bytes)
folder = Folder(store.log, store.views, config.replace(fold_batch_events=20000), sweeper=False)
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
        batch.append(make_event(props, None, gen, now_ms() - {age_ms}, config).encode())
    store.log.append(batch)
    folder.catch_up()
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
            "print(s.counts()['events'])")  # noqa: E501
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
    head = (f"{'scenario':<22}{'server':<14}{'req/s':>9}{'events/s':>10}{'p50 ms':>8}"
            f"{'p99 ms':>8}{'p99.9':>8}{'CPU %':>6}{'RSS MB':>7}{'err':>5}{'ratio':>6}"
            f"{'lock us/ev':>11}{'fold/ingest':>12}{'lag p99 ms':>11}")
    lines = [head, "-" * len(head)]

    def opt(value, fmt: str, width: int) -> str:
        return f"{value:>{width}{fmt}}" if value is not None else f"{'':>{width}}"
    for r in rows:
        errors = r["status_errors"] + r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"]
        # wrk keeps no per-request latency for pipelined requests: its percentiles read 0
        p99 = f"{r['p99_us'] / 1000:>8.2f}" if r["p99_us"] else f"{'n/a':>8}"
        p999 = f"{r['p999_us'] / 1000:>8.2f}" if r["p999_us"] else f"{'n/a':>8}"
        lines.append(
            f"{r['scenario']:<22}{r['server']:<14}{r['rps']:>9.0f}{r['events_per_s']:>10.0f}"
            f"{r['p50_us'] / 1000:>8.2f}{p99}{p999}"
            f"{r['cpu_percent']:>6.0f}{r['peak_rss_mb']:>7.0f}{errors:>5}"
            f"{opt(r.get('ratio'), '.2f', 6)}{opt(r.get('lock_us_per_event'), '.1f', 11)}"
            f"{opt(r.get('fold_ratio'), '.2f', 12)}{opt(r.get('lag_p99_ms'), '.0f', 11)}")
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
    parser.add_argument("--ab", metavar="COMMIT", default=None,
                        help="also run otserver as of COMMIT (a git worktree of it) in every "
                             "scenario: the ratio column of its rows is this checkout ÷ COMMIT")
    parser.add_argument("--guards-ab", action="store_true",
                        help="also run c64 and batch with every who-may-send guard on (the "
                        "site registered with its origin, --require-site, rates per address "
                        "and site, a quota; none reached) against all off, browser requests "
                        "with Origin in both (ratio: on ÷ off)")
    parser.add_argument("--workers-ab", action="store_true",
                        help="also run c256 with --workers 2 (ratio: ÷ --workers 1)")
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
        old_code = checkout(args.ab, tmp) if args.ab else None
        for index, name in enumerate(names):
            scenario = SCENARIOS[name]
            baseline = start_baseline()
            try:
                base = measure(baseline, scenario, args.seconds, args.warmup)
            finally:
                baseline.stop()
            ot = start_otserver(os.path.join(tmp, f"{name}-{index}"))
            try:
                mine = measure(ot, scenario, args.seconds, args.warmup, metrics=True)
            finally:
                ot.stop()
            base.update(scenario=name, server="baseline", connections=scenario["connections"], ratio=None)
            if scenario["path"] == "/batch":  # the baseline reads no body: no events to compare
                base["events_per_s"] = 0.0
            mine.update(scenario=name, server="otserver", connections=scenario["connections"],
                        ratio=mine["events_per_s"] / base["events_per_s"] if base["events_per_s"] else None)
            new_rows = [base, mine]
            if old_code is not None:
                ot = start_otserver(os.path.join(tmp, f"{name}-{index}-ab"), code=old_code)
                try:
                    old = measure(ot, scenario, args.seconds, args.warmup)
                finally:
                    ot.stop()
                old.update(scenario=name, server=f"ot@{args.ab[:8]}",
                           connections=scenario["connections"],
                           ratio=mine["events_per_s"] / old["events_per_s"] if old["events_per_s"] else None)
                new_rows.append(old)
            rows += new_rows
            print(table(new_rows).split("\n", 2)[2], flush=True)

        if args.guards_ab:
            rows += guards_ab(tmp, args.seconds, args.warmup)

        if args.workers_ab:
            scenario = SCENARIOS["c256"]
            results = {}
            for workers in (1, 2):
                ot = start_otserver(os.path.join(tmp, f"workers-{workers}"),
                                    ["--workers", str(workers)])
                try:
                    results[workers] = measure(ot, scenario, args.seconds, args.warmup, metrics=True)
                finally:
                    ot.stop()
            for workers, r in results.items():
                r.update(scenario=f"c256 --workers {workers}", server="otserver", connections=256,
                         ratio=r["events_per_s"] / results[1]["events_per_s"])
                rows.append(r)
            print(table(list(results.values())).split("\n", 2)[2], flush=True)

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
                    results[label] = measure(ot, scenario, args.seconds, args.warmup,
                                             metrics=True)
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
                    results[label] = measure(ot, scenario, args.seconds, args.warmup,
                                             metrics=True)
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

        if old_code is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", old_code],
                           capture_output=True)

    print()
    print(table(rows))
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out)
    payload = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
               "seconds": args.seconds, "rows": rows,
               "ratio_meaning": "otserver/baseline events per second in the same run; fastapi: "
                                "fastapi/otserver; big store: vs the empty store; ot@COMMIT "
                                "rows: this checkout/COMMIT; --workers N: vs --workers 1",
               "ab": args.ab}
    out.write_text(json.dumps(payload, indent=2))
    if plot(rows, out.with_suffix(".png")):
        print(f"wrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"wrote {out} (no plot: pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
