"""Counters and histograms, rendered in the Prometheus text format.

Counting costs one dict increment per request (no locks: everything counts on the event loop,
except commit figures, which the writer reports back to the loop too). With several workers
each process writes a snapshot of its numbers to `<data_dir>/metrics/<pid>.json` once a second,
and /metrics adds up the snapshots of every live worker, so any worker answers for all. The
folder process writes `folder.json` the same way; its figures are shown as they are.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import Counter

COMMIT_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
FOLD_SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000)
LAG_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        return {"counts": self.counts, "total": self.total, "count": self.count}


ENDPOINTS = {path: path.decode() for path in
             (b"/", b"/batch", b"/pixel.gif", b"/healthz", b"/readyz", b"/metrics")}
REFUSAL_CLASSES = {
    b"400": "bad_request", b"401": "unauthorized", b"403": "forbidden", b"404": "not_found",
    b"405": "method_not_allowed", b"413": "body_too_large", b"414": "url_too_long",
    b"415": "unsupported_media_type", b"429": "too_many_requests", b"431": "headers_too_large", b"500": "internal_error",
    b"503": "unavailable", b"505": "http_version",
}


def endpoint(path: bytes) -> str:
    """The label a path is counted under: the ingest and operations paths, the API's
    resources, or "other" (so a scan of random paths cannot grow the label set)."""
    name = ENDPOINTS.get(path)
    if name is not None:
        return name
    parts = path.split(b"/")
    if len(parts) >= 4 and parts[1] == b"api" and parts[2] == b"v1":
        name = parts[3].decode("ascii", "replace")
        if name in ("events", "sessions", "users", "stats", "live"):
            return f"/api/v1/{name}" + ("/{id}" if len(parts) > 4 else "")
    return "other"


class Metrics:
    def __init__(self):
        self.requests: Counter = Counter()  # "endpoint status" -> n
        self.refusals: Counter = Counter()  # reason class -> n
        self.commit_events = Histogram(COMMIT_SIZE_BUCKETS)
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)
        self._labels: dict = {}  # (path, status) -> its counter label

    def answered(self, path: bytes, status: bytes) -> None:
        """One answer sent (or a refusal at the transport), by endpoint and status."""
        label = self._labels.get((path, status))
        if label is None:  # once per path and status (a bounded number of them kept)
            label = endpoint(path) + " " + status.decode()
            if len(self._labels) < 1024:
                self._labels[(path, status)] = label
        self.requests[label] += 1
        if status[0] >= 0x34:  # 4xx and 5xx
            self.refusals[REFUSAL_CLASSES.get(status, status.decode())] += 1

    def timed_out(self) -> None:
        self.refusals["timeout"] += 1

    def observe_commit(self, count: int, seconds: float) -> None:
        self.commit_events.observe(count)
        self.commit_seconds.observe(seconds)

    def snapshot(self, writer, connections: int, live) -> dict:
        """This process's numbers, as plain data (for the file other workers read)."""
        return {
            "requests": dict(self.requests),
            "refusals": dict(self.refusals),
            "commit_events": self.commit_events.snapshot(),
            "commit_seconds": self.commit_seconds.snapshot(),
            "events_stored": writer.events_stored,
            "events_replayed": writer.events_replayed,
            "commits": writer.commits,
            "lock_seconds": writer.lock_seconds,
            "queue_events": writer.pending_events,
            "connections": connections,
            "live_subscribers": len(live),
            "live_dropped": live.dropped,
        }


