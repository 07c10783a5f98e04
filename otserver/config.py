"""Every setting of otserver, in one frozen dataclass.

Units are in the names (`_s` seconds, `_bytes`, `_ms`). Each field can be set from the command
line (`--field-name`) or the environment (`OTSERVER_FIELD_NAME`); the command line wins.
`parse_duration` and `parse_size` turn human input ("60d", "512MiB") into numbers.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": KIB, "kb": KIB, "kib": KIB,
    "m": MIB, "mb": MIB, "mib": MIB,
    "g": GIB, "gb": GIB, "gib": GIB,
    "t": 1024 * GIB, "tb": 1024 * GIB, "tib": 1024 * GIB,
}
_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(text: str | float | int) -> float:
    """'60d' -> 5184000.0; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _NUMBER_UNIT.match(text)
    unit = m.group(2).lower() or "s" if m else None
    if unit not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use a number with ms, s, m, h, d or w)")
    return float(m.group(1)) * _DURATION_UNITS[unit]


def parse_int(text: str | int) -> int:
    """'500' -> 500: a whole number, 0 or more."""
    if isinstance(text, int):
        return text
    if not text.strip().isdigit():
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def parse_size(text: str | int) -> int:
    """'512MiB' -> 536870912; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = _NUMBER_UNIT.match(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use a number with KiB, MiB, GiB or TiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_networks(text: str | tuple) -> tuple:
    """'10.0.0.0/8, 127.0.0.1' -> (IPv4Network, IPv4Network)."""
    if isinstance(text, tuple):
        return text
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True, slots=True)
class Config:
    # listening
    host: str = "127.0.0.1"  # the systemd environment file sets the public address
    port: int = 8080
    data_dir: str = "./otdata"
    workers: int = 1

    # HTTP limits (SPEC 2.6)
    max_url_bytes: int = 8 * KIB
    max_header_bytes: int = 16 * KIB
    max_header_count: int = 100
    max_body_bytes: int = 64 * KIB
    max_batch_body_bytes: int = 1 * MIB
    max_batch_events: int = 10_000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_s: float = 60.0
    max_pipelined: int = 64

    # properties (SPEC 2.2)
    max_properties: int = 256
    max_name_chars: int = 128
    max_value_bytes: int = 8 * KIB
    max_id_chars: int = 255

    # what the server captures beside the event (SPEC 2.4)
    capture_user_agent: bool = True
    capture_referer: bool = True
    capture_ip: bool = True
    anonymize_ip: bool = True
    trusted_proxies: tuple = ()

    # who may send (SPEC 2.6): registered sites, rate limits (events a second), quotas
    require_site: bool = False  # the systemd environment file turns it on
    rate_limit_per_ip: int = 0  # 0: no limit
    rate_limit_per_ip_burst: int = 0  # 0: ten seconds of the rate
    rate_limit_per_site: int = 0
    rate_limit_per_site_burst: int = 0
    rate_limit_clients: int = 65_536  # client addresses a process tracks (least recent dropped)
    max_events_per_site: int = 0  # events a site may hold within the TTL; 0: no quota

    # storage and group commit (SPEC 2.5, 3)
    initial_store_bytes: int = 64 * MIB
    max_store_bytes: int = 64 * GIB
    min_free_disk_bytes: int = 64 * MIB
    max_pending_events: int = 50_000
    retry_after_s: int = 1
    writer_stall_s: float = 10.0
    idempotency_window_s: float = 86400.0

    # the views and the folder (SPEC 2.5)
    fold_batch_events: int = 5_000
    fold_delay_s: float = 0.05
    max_view_lag: int = 100_000
    max_read_wait_s: float = 2.0
    ttl_s: float = 60 * 86400.0
    allow_short_ttl: bool = False
    sweep_interval_s: float = 60.0
    sweep_step_limit: int = 500

    # reports (SPEC 5)
    breakdown_properties: str = ""  # comma-separated property names, beside the built-ins
    breakdown_values: int = 1000  # values per site, dimension and hour (and day); more: (other)

    # operations
    tls_cert: str = ""
    tls_key: str = ""
    access_log: bool = False

    # beyond one machine (SPEC 7): the relay to NATS JetStream (relay.py)
    nats: str = ""  # comma-separated server URLs; empty: no outbox
    node_id: str = ""  # this node's name in the stream's subjects; empty: the host name
    nats_stream: str = "OTSERVER"
    nats_replicas: int = 1  # copies of the stream, when otserver creates it
    nats_creds: str = ""  # a .creds file (JWT and NKey seed)
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_tls_ca: str = ""  # CA file to verify the NATS servers (tls:// URLs)
    nats_tls_cert: str = ""  # client certificate and key, when the servers ask for one
    nats_tls_key: str = ""
    cluster: bool = False  # fold the views from the stream (every node the same views)

    # read API paging
    default_page_size: int = 100
    max_page_size: int = 1000
    max_listing_page: int = 10_000

    # live stream (SSE)
    live_buffer_bytes: int = 1 * MIB
    live_heartbeat_s: float = 15.0
    live_replay_max: int = 1000

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


# How a text setting (flag or environment variable) becomes a typed value.
CONVERTERS = {
    int: parse_int,
    float: parse_duration,
    bool: parse_bool,
    str: str,
    tuple: parse_networks,
}
SIZE_FIELDS = frozenset(
    f.name for f in dataclasses.fields(Config) if f.name.endswith("_bytes")
)


def setting_name(field_name: str) -> str:
    """The name a person types: `ttl_s` is `ttl` (it takes units), `max_url_bytes` stays."""
    return field_name[:-2] if field_name.endswith("_s") else field_name


def convert(name: str, text):
    """Turn one setting's text into the type its field holds."""
    if name in SIZE_FIELDS:
        return parse_size(text)
    if name == "ttl_s" and isinstance(text, str) and text.strip().replace(".", "", 1).isdigit():
        raise ValueError(f"{text!r} needs a unit: 60d is sixty days, 12h twelve hours")
    kind = type(getattr(Config(), name))
    return CONVERTERS[kind](text)


