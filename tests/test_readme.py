"""README.md is one session a user can paste top to bottom: every `sh` block between its
session markers runs, in order, in one shell, against a real server started as the quick start
starts it (`otserver serve` on ./otdata), and what each block prints has the shape of the
`text`/`json` block that follows it in README (ids, times and sizes may differ; names, values,
keys and line counts may not)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningServer

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- session: tests/test_readme.py runs every sh block from here"
END = "<!-- end of the session -->"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def session_blocks() -> list[tuple[str, str | None]]:
    """(the commands of an sh block, the output README shows after it or None)."""
    text = README.read_text()
    assert START in text and END in text, "README lost its session markers"
    body = text[text.index(START):text.index(END)]
    blocks = [(m.group(1), m.group(2), m.start(), m.end()) for m in BLOCK.finditer(body)]
    pairs = []
    for i, (kind, code, _, end) in enumerate(blocks):
        if kind != "sh":
            continue
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        shown = None
        if following and following[0] in ("text", "json") and not body[end:following[2]].strip():
            shown = following[1]
        pairs.append((code, shown))
    return pairs


def normal(text: str) -> str:
    """Text with what differs from run to run (ids, numbers, dates, versions) made generic."""
    text = UUID.sub("<id>", text)
    text = re.sub(r"\b(?=[0-9a-f]*\d)[0-9a-f]{12}\b", "<token id>", text)
    text = re.sub(r"curl/[\d.]+", "curl/<v>", text)
    text = re.sub(r"\d+", "<n>", text)
    text = re.sub(r"(<n>[-:. ]?)+", "<n>", text)
    return text


def shape(value):
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return "<number>"
    return normal(value)


def as_json(text: str):
    """A JSON document (README wraps long ones over lines) or NDJSON lines, or None."""
    try:
        return [json.loads(text)]
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        return None


def same_shape(shown: str, printed: str) -> bool:
    expected, actual = as_json(shown), as_json(printed)
    if expected is not None and actual is not None:
        return shape(expected) == shape(actual)
    return [normal(line) for line in shown.strip().splitlines()] == \
        [normal(line) for line in printed.strip().splitlines()]


def test_the_session_blocks_pair_with_their_outputs():
    pairs = session_blocks()
    assert len(pairs) >= 8
    assert sum(shown is not None for _, shown in pairs) >= 8


@pytest.fixture
def quick_start(tmp_path):
    """The quick start's server: `otserver serve` in a directory, its store ./otdata; and
    `.venv/bin/otserver` and `.venv/bin/python` there, as the quick start's venv has them."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, command in (("otserver", f"{sys.executable} -m otserver"),
                          ("python", sys.executable)):
        wrapper = bin_dir / name
        wrapper.write_text(f"#!/bin/sh\nexec {command} \"$@\"\n")
        wrapper.chmod(0o755)
    server = RunningServer(tmp_path / "otdata").start()
    yield tmp_path, server
    server.stop()


def test_the_readme_session_runs_top_to_bottom_with_the_answers_it_shows(quick_start):
    cwd, server = quick_start
    script = []
    for n, (code, _) in enumerate(session_blocks()):
        code = code.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{server.port}")
        script.append(f"echo '@@block {n}@@'\n{code}")
    env = dict(os.environ, PATH=f"{cwd / '.venv' / 'bin'}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    stdout = done.stdout.replace(str(cwd), "/path/to/otserver")  # where the user pasted it
    printed = re.split(r"^@@block \d+@@\n", stdout, flags=re.M)[1:]
    pairs = session_blocks()
    assert len(printed) == len(pairs), (done.stdout[-2000:], done.stderr[-2000:])
    for n, ((code, shown), out) in enumerate(zip(pairs, printed)):
        if shown is None:
            continue
        assert same_shape(shown, out), (
            f"block {n}:\n{code}\nREADME shows:\n{shown}\nbut it printed:\n{out}\n"
            f"stderr:\n{done.stderr[-2000:]}")
    assert "Traceback" not in done.stderr, done.stderr