def write_snapshot(directory: str, snapshot: dict, name: str | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name or f"{os.getpid()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
        json.dump(snapshot, out)
    os.replace(tmp, path)


def read_snapshots(directory: str, own_pid: int, own: dict) -> list[dict]:
    """Every live worker's snapshot; this process's own numbers are taken live."""
    snapshots = [own]
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return snapshots
    for name in names:
        if not name.endswith(".json"):
            continue
        pid = int(name[:-5]) if name[:-5].isdigit() else None
        if pid is None or pid == own_pid or not alive(pid):
            continue
        try:
            with open(os.path.join(directory, name)) as data:
                snapshots.append(json.load(data))
        except (OSError, ValueError):
            continue
    return snapshots


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _merge_histograms(items: list[dict], bounds) -> dict:
    counts = [0] * (len(bounds) + 1)
    total, count = 0.0, 0
    for item in items:
        for i, n in enumerate(item["counts"]):
            counts[i] += n
        total += item["total"]
        count += item["count"]
    return {"counts": counts, "total": total, "count": count}


def render(snapshots: list[dict], store_info: dict, folder: dict | None,
           views: dict, relay: dict | None = None) -> bytes:
    """The Prometheus text exposition of all workers' numbers added up, and the folder's."""
    requests: Counter = Counter()
    refusals: Counter = Counter()
    sums = Counter()
    for snap in snapshots:
        requests.update(snap["requests"])
        refusals.update(snap["refusals"])
        for key in ("events_stored", "events_replayed", "commits", "queue_events",
                    "connections", "live_subscribers", "live_dropped", "lock_seconds"):
            sums[key] += snap.get(key, 0)
    lines = [
        "# HELP otserver_requests_total Answers sent, by endpoint and status.",
        "# TYPE otserver_requests_total counter",
    ]
    for key, n in sorted(requests.items()):
        endpoint, status = key.rsplit(" ", 1)
        lines.append(f'otserver_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    lines += ["# HELP otserver_refusals_total Requests refused, by reason class.",
              "# TYPE otserver_refusals_total counter"]
    for reason, n in sorted(refusals.items()):
        lines.append(f'otserver_refusals_total{{reason="{reason}"}} {n}')
    lines += [
        "# HELP otserver_events_stored_total Events committed and synced.",
        "# TYPE otserver_events_stored_total counter",
        f"otserver_events_stored_total {sums['events_stored']}",
        "# HELP otserver_events_replayed_total Events answered with the eid stored for their "
        "idempotency key, storing nothing.",
        "# TYPE otserver_events_replayed_total counter",
        f"otserver_events_replayed_total {sums['events_replayed']}",
        "# HELP otserver_commits_total Write transactions committed by ingest.",
        "# TYPE otserver_commits_total counter",
        f"otserver_commits_total {sums['commits']}",
        "# HELP otserver_log_lock_seconds_total Time ingest commits held the log's write lock.",
        "# TYPE otserver_log_lock_seconds_total counter",
        f"otserver_log_lock_seconds_total {sums['lock_seconds']}",
        "# HELP otserver_queue_events Events accepted and waiting for their commit.",
        "# TYPE otserver_queue_events gauge",
        f"otserver_queue_events {sums['queue_events']}",
        "# HELP otserver_connections Open client connections.",
        "# TYPE otserver_connections gauge",
        f"otserver_connections {sums['connections']}",
        "# HELP otserver_live_subscribers Open live (SSE) streams.",
        "# TYPE otserver_live_subscribers gauge",
        f"otserver_live_subscribers {sums['live_subscribers']}",
        "# HELP otserver_live_dropped_total Live subscribers dropped for falling behind.",
        "# TYPE otserver_live_dropped_total counter",
        f"otserver_live_dropped_total {sums['live_dropped']}",
    ]
    lines += _guard_lines([snap.get("guards", {}) for snap in snapshots])
    for name, bounds, help_text in (
            ("commit_events", COMMIT_SIZE_BUCKETS, "Events per ingest commit."),
            ("commit_seconds", COMMIT_SECONDS_BUCKETS, "Time to write and sync one commit.")):
        lines += _histogram(f"otserver_{name}", help_text, bounds,
                            _merge_histograms([s[name] for s in snapshots], bounds))
    folder = folder or {}
    lines += [
        "# HELP otserver_log_position The log's last position.",
        "# TYPE otserver_log_position gauge",
        f"otserver_log_position {views['tail']}",
        "# HELP otserver_views_watermark The last log position folded into the views.",
        "# TYPE otserver_views_watermark gauge",
        f"otserver_views_watermark {views['watermark']}",
        "# HELP otserver_view_lag_events Log entries not yet folded into the views.",
        "# TYPE otserver_view_lag_events gauge",
        f"otserver_view_lag_events {max(0, views['tail'] - views['watermark'])}",
        "# HELP otserver_view_lag_seconds Age of the oldest entry not yet folded (0: none).",
        "# TYPE otserver_view_lag_seconds gauge",
        f"otserver_view_lag_seconds {views['lag_seconds']}",
        "# HELP otserver_folder_up 1 while a folder process holds the data directory's lock.",
        "# TYPE otserver_folder_up gauge",
        f"otserver_folder_up {1 if views['folder_up'] else 0}",
        "# HELP otserver_folded_events_total Log entries folded (by the running folder).",
        "# TYPE otserver_folded_events_total counter",
        f"otserver_folded_events_total {folder.get('folded', 0)}",
        "# HELP otserver_fold_seconds_total Time the folder spent in fold transactions.",
        "# TYPE otserver_fold_seconds_total counter",
        f"otserver_fold_seconds_total {folder.get('fold_seconds', 0.0)}",
    ]
    empty = {"counts": [], "total": 0.0, "count": 0}
    lines += _histogram("otserver_fold_events", "Entries per fold transaction.",
                        FOLD_SIZE_BUCKETS, folder.get("fold_sizes", empty))
    lines += _histogram("otserver_fold_lag_seconds",
                        "Age of each fold batch's oldest entry when the batch committed.",
                        LAG_SECONDS_BUCKETS, folder.get("lag_histogram", empty))
    swept = folder.get("swept", {})
    lines += ["# HELP otserver_swept_total Things the sweeper deleted.",
              "# TYPE otserver_swept_total counter"]
    for kind in ("events", "sessions", "users"):
        lines.append(f'otserver_swept_total{{kind="{kind}"}} {swept.get(kind, 0)}')
    lines += ["# HELP otserver_sweeper_passes_total Completed sweeper passes.",
              "# TYPE otserver_sweeper_passes_total counter",
              f"otserver_sweeper_passes_total {swept.get('passes', 0)}"]
    lines += ["# HELP otserver_store_file_bytes Size of each environment's data file.",
              "# TYPE otserver_store_file_bytes gauge"]
    envs = [env for env in ("log", "views", "stream") if env in store_info]
    lines += [f'otserver_store_file_bytes{{env="{env}"}} {store_info[env]["file_bytes"]}'
              for env in envs]
    lines += ["# HELP otserver_store_used_bytes Pages in use in each environment.",
              "# TYPE otserver_store_used_bytes gauge"]
    lines += [f'otserver_store_used_bytes{{env="{env}"}} {store_info[env]["used_bytes"]}'
              for env in envs]
    lines += ["# HELP otserver_store_max_bytes The size cap of each environment.",
              "# TYPE otserver_store_max_bytes gauge",
              f"otserver_store_max_bytes {store_info['max_bytes']}"]
    if relay is not None:
        lines += _relay_lines(relay)
    return ("\n".join(lines) + "\n").encode()


def _relay_lines(relay: dict) -> list[str]:
    """The relay's figures (relay.Relay.snapshot), with --nats."""
    lines = [
        "# HELP otserver_nats_connected 1 while the relay is connected to NATS.",
        "# TYPE otserver_nats_connected gauge",
        f"otserver_nats_connected {1 if relay.get('connected') else 0}",
        "# HELP otserver_outbox_lag_events Log entries the stream has not acknowledged yet.",
        "# TYPE otserver_outbox_lag_events gauge",
        f"otserver_outbox_lag_events {relay.get('lag_events', 0)}",
        "# HELP otserver_outbox_lag_seconds Age of the oldest entry the stream has not "
        "acknowledged (0: none).",
        "# TYPE otserver_outbox_lag_seconds gauge",
        f"otserver_outbox_lag_seconds {relay.get('lag_seconds', 0.0)}",
        "# HELP otserver_outbox_published_total Entries published to the stream (by the "
        "running relay).",
        "# TYPE otserver_outbox_published_total counter",
        f"otserver_outbox_published_total {relay.get('published', 0)}",
        "# HELP otserver_outbox_resent_total Entries published again (a timeout, a lost "
        "connection, a refusal by the stream).",
        "# TYPE otserver_outbox_resent_total counter",
        f"otserver_outbox_resent_total {relay.get('resent', 0)}",
        "# HELP otserver_outbox_duplicates_total Entries the stream answered it held already "
        "(sent again after a restart or a reset; stored once).",
        "# TYPE otserver_outbox_duplicates_total counter",
        f"otserver_outbox_duplicates_total {relay.get('duplicates', 0)}",
    ]
    if "copy_tail" in relay:
        lines += [
            "# HELP otserver_stream_copy_position The last stream sequence copied (--cluster).",
            "# TYPE otserver_stream_copy_position gauge",
            f"otserver_stream_copy_position {relay['copy_tail']}",
            "# HELP otserver_stream_copy_lag_messages Stream messages not yet copied.",
            "# TYPE otserver_stream_copy_lag_messages gauge",
            f"otserver_stream_copy_lag_messages "
            f"{max(0, relay.get('stream_last', 0) - relay['copy_tail'])}",
        ]
    return lines


GUARDS = ("unregistered_site", "origin", "rate_limit_ip", "rate_limit_site", "quota")


def _guard_lines(guards: list[dict]) -> list[str]:
    """Who-may-send figures (guards.Guards.snapshot) of every worker, added up."""
    refused: Counter = Counter()
    for snap in guards:
        refused.update(snap.get("refused", {}))
    lines = ["# HELP otserver_guard_refusals_total Ingest requests refused by a guard "
             "(unregistered site, origin, rate limit by address or site, quota); nothing of "
             "them was stored.",
             "# TYPE otserver_guard_refusals_total counter"]
    lines += [f'otserver_guard_refusals_total{{guard="{name}"}} {refused[name]}'
              for name in GUARDS]
    lines += [
        "# HELP otserver_rate_limit_clients Client addresses the rate limiters remember.",
        "# TYPE otserver_rate_limit_clients gauge",
        f"otserver_rate_limit_clients {sum(s.get('clients', 0) for s in guards)}",
        "# HELP otserver_rate_limit_clients_dropped_total Client addresses forgotten (the "
        "least recently seen) to keep within --rate-limit-clients.",
        "# TYPE otserver_rate_limit_clients_dropped_total counter",
        f"otserver_rate_limit_clients_dropped_total "
        f"{sum(s.get('clients_dropped', 0) for s in guards)}",
        "# HELP otserver_registered_sites Sites registered with otserver site add.",
        "# TYPE otserver_registered_sites gauge",
        f"otserver_registered_sites {max((s.get('registered_sites', 0) for s in guards), default=0)}",
    ]
    return lines


def _histogram(metric: str, help_text: str, bounds, data: dict) -> list[str]:
    lines = [f"# HELP {metric} {help_text}", f"# TYPE {metric} histogram"]
    running = 0
    counts = data["counts"] or [0] * (len(bounds) + 1)
    for bound, n in zip(bounds, counts):
        running += n
        lines.append(f'{metric}_bucket{{le="{bound}"}} {running}')
    lines.append(f'{metric}_bucket{{le="+Inf"}} {data["count"]}')
    lines.append(f"{metric}_sum {data['total']}")
    lines.append(f"{metric}_count {data['count']}")
    return lines
