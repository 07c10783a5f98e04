"""The data directory: the event log and its views, two LMDB environments.

  <data dir>/log/          the event log (log.py): what a `200` waits for
  <data dir>/views/        sessions, users, indexes, counters (views.py), folded from the log
  <data dir>/stream/       a cluster node's copy of the NATS stream (relay.py): with --cluster
                           the views are folded from it instead of the node's own log
  <data dir>/folder.lock   held by the one folder process (folder.py)
  <data dir>/metrics/      each process's numbers, for /metrics

Two environments mean two write locks: an ingest commit never waits behind a fold transaction
(bench/envs.py measures the difference). A data directory written by otserver 0.1 (one
environment, `data.mdb` at the top, schema 1) is migrated in place the first time it is opened
for writing (migrate.py); an unknown schema is refused.
"""
from __future__ import annotations

import logging
import os

from .lmdbenv import SchemaError
from .log import EventLog, copy_path, log_path
from .dimensions import parse_names
from .tallies import Reporting
from .views import Views, views_path

log = logging.getLogger("otserver")


class Store:
    def __init__(self, data_dir: str, *, initial_bytes: int = 64 << 20,
                 max_bytes: int = 64 << 30, readonly: bool = False, reporting=None,
                 cluster: bool = False):
        from .migrate import has_v1_store, migrate_v1
        self.path = data_dir
        if has_v1_store(data_dir):
            if readonly:
                raise SchemaError(f"{data_dir} holds a store of otserver 0.1: open it once "
                                  "with a command that writes (otserver serve, otserver info) "
                                  "to migrate it")
            migrate_v1(data_dir, initial_bytes=initial_bytes, max_bytes=max_bytes,
                       reporting=reporting)
        if readonly and not os.path.isdir(log_path(data_dir)):
            raise SchemaError(f"{data_dir} holds no otserver store")
        self.log = EventLog(log_path(data_dir), initial_bytes=initial_bytes,
                            max_bytes=max_bytes, readonly=readonly)
        # `events`: the log the views are folded from and whose positions they name: the
        # node's own log, or on a cluster node its copy of the stream. A directory that has
        # a copy stays a cluster node's (for every command, with or without --cluster).
        joining = cluster and not os.path.isdir(copy_path(data_dir))
        self.events = self.log
        try:
            if cluster or os.path.isdir(copy_path(data_dir)):
                self.events = EventLog(copy_path(data_dir), initial_bytes=initial_bytes,
                                       max_bytes=max_bytes, readonly=readonly)
            self.views = Views(views_path(data_dir), initial_bytes=initial_bytes,
                               max_bytes=max_bytes, readonly=readonly, reporting=reporting)
        except BaseException:
            self._close_logs()
            raise
        if joining and not readonly and self.views.watermark():
            # Views folded from the node's own log name its positions, not the stream's:
            # start them again from the copy (the node's events come back through it).
            self.views.write(self.views.drop_all)
            log.warning("%s joins a cluster: its views are folded again from the stream",
                        data_dir)
        self.max_bytes = max_bytes

    @property
    def cluster(self) -> bool:
        return self.events is not self.log

    def _close_logs(self) -> None:
        if self.cluster:
            self.events.close()
        self.log.close()

    def close(self) -> None:
        self.views.close()
        self._close_logs()

    def environments(self) -> list[tuple[str, object]]:
        """(name, Environment) of each LMDB environment, for sizes and metrics."""
        named = [("log", self.log.store), ("views", self.views.store)]
        return named + [("stream", self.events.store)] if self.cluster else named

    def counts(self) -> dict:
        """Events in the log the views are folded from (its entries but the erasure
        requests), records in the views."""
        return {"events": self.events.event_count(), **self.views.counts(),
                "tokens": self.log.count_tokens()}

    def event_ids(self) -> list[str]:
        """Every eid in the log, in log order (for tests and small stores)."""
        from .model import LogEntry
        with self.events.read() as txn:
            return [entry.eid for entry in
                    (LogEntry(p, raw) for p, raw in self.events.entries_after(txn, 0, 1 << 62))
                    if entry.is_event]


def open_store(config, *, readonly: bool = False) -> Store:
    return Store(config.data_dir, initial_bytes=config.initial_store_bytes,
                 max_bytes=config.max_store_bytes, readonly=readonly,
                 reporting=reporting_of(config), cluster=config.cluster)


def reporting_of(config) -> Reporting:
    """What the views count for reports, as configured."""
    return Reporting(parse_names(config.breakdown_properties), config.breakdown_values)
