"""Store size under churn: ingest and sweep for many TTL cycles, print the size after each.

    python bench/churn.py [--cycles 20] [--events 20000]

Runs in one process on a temporary store with an injected clock (one cycle = one TTL), so 20
TTL cycles take a minute instead of 1,200 days. Each cycle ingests `--events` events over fresh
sessions and returning users (appended to the log and folded into the views), then sweeps what
the TTL expired. Printed per cycle: events held, the two files' sizes, and the pages in use
(LMDB's high-water mark). Under steady churn the sizes level off: pages freed by the sweeper
are reused.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otserver.config import Config  # noqa: E402
from otserver.folder import Folder  # noqa: E402
from otserver.model import EidGenerator, make_event  # noqa: E402
from otserver.store import Store  # noqa: E402
from otserver.sweeper import sweep_step  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args(argv)
    config = Config()
    ttl_ms = 60 * 86_400_000
    start = 1_800_000_000_000
    rand = random.Random(1)
    gen = EidGenerator()
    with tempfile.TemporaryDirectory(prefix="otchurn-") as tmp:
        store = Store(os.path.join(tmp, "store"))
        folder = Folder(store.log, store.views, config, sweeper=False)
        print(f"{'cycle':>5} {'events held':>12} {'files MiB':>10} {'in use MiB':>11} {'swept':>8}")
        for cycle in range(args.cycles):
            now = start + cycle * ttl_ms
            for first in range(0, args.events, 1000):
                batch = []
                for i in range(first, min(first + 1000, args.events)):
                    user = rand.randrange(args.events // 4)
                    props = {"si": "shop.example.com", "sid": f"c{cycle}-s{i // 8}",
                             "uid": f"u{user}", "url": f"https://shop.example.com/p/{i % 500}",
                             "title": "Example Shop", "ev": "pageview"}
                    batch.append(make_event(props, {"ip": "127.0.0.0"}, gen,
                                            now + i * (ttl_ms // args.events), config))
                store.log.append([event.encode() for event in batch])
                folder.catch_up()
            swept = 0
            while True:
                step = sweep_step(store.log, store.views, now + ttl_ms - 1, ttl_ms, 5000)
                swept += step["events"]
                if not step["more"]:
                    break
            envs = (store.log.store, store.views.store)
            size = sum(env.file_bytes() for env in envs)
            used = sum(env.used_bytes() for env in envs)
            held = store.counts()["events"]
            print(f"{cycle:>5} {held:>12,} {size / 2**20:>10.1f} {used / 2**20:>11.1f} {swept:>8,}",
                  flush=True)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
