"""The command line as a new user meets it: settings that cannot be meant are refused at start
with a message naming the flag, read-only commands never create a store, a port in use is an
error, dates are dates, and --help, README.md and systemd/otserver.env show the same defaults
as the code."""
from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli

from otserver.config import Config, format_setting, setting_name

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ settings refused at start

@pytest.mark.parametrize("args, message", [
    (("--port", "70000"), "--port 70000: a port is a number from 0 to 65535"),
    (("--port", "abc"), "--port: not a whole number: 'abc'"),
    (("--workers", "0"), "--workers: at least 1"),
    (("--ttl", "0"), "'0' needs a unit"),
    (("--ttl", "0d"), "--ttl must be longer than 0"),
    (("--ttl", "60"), "'60' needs a unit: 60d is sixty days"),
    (("--ttl", "30m"), "--ttl 30m is shorter than one hour"),
    (("--max-body-bytes", "lots"), "--max-body-bytes: not a size: 'lots'"),
])
def test_a_setting_that_cannot_be_meant_is_refused_before_anything_is_made(tmp_path, args,
                                                                           message):
    data_dir = tmp_path / "data"
    done = run_cli("serve", "--data-dir", str(data_dir), *args, timeout=30)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not data_dir.exists()


def test_a_short_ttl_is_taken_with_allow_short_ttl(make_server):
    server = make_server("--ttl", "30m", "--allow-short-ttl")
    assert server.track(si="s").status == 200
    assert server.stop() == 0