def from_env(environ, base: Config | None = None) -> Config:
    """Apply every OTSERVER_<SETTING> variable found in `environ` to `base`."""
    base = base or Config()
    changes = {}
    for f in dataclasses.fields(Config):
        variable = "OTSERVER_" + setting_name(f.name).upper()
        text = environ.get(variable)
        if text is not None:
            try:
                changes[f.name] = convert(f.name, text)
            except ValueError as exc:
                raise ValueError(f"{variable}: {exc}") from None
    return base.replace(**changes)


def to_env(config: Config) -> dict:
    """Every setting as its OTSERVER_* variable: how a child process gets the same Config."""
    env = {}
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        if isinstance(value, tuple):
            value = ",".join(str(net) for net in value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, float):
            value = f"{value!r}s"
        env["OTSERVER_" + setting_name(f.name).upper()] = str(value)
    return env


def _format_duration(seconds: float) -> str:
    """5184000.0 -> '60d', 0.05 -> '50ms': the largest unit that gives a whole number of at
    least 2 (so 60 seconds stay '60s')."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count = seconds / size
        if count >= 2 and count == int(count):
            return f"{int(count)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _format_size(size: int) -> str:
    """67108864 -> '64MiB'."""
    for unit, scale in (("TiB", 1024 * GIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def format_setting(name: str, value) -> str:
    """A setting's value as a person writes it (and as --help, README.md and
    systemd/otserver.env show defaults): '60d', '64MiB', 'on', 'none'."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if name in SIZE_FIELDS:
        return _format_size(value)
    if isinstance(value, float):
        return _format_duration(value)
    if isinstance(value, tuple):
        return ",".join(str(net) for net in value) or "none"
    if value == "":
        return "none"
    return str(value)


_SUBJECT_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check(config: Config) -> None:
    """Refuse settings that cannot be meant, naming the flag (ValueError)."""
    if not 0 <= config.port <= 65535:
        raise ValueError(f"--port {config.port}: a port is a number from 0 to 65535")
    if config.workers < 1:
        raise ValueError("--workers: at least 1")
    if config.ttl_s <= 0:
        raise ValueError("--ttl must be longer than 0: it is how long data is kept "
                         "(the default is 60d)")
    if config.ttl_s < 3600 and not config.allow_short_ttl:
        raise ValueError(f"--ttl {format_setting('ttl_s', config.ttl_s)} is shorter than one "
                         "hour: everything older is deleted soon after start. Add "
                         "--allow-short-ttl if that is what you want")
    if config.idempotency_window_s <= 0:
        raise ValueError("--idempotency-window must be longer than 0: it is how long a retry "
                         "with the same key is answered with the original eids (default 24h)")
    if config.sweep_step_limit < 1 or config.fold_batch_events < 1:
        raise ValueError("--sweep-step-limit and --fold-batch-events: at least 1")
    if config.rate_limit_clients < 1:
        raise ValueError("--rate-limit-clients: at least 1")
    if config.breakdown_values < 1:
        raise ValueError("--breakdown-values: at least 1")
    from .dimensions import parse_names
    parse_names(config.breakdown_properties)  # ValueError naming the flag
    if config.max_store_bytes < config.initial_store_bytes:
        raise ValueError("--max-store-bytes is smaller than --initial-store-bytes")
    if config.cluster and not config.nats:
        raise ValueError("--cluster folds the views from the NATS stream: give --nats URL")
    if config.nats and not _SUBJECT_TOKEN.match(config.nats_stream):
        raise ValueError(f"--nats-stream {config.nats_stream!r}: letters, digits, - and _ only")
    if config.node_id and not _SUBJECT_TOKEN.match(config.node_id):
        raise ValueError(f"--node-id {config.node_id!r}: letters, digits, - and _ only (it "
                         "is a token of the stream's subjects)")
    if not 1 <= config.nats_replicas <= 5:
        raise ValueError("--nats-replicas: from 1 to 5 (JetStream's limit)")
    if config.data_dir and os.path.exists(config.data_dir) and not os.path.isdir(config.data_dir):
        raise ValueError(f"--data-dir {config.data_dir} is a file, not a directory")


__all__ = ["Config", "check", "convert", "format_setting", "from_env", "parse_duration",
           "parse_size", "setting_name", "to_env"]
