"""The command line from a plain shell (issue 11, item 13): the demo's printed commands work as
printed where the virtual environment is not on PATH, and output into a closed pipe
(`tokenhub events export | head`) ends quietly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import usage_event

from tokenhub.cli import BROKEN_PIPE_STATUS
from tokenhub.store import open_store

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bash, process groups")

TOKENHUB = str(Path(sys.executable).with_name("tokenhub"))
VENV_BIN = str(Path(sys.executable).parent)


def plain_env(**extra: str) -> dict[str, str]:
    """A shell's environment without the virtual environment (or a TOKENHUB_DB) in it."""
    path = ":".join(d for d in os.environ.get("PATH", "/usr/bin:/bin").split(":") if d != VENV_BIN)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TOKENHUB_DB")}
    return {**env, "PATH": path or "/usr/bin:/bin", **extra}


def sh(script: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=plain_env(**extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`tokenhub serve --demo` started from a plain shell in tmp/run; yields its stdout once
    the demo is ready, and the directory it runs in."""
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "demo.out"
    port = free_port()
    with open(out, "wb") as f:
        p = subprocess.Popen(
            [TOKENHUB, "serve", "--demo", "--port", str(port)],
            cwd=run,
            env=plain_env(TOKENHUB_LOG_LEVEL="WARNING"),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "Stop:" not in out.read_text():
            assert p.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.05)
        yield out.read_text(), run
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(30)


def block(text: str, first: str, last: str) -> str:
    """The printed lines from the first one that starts with or ends in `first` to the next one
    starting with `last` (both included)."""
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.lstrip().startswith(first) or ln.endswith(first))
    j = next(n for n in range(i, len(lines)) if lines[n].lstrip().startswith(last))
    return "\n".join(lines[i : j + 1])


def test_the_demos_printed_commands_work_as_printed(demo: tuple[str, Path]) -> None:
    text, run = demo
    # curl, then the openai snippet (a heredoc), each pasted into a plain shell.
    r = sh(block(text, "curl -s", "-d "), run)
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["usage"]["total_tokens"] > 0
    r = sh(block(text, "<<'EOF'", "EOF"), run)
    assert r.returncode == 0 and "CompletionUsage" in r.stdout, r

    # tokenhub's own, where `tokenhub` is not on PATH and ./tokenhub.db does not exist.
    assert sh("command -v tokenhub", run).returncode != 0
    admin = block(text, "export TOKENHUB_DB=", "Metrics:").rsplit("\n", 1)[0].strip()
    assert admin.count(TOKENHUB) == 4, admin  # printed as the venv's own script
    elsewhere = run.parent  # "in any shell": the venv is not under the demo's directory
    for line in admin.splitlines()[1:]:
        script = admin.splitlines()[0] + "\n" + line
        r = sh(script, elsewhere)
        assert r.returncode == 0, (line, r)
        assert "Traceback" not in r.stderr and "error" not in r.stderr, (line, r.stderr)
        assert r.stdout.strip(), line
        if " keys list" in line:
            assert "demo" in r.stdout
        if " events export" in line:
            assert json.loads(r.stdout.splitlines()[0])["tenant"] == "demo"
    assert not (run / "tokenhub.db").exists() and not (elsewhere / "tokenhub.db").exists()


@pytest.fixture(scope="module")
def many_events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with more events than a pipe holds."""
    db = tmp_path_factory.mktemp("pipe") / "events.db"
    store = open_store(str(db))
    try:
        store.migrate()
        store.create_tenant("acme")
        store.create_key("acme")
        store.insert_events([usage_event(i) for i in range(5000)])
    finally:
        store.close()
    return db


@pytest.mark.parametrize(
    "command",
    [
        "events export --format jsonl",
        "events export --format csv",
        "billing export --format jsonl",
        "keys list",
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(
    many_events: Path, tmp_path: Path, command: str
) -> None:
    # head -c 0 reads nothing: the first write after it exits meets a closed pipe.
    for head in ("head -1", "head -c 0"):
        r = sh(
            f'{TOKENHUB} {command} | {head}; echo "status ${{PIPESTATUS[0]}}" >&2',
            tmp_path,
            TOKENHUB_DB=str(many_events),
        )
        assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
        status = int(r.stderr.rsplit("status ", 1)[1])
        assert status in (0, BROKEN_PIPE_STATUS), r.stderr
        if command.startswith(("events", "billing")):  # more than a pipe holds: cut short
            assert status == BROKEN_PIPE_STATUS, (head, r.stderr)
            assert r.stderr.strip() == f"status {BROKEN_PIPE_STATUS}", r.stderr