def test_a_ttl_from_the_environment_needs_a_unit_too(tmp_path):
    done = subprocess.run([sys.executable, "-m", "otserver", "info", "--data-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30,
                          env={"OTSERVER_TTL": "60", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0 and "OTSERVER_TTL: '60' needs a unit" in done.stderr


def test_a_data_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "plain-file"
    path.write_text("not a store")
    for command in (("serve",), ("info",), ("token", "list")):
        done = run_cli(*command, "--data-dir", str(path), timeout=30)
        assert done.returncode != 0
        assert f"--data-dir {path} is a file, not a directory" in done.stderr, done.stderr
    assert path.read_text() == "not a store"


# ------------------------------------------------------------------ read-only commands

@pytest.mark.parametrize("command", [
    ("info",), ("info", "--json"), ("token", "create", "site"), ("token", "list"),
    ("token", "revoke", "abcdef"), ("export", "--si", "s"), ("sweep",), ("backup", "{dest}"),
    ("rebuild-views",),
])
def test_a_command_on_a_directory_without_a_store_refuses_and_creates_nothing(tmp_path, command):
    missing = tmp_path / "no" / "such" / "dir"
    dest = tmp_path / "copy"
    args = [part.format(dest=dest) for part in command]
    done = run_cli(*args, "--data-dir", str(missing), timeout=30)
    assert done.returncode != 0
    assert f"{missing} holds no otserver store" in done.stderr, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "no").exists() and not dest.exists()


def test_token_create_in_the_wrong_directory_makes_no_otdata(tmp_path):
    done = subprocess.run([sys.executable, "-m", "otserver", "token", "create", "*"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode != 0 and "holds no otserver store" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_info_into_a_pipe_that_closes_early_says_nothing_about_it(server):
    server.track(si="s")
    pipeline = subprocess.run(
        f"{sys.executable} -m otserver info --data-dir {server.data_dir} | head -1",
        shell=True, capture_output=True, text=True, timeout=30)
    assert pipeline.stdout.startswith("data dir")
    assert pipeline.stderr == ""


# ------------------------------------------------------------------ dates and versions

def test_info_and_token_list_print_dates_and_json_keeps_milliseconds(server):
    server.create_token("site")
    server.track(si="site", sid="a")
    server.stop()
    data_dir = str(server.data_dir)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    text = run_cli("info", "--data-dir", data_dir).stdout
    assert re.search(rf"^oldest event +\S+ at {today} \d\d:\d\d:\d\d UTC$", text, re.M), text
    listing = run_cli("token", "list", "--data-dir", data_dir).stdout
    assert re.search(rf"  site  created {today} \d\d:\d\d:\d\d UTC", listing), listing
    data = json.loads(run_cli("info", "--json", "--data-dir", data_dir).stdout)
    assert isinstance(data["oldest_event"]["unixtimestamp"], int)
    row = json.loads(run_cli("token", "list", "--json", "--data-dir", data_dir).stdout)
    assert isinstance(row["created"], int) and row["created"] > 1_700_000_000_000


def test_version():
    from otserver import __version__
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"otserver {__version__}"


# ------------------------------------------------------------------ the port

def test_a_second_server_on_a_port_in_use_fails_at_start_and_stores_nothing(make_server,
                                                                           tmp_path):
    first = make_server()
    other = tmp_path / "other"
    done = run_cli("serve", "--port", str(first.port), "--data-dir", str(other), timeout=30)
    assert done.returncode != 0
    assert f"port {first.port} on 127.0.0.1 is already in use" in done.stderr, done.stderr
    for i in range(20):  # every event goes to the first server
        assert first.track(si="p", sid=f"s{i}").status == 200
    assert first.counts()["events"] == 20


def test_workers_on_a_port_in_use_fail_at_start(make_server, tmp_path):
    first = make_server("--workers", "2")
    done = run_cli("serve", "--workers", "2", "--port", str(first.port), "--data-dir",
                   str(tmp_path / "other"), timeout=30)
    assert done.returncode != 0 and "is already in use" in done.stderr, done.stderr
    with socket.socket() as holder:  # a port held by another program entirely
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        done = run_cli("serve", "--workers", "2", "--port", str(holder.getsockname()[1]),
                       "--data-dir", str(tmp_path / "third"), timeout=30)
    assert done.returncode != 0 and "is already in use" in done.stderr, done.stderr


def test_the_default_address_is_loopback(tmp_path):
    with subprocess.Popen([sys.executable, "-m", "otserver", "serve", "--port", "0",
                           "--data-dir", str(tmp_path / "d")],
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            deadline = time.monotonic() + 15
            line = ""
            while "listening on" not in line and time.monotonic() < deadline:
                line = proc.stderr.readline()
            assert re.search(r"listening on http://127\.0\.0\.1:\d+ ", line), line
        finally:
            proc.terminate()
            assert proc.wait(15) == 0


# ------------------------------------------------------------------ one source of defaults

FIELDS = dataclasses.fields(Config)


def _flag(name: str) -> str:
    return "--" + setting_name(name).replace("_", "-")


def test_help_shows_every_default_as_a_person_writes_it():
    text = " ".join(run_cli("serve", "--help").stdout.split())
    for f in FIELDS:
        shown = format_setting(f.name, getattr(Config(), f.name))
        assert f"(default {shown}; env OTSERVER_{setting_name(f.name).upper()})" in text, f.name
    assert "5184000" not in text and "68719476736" not in text and "default ()" not in text


def test_readme_settings_table_has_every_setting_with_the_code_default():
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"^\| (`--[a-z-]+`(?:, `--[a-z-]+`)?) \| [^|]+ \| `([^`]*)` \|", line)
        if match:
            for flag in re.findall(r"`(--[a-z-]+)`", match.group(1)):
                rows[flag] = match.group(2)
    for f in FIELDS:
        assert rows.get(_flag(f.name)) == format_setting(f.name, getattr(Config(), f.name)), f.name


def test_env_file_lists_every_setting_and_its_commented_lines_are_the_defaults():
    lines = {}
    for line in (ROOT / "systemd" / "otserver.env").read_text().splitlines():
        match = re.match(r"^(#?)(OTSERVER_[A-Z0-9_]+)=(.*)$", line)
        if match:
            lines[match.group(2)] = (match.group(1) == "#", match.group(3))
    examples = {"OTSERVER_DATA_DIR", "OTSERVER_TRUSTED_PROXIES"}  # the unit's value, an example
    for f in FIELDS:
        variable = "OTSERVER_" + setting_name(f.name).upper()
        assert variable in lines, variable
        commented, value = lines.pop(variable)
        default = getattr(Config(), f.name)
        if variable == "OTSERVER_HOST":
            assert (commented, value) == (False, "0.0.0.0")  # a service faces the network
        elif variable == "OTSERVER_REQUIRE_SITE":
            assert (commented, value) == (False, "1")  # a public server takes registered sites
        elif variable not in examples:
            expected = ("1" if default else "0") if isinstance(default, bool) else \
                format_setting(f.name, default).replace("none", "")
            assert commented and value == expected, (variable, value, expected)
    assert lines == {}, f"not settings: {sorted(lines)}"
