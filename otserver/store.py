"""The data directory: the event log and its views, two LMDB environments.

  <data dir>/log/          the event log (log.py): what a `200` waits for
  <data dir>/views/        sessions, users, indexes, counters (views.py), folded from the log
  <data dir>/folder.lock   held by the one folder process (folder.py)
  <data dir>/metrics/      each process's numbers, for /metrics

Two environments mean two write locks: an ingest commit never waits behind a fold transaction
(bench/envs.py measures the difference). A data directory written by otserver 0.1 (one
environment, `data.mdb` at the top, schema 1) is migrated in place the first time it is opened
for writing (migrate.py); an unknown schema is refused.
"""
from __future__ import annotations

import os

from .lmdbenv import SchemaError
from .log import EventLog, log_path
from .dimensions import parse_names
from .tallies import Reporting
from .views import Views, views_path


class Store:
    def __init__(self, data_dir: str, *, initial_bytes: int = 64 << 20,
                 max_bytes: int = 64 << 30, readonly: bool = False, reporting=None):
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
        try:
            self.views = Views(views_path(data_dir), initial_bytes=initial_bytes,
                               max_bytes=max_bytes, readonly=readonly, reporting=reporting)
        except BaseException:
            self.log.close()
            raise
        self.max_bytes = max_bytes

    def close(self) -> None:
        self.views.close()
        self.log.close()

    def counts(self) -> dict:
        """Events in the log (its entries but the erasure requests), records in the views."""
        return {"events": self.log.event_count(), **self.views.counts(),
                "tokens": self.log.count_tokens()}

    def event_ids(self) -> list[str]:
        """Every eid in the log, in log order (for tests and small stores)."""
        from .model import LogEntry
        with self.log.read() as txn:
            return [entry.eid for entry in
                    (LogEntry(p, raw) for p, raw in self.log.entries_after(txn, 0, 1 << 62))
                    if entry.is_event]


def open_store(config, *, readonly: bool = False) -> Store:
    return Store(config.data_dir, initial_bytes=config.initial_store_bytes,
                 max_bytes=config.max_store_bytes, readonly=readonly,
                 reporting=reporting_of(config))


def reporting_of(config) -> Reporting:
    """What the views count for reports, as configured."""
    return Reporting(parse_names(config.breakdown_properties), config.breakdown_values)
