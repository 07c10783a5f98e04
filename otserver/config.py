"""Every setting of otserver, in one frozen dataclass.

Units are in the names (`_s` seconds, `_bytes`, `_ms`). Each field can be set from the command
line (`--field-name`) or the environment (`OTSERVER_FIELD_NAME`); the command line wins.
`parse_duration` and `parse_size` turn human input ("60d", "512MiB") into numbers.
"""
from __future__ import annotations

import dataclasses
import ipaddress
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
    host: str = "0.0.0.0"
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

    # storage and group commit (SPEC 2.5, 3)
    initial_store_bytes: int = 64 * MIB
    max_store_bytes: int = 64 * GIB
    min_free_disk_bytes: int = 64 * MIB
    max_pending_events: int = 50_000
    retry_after_s: int = 1
    writer_stall_s: float = 10.0

    # the views and the folder (SPEC 2.5)
    fold_batch_events: int = 5_000
    fold_delay_s: float = 0.05
    max_view_lag: int = 100_000
    max_read_wait_s: float = 2.0
    ttl_s: float = 60 * 86400.0
    sweep_interval_s: float = 60.0
    sweep_step_limit: int = 500

    # operations
    tls_cert: str = ""
    tls_key: str = ""
    access_log: bool = False

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
    int: int,
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
        env["OTSERVER_" + setting_name(f.name).upper()] = str(value)
    return env


__all__ = ["Config", "from_env", "to_env", "convert", "setting_name", "parse_duration",
           "parse_size"]
