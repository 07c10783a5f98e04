"""One LMDB environment for the log and the views, or two? Measured, not argued.

    python bench/envs.py                 # 10 s per layout
    python bench/envs.py --seconds 20 --batch 64

Two processes, as in the server: an appender commits synced batches of realistic events to the
log (EventLog.append, as the writer thread does), as fast as it can; a folder folds them into
the views (folder.Folder.fold_once, as the folder process does). Layout "two": the log and the
views are separate environments (two write locks). Layout "one": both open the same directory,
so every fold transaction holds the one write lock the appends also need. Printed per layout:
appends/s, commit latency p50/p99/max (what an acknowledgement waits for), fold lag at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otserver import log as log_module, views as views_module  # noqa: E402
from otserver.config import Config  # noqa: E402
from otserver.folder import Folder  # noqa: E402
from otserver.lmdbenv import Environment  # noqa: E402
from otserver.log import EventLog  # noqa: E402
from otserver.model import EidGenerator, make_event, now_ms  # noqa: E402
from otserver.views import Views  # noqa: E402

CONFIG = Config()


def realistic_values(gen: EidGenerator, rand: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        s = rand.randrange(50_000)
        props = {"si": "shop.example.com", "sid": f"s{s}", "uid": f"u{s % 10_000}",
                 "ev": "pageview", "url": f"https://shop.example.com/p/{rand.randrange(1000)}",
                 "title": "Example Shop", "screen": "1920x1080"}
        out.append(make_event(props, {"user_agent": "Mozilla/5.0", "ip": "127.0.0.0"}, gen,
                              now_ms(), CONFIG).encode())
    return out


def open_both(log_dir: str, views_dir: str) -> tuple[EventLog, Views]:
    """The log and the views; in one environment when the two paths are the same."""
    if log_dir != views_dir:
        return EventLog(log_dir), Views(views_dir)
    env = Environment(log_dir, log_module.NAMES + views_module.NAMES, schema=b"2",
                      dupsort=views_module.DUPSORT)
    return EventLog(log_dir, environment=env), Views(log_dir, environment=env)


def appender(log_dir: str, views_dir: str, batch: int, seconds: float, out) -> None:
    event_log, _ = open_both(log_dir, views_dir)
    gen, rand = EidGenerator(), random.Random(1)
    latencies = []
    appended = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        values = realistic_values(gen, rand, batch)
        started = time.perf_counter()
        event_log.append(values)
        latencies.append(time.perf_counter() - started)
        appended += len(values)
    event_log.close()
    latencies.sort()
    out.put({"appended": appended, "commits": len(latencies),
             "p50_ms": latencies[len(latencies) // 2] * 1000,
             "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
             "max_ms": latencies[-1] * 1000})


def folder(log_dir: str, views_dir: str, seconds: float, out) -> None:
    event_log, views = open_both(log_dir, views_dir)
    body = Folder(event_log, views, CONFIG, sweeper=False)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not body.fold_once():
            time.sleep(0.001)
    lag = event_log.last_position() - body.watermark
    out.put({"folded": body.folded, "fold_seconds": body.fold_seconds, "lag_at_end": lag})
    event_log.close()
    if views.store is not event_log.store:
        views.close()


def measure(layout: str, batch: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="otenvs-") as tmp:
        log_dir = os.path.join(tmp, "log")
        views_dir = log_dir if layout == "one" else os.path.join(tmp, "views")
        created_log, created_views = open_both(log_dir, views_dir)  # lay both out first
        created_log.close()
        if created_views.store is not created_log.store:
            created_views.close()
        queue = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=appender,
                                         args=(log_dir, views_dir, batch, seconds, queue)),
                 multiprocessing.Process(target=folder, args=(log_dir, views_dir, seconds, queue))]
        for proc in procs:
            proc.start()
        results = {}
        for _ in procs:
            results.update(queue.get(timeout=seconds + 120))
        for proc in procs:
            proc.join(30)
    results["layout"] = layout
    results["appends_per_s"] = results["appended"] / seconds
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--batch", type=int, default=64, help="events per append commit")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "envs.json"))
    args = parser.parse_args(argv)
    rows = [measure(layout, args.batch, args.seconds) for layout in ("two", "one")]
    print(f"{'layout':<8}{'appends/s':>11}{'commit p50':>12}{'p99':>9}{'max':>9}"
          f"{'folded/s':>10}{'lag at end':>12}")
    for r in rows:
        print(f"{r['layout']:<8}{r['appends_per_s']:>11.0f}{r['p50_ms']:>10.2f}ms"
              f"{r['p99_ms']:>7.2f}ms{r['max_ms']:>7.1f}ms{r['folded'] / args.seconds:>10.0f}"
              f"{r['lag_at_end']:>12}")
    Path(args.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                          "batch": args.batch, "seconds": args.seconds,
                                          "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
