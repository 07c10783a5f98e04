"""The `otserver` command: serve | fold | rebuild-views | sweep | info | backup | export |
import | token ... | site ....

`build_config(args, environ)` turns flags and OTSERVER_* variables into a Config (flags win);
`run` does the work. Every Config field is a `serve` flag named after it (`--max-url-bytes`,
`--ttl`, `--capture-ip/--no-capture-ip`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from . import __version__
from .config import Config, check, convert, format_setting, from_env, setting_name
from .errors import HttpError
from .lmdbenv import SchemaError

FIELD_HELP = {
    "host": "address to listen on",
    "port": "port to listen on (0: one the OS picks)",
    "data_dir": "directory of the LMDB store",
    "workers": "worker processes on one port (SO_REUSEPORT) over one data directory",
    "max_url_bytes": "longest request line (414 past it)",
    "max_header_bytes": "largest header block (431 past it)",
    "max_header_count": "most header fields (431 past it)",
    "max_body_bytes": "largest body of a single event (413 past it)",
    "max_batch_body_bytes": "largest body of POST /batch (413 past it)",
    "max_batch_events": "most events in one POST /batch",
    "header_timeout_s": "time for a request's headers to arrive (slowloris guard)",
    "body_timeout_s": "time for a request's body to arrive",
    "keepalive_s": "idle keep-alive connections are closed after this",
    "max_pipelined": "answers outstanding on one connection before reading pauses",
    "max_properties": "most properties per event",
    "max_name_chars": "longest property name",
    "max_value_bytes": "longest property value",
    "max_id_chars": "longest si, sid or uid",
    "capture_user_agent": "store the User-Agent header beside each event",
    "capture_referer": "store the Referer header beside each event",
    "capture_ip": "store the client address beside each event",
    "anonymize_ip": "zero the last IPv4 octet / last 80 IPv6 bits of stored addresses",
    "trusted_proxies": "comma-separated addresses or CIDRs whose X-Forwarded-For is believed",
    "require_site": "refuse (403) events for sites not registered with `otserver site add`",
    "rate_limit_per_ip": "events a second one client address may send (429 past it; 0: no "
                         "limit)",
    "rate_limit_per_ip_burst": "events a client address may send at once (0: ten seconds "
                               "of its rate)",
    "rate_limit_per_site": "events a second one site may take (429 past it; 0: no limit)",
    "rate_limit_per_site_burst": "events a site may take at once (0: ten seconds of its rate)",
    "rate_limit_clients": "client addresses the rate limiter remembers per process (the "
                          "least recently seen is forgotten)",
    "max_events_per_site": "events a site may hold within the TTL (429 past it; 0: no quota)",
    "initial_store_bytes": "map size the store starts with; it doubles as needed",
    "max_store_bytes": "cap of the store; past it ingest answers 503",
    "min_free_disk_bytes": "ingest answers 503 while the data directory's disk has less free "
                           "(a reserve, so the views can always fold what the log holds)",
    "max_pending_events": "events waiting for a commit before ingest answers 503",
    "retry_after_s": "Retry-After seconds sent with 503",
    "writer_stall_s": "/readyz answers 503 when a commit (or the folder) makes no progress this long",
    "idempotency_window_s": "how long a repeated idempotency key answers with the original eids",
    "fold_batch_events": "most log entries the folder applies in one views transaction",
    "fold_delay_s": "how long entries may gather before a fold when no read waits for them",
    "max_view_lag": "log entries not yet folded past which ingest answers 503",
    "max_read_wait_s": "how long a read waits for the views to reach its position (then 503)",
    "breakdown_properties": "comma-separated properties that breakdowns count, beside the "
                            "built-in dimensions",
    "breakdown_values": "values a breakdown keeps per site, dimension and hour (and day); "
                        "the rest count as (other)",
    "tls_cert": "PEM certificate (chain) file: serve HTTPS",
    "tls_key": "PEM private key file for --tls-cert",
    "access_log": "log one line per answered request (off by default)",
    "nats": "comma-separated NATS server URLs: publish every event of the log to JetStream "
            "(the outbox)",
    "node_id": "this node's name, unique in the cluster (none: the host name)",
    "nats_stream": "the JetStream stream (subjects STREAM.<node id>), created if missing",
    "nats_replicas": "copies of the stream when otserver creates it (3 on a 3-node cluster)",
    "nats_creds": "NATS credentials file (.creds)",
    "nats_user": "NATS user name",
    "nats_password": "NATS password",
    "nats_token": "NATS authentication token",
    "nats_tls_ca": "CA file to verify the NATS servers",
    "nats_tls_cert": "client certificate file for NATS (with --nats-tls-key)",
    "nats_tls_key": "client key file for NATS",
    "cluster": "fold the views from the stream, not the node's own log: every node holds "
               "the same views",
    "ttl_s": "how long data is kept (with a unit: 60d, 12h)",
    "allow_short_ttl": "accept a --ttl shorter than one hour (tests, demos)",
    "sweep_interval_s": "time between the sweeper's passes",
    "sweep_step_limit": "deletions per sweeper transaction",
    "default_page_size": "read API page size when no limit is given",
    "max_page_size": "largest read API page",
    "max_listing_page": "most events in one page of GET /api/v1/events",
    "live_buffer_bytes": "unsent bytes a live subscriber may fall behind before it is dropped",
    "live_heartbeat_s": "time between heartbeat comments on idle live streams",
    "live_replay_max": "most events replayed to a live stream resumed with Last-Event-ID",
}


def _add_config_flags(parser: argparse.ArgumentParser, fields) -> None:
    defaults = Config()
    for f in fields:
        name = setting_name(f.name)
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = (f"{FIELD_HELP[f.name]} (default {format_setting(f.name, default)}; "
                     f"env OTSERVER_{name.upper()})")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=name.upper(),
                                help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otserver", description="Self-hosted events engine (Opentracker raw-URL events API).")
    parser.add_argument("--version", action="version", version=f"otserver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    _add_config_flags(serve, dataclasses.fields(Config))

    data_dir_only = [f for f in dataclasses.fields(Config) if f.name == "data_dir"]
    store_fields = [f for f in dataclasses.fields(Config)
                    if f.name in ("data_dir", "max_store_bytes", "initial_store_bytes")]

    fold = sub.add_parser("fold", help="run the folder: fold the log into the views (and sweep) "
                          "until stopped; serve starts one by itself")
    fold.add_argument("--once", action="store_true",
                      help="fold until the views reach the log's last position, then exit")
    fold.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    _add_config_flags(fold, dataclasses.fields(Config))
    relay = sub.add_parser("relay", help="run the relay: publish the log to the NATS stream "
                           "(and with --cluster copy the stream); serve starts one by itself")
    relay.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    _add_config_flags(relay, dataclasses.fields(Config))
    writer = sub.add_parser("writer", help="(started by serve: the process that appends to "
                            "the log for one server process)")
    writer.add_argument("--fd", type=int, required=True, help=argparse.SUPPRESS)
    _add_config_flags(writer, [f for f in dataclasses.fields(Config) if f.name in (
        "data_dir", "max_store_bytes", "initial_store_bytes", "min_free_disk_bytes")])
    rebuild = sub.add_parser("rebuild-views", help="empty the views and fold the whole log "
                             "again (the server must be stopped)")
    _add_config_flags(rebuild, dataclasses.fields(Config))

    sweep = sub.add_parser("sweep", help="delete what is older than the TTL, once, and exit")
    _add_config_flags(sweep, [f for f in dataclasses.fields(Config)
                              if f.name in ("data_dir", "ttl_s", "allow_short_ttl",
                                            "sweep_step_limit")])
    info = sub.add_parser("info", help="counts, sizes, oldest and newest event")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    _add_config_flags(info, data_dir_only)
    export = sub.add_parser("export", help="write a site's events as NDJSON (or CSV) on stdout")
    export.add_argument("--si", required=True, help="the site")
    export.add_argument("--from", dest="start", default=None,
                        help="first time (unix ms or ISO 8601; default: the oldest)")
    export.add_argument("--to", dest="end", default=None,
                        help="end time, exclusive (unix ms or ISO 8601; default: now)")
    export.add_argument("--format", dest="fmt", choices=("ndjson", "csv"), default="ndjson",
                        help="NDJSON, one {event, captured} a line (the default; what import "
                        "reads), or CSV with a header")
    export.add_argument("--columns", default=None,
                        help="CSV only: the columns, comma-separated (captured fields as "
                        "captured.ip); default: every property and captured field")
    _add_config_flags(export, data_dir_only)
    importer = sub.add_parser("import", help="store events from NDJSON (as export writes it)")
    importer.add_argument("file", nargs="?", default="-", help="NDJSON file (default: stdin)")
    _add_config_flags(importer, store_fields)
    backup = sub.add_parser("backup", help="write a consistent, compacted copy of the store")
    backup.add_argument("dest", help="directory to create (must not hold a store already)")
    _add_config_flags(backup, store_fields)
    token = sub.add_parser("token", help="manage read API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="create a token for SITE (* for every site)")
    create.add_argument("site")
    create.add_argument("--label", default="", help="a note to recognise the token by")
    _add_config_flags(create, data_dir_only)
    listing = token_sub.add_parser("list", help="list tokens (ids, sites, never the tokens)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    _add_config_flags(listing, data_dir_only)
    revoke = token_sub.add_parser("revoke", help="revoke the token whose id starts with ID")
    revoke.add_argument("id")
    _add_config_flags(revoke, data_dir_only)
    site = sub.add_parser("site", help="manage registered sites (with --require-site, the "
                          "only ones ingest takes) and their allowed origins")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    add = site_sub.add_parser("add", help="register SITE, or change its origins")
    add.add_argument("site", help="the si value, exactly as events send it")
    add.add_argument("--origins", default=None,
                     help="comma-separated origins its browser requests may come from "
                     "(https://www.example.com, https://*.example.com); \"\" clears them; "
                     "none: any origin")
    _add_config_flags(add, data_dir_only + [f for f in dataclasses.fields(Config)
                                            if f.name == "max_id_chars"])
    site_list = site_sub.add_parser("list", help="list registered sites and their origins")
    site_list.add_argument("--json", action="store_true", help="print JSON lines")
    _add_config_flags(site_list, data_dir_only)
    remove = site_sub.add_parser("remove", help="unregister SITE (its events stay until "
                                 "they expire)")
    remove.add_argument("site")
    _add_config_flags(remove, data_dir_only)
    return parser


def build_config(args: argparse.Namespace, environ) -> Config:
    config = from_env(environ)
    changes = {}
    for f in dataclasses.fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            try:
                changes[f.name] = value if isinstance(value, bool) else convert(f.name, value)
            except ValueError as exc:
                raise SystemExit(f"otserver: --{setting_name(f.name).replace('_', '-')}: {exc}")
    config = config.replace(**changes)
    check(config)
    return config


# Commands that read or manage an existing store: they never create one.
NEEDS_STORE = frozenset(("info", "token", "site", "export", "sweep", "backup", "rebuild-views"))


def _require_store(command: str, data_dir: str) -> None:
    from .log import log_path
    from .migrate import has_v1_store
    if not (os.path.isdir(log_path(data_dir)) or has_v1_store(data_dir)):
        raise SystemExit(f"otserver {command}: {os.path.abspath(data_dir)} holds no otserver "
                         "store (give the server's --data-dir, or start `otserver serve` there "
                         "once to create one)")


def _export_columns(args: argparse.Namespace) -> list[str] | None:
    if args.columns is None:
        return None
    if args.fmt != "csv":
        raise SystemExit("otserver export: --columns needs --format csv")
    from .csvformat import parse_columns
    try:
        return parse_columns(args.columns)
    except ValueError as exc:
        raise SystemExit(f"otserver export: --columns: {exc}") from None


def serve(config: Config) -> int:
    """One serving process with its folder beside it, or with --workers a supervisor."""
    import uvloop

    from .folder import FolderProcess
    from .relay import start_relay
    from .server import serve as serve_process
    from .store import open_store
    from .log import copy_path
    if not config.cluster and os.path.isdir(copy_path(config.data_dir)):
        raise SystemExit(f"otserver: {config.data_dir} is a cluster node's (its views are "
                         "folded from the NATS stream): serve it with --nats URL --cluster, "
                         f"or delete {copy_path(config.data_dir)} and run otserver "
                         "rebuild-views to make it a lone server again")
    # Open the store once before any process serves it: a 0.1 store is migrated here, an
    # unknown schema refused, a new data directory laid out.
    open_store(config).close()
    if config.workers > 1:
        from .supervisor import supervise
        return supervise(config, config.workers)
    folder = FolderProcess(config)
    folder.start()
    if not folder.wait_running():
        logging.getLogger("otserver").error(
            "the folder process did not start; serving anyway (reads will wait)")
    relay = start_relay(config)
    try:
        return uvloop.run(serve_process(config, folder=folder, relay=relay))
    finally:
        if relay is not None:
            relay.stop()  # after the drain: it publishes what the last commits appended
        folder.stop()



def run(args: argparse.Namespace, config: Config) -> int:
    if args.command == "serve":
        return serve(config)
    if args.command == "writer":
        from .log import EventLog, log_path
        from .appender import run_writer
        event_log = EventLog(log_path(config.data_dir), initial_bytes=config.initial_store_bytes,
                             max_bytes=config.max_store_bytes)
        try:
            return run_writer(event_log, args.fd, config.min_free_disk_bytes,
                              config.idempotency_window_s)
        finally:
            event_log.close()
    if args.command == "relay":
        from .relay import run_relay
        return run_relay(config, parent=args.parent)
    from .store import open_store
    if args.command in NEEDS_STORE:
        _require_store(args.command, config.data_dir)
    store = open_store(config)
    try:
        if args.command == "fold":
            from .folder import catch_up, run_folder
            if args.once:
                return 0 if catch_up(store.events, store.views, config) else 1
            return run_folder(store, config, parent=args.parent)
        if args.command == "rebuild-views":
            from .folder import rebuild
            return rebuild(store.events, store.views, config)
        from . import admin, api
        if args.command == "sweep":
            return admin.sweep(store, config)
        if args.command == "info":
            return admin.print_info(store, as_json=args.json)
        if args.command == "backup":
            return admin.backup(store, args.dest)
        if args.command == "export":
            times = {"from": args.start, "to": args.end}
            return admin.export(store, config, args.si, api.parse_time(times, "from", None),
                                api.parse_time(times, "to", None), fmt=args.fmt,
                                columns=_export_columns(args))
        if args.command == "import":
            if args.file == "-":
                return admin.import_events(store, sys.stdin, config)
            with open(args.file, encoding="utf-8") as lines:
                return admin.import_events(store, lines, config)
        if args.command == "site":
            return _site(store, config, args)
        if args.token_command == "create":
            token, ident = admin.create_token(store.log, args.site, args.label)
            print(token)
            print(f"token {ident} for site {args.site!r} created; it is shown only this once",
                  file=sys.stderr)
        elif args.token_command == "list":
            for row in admin.list_tokens(store.log):
                if args.json:
                    print(json.dumps(row))
                else:
                    print(f"{row['id']}  {row['site']}  created "
                          f"{admin.format_time(row['created'])}  {row['label']}".rstrip())
        elif args.token_command == "revoke":
            removed = admin.revoke_token(store.log, args.id)
            if not removed:
                print(f"otserver: no token with id {args.id}", file=sys.stderr)
                return 1
            print(f"revoked {removed} token(s)", file=sys.stderr)
    finally:
        store.close()
    return 0


def _site(store, config: Config, args: argparse.Namespace) -> int:
    from . import admin
    if args.site_command == "add":
        new, origins = admin.add_site(store.log, args.site, args.origins, config.max_id_chars)
        allowed = ", ".join(origins) if origins else "any origin"
        print(f"site {args.site!r} {'registered' if new else 'updated'}; browser requests "
              f"from: {allowed}", file=sys.stderr)
    elif args.site_command == "list":
        for row in admin.list_sites(store.log):
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{row['si']}  registered {admin.format_time(row['created'])}  "
                      f"origins {','.join(row['origins']) or '*'}")
    elif args.site_command == "remove":
        if not admin.remove_site(store.log, args.site):
            print(f"otserver: no registered site {args.site!r}", file=sys.stderr)
            return 1
        print(f"site {args.site!r} removed; its events stay until they expire",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        config = build_config(args, os.environ)
    except ValueError as exc:
        raise SystemExit(f"otserver: {exc}")
    try:
        code = run(args, config)
        if args.command in ("writer", "fold"):
            # A helper process of serve, its store closed: leave without the interpreter's
            # teardown (tens of ms), which the server's stop would otherwise wait for.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    except BrokenPipeError:  # `otserver info | head -1`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the exit's flush does not fail again
        return 1
    except (ValueError, OSError, SchemaError) as exc:
        raise SystemExit(f"otserver: {exc}")
    except HttpError as exc:  # a bad --from/--to
        raise SystemExit(f"otserver: {exc.reason}")


if __name__ == "__main__":
    sys.exit(main())
