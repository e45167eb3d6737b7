"""Roles on the control socket ([auth]): `gatewayctl` run as other users (setpriv, as root).
A viewer cannot command, an operator cannot reload or prune, refusals name the role needed,
exit with status 2 and are recorded as `auth.denied` events; a command records who asked."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from gateway.errors import EXIT_USAGE
from tests.support.daemon import Daemon, start_daemon
from tests.support.peers import missing, require_binary

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path sits under a 0700 parent)."""
    d = Path(tempfile.mkdtemp(prefix="gw-roles-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


CONFIG = """
[gateway]
id = "gw-roles"
state_dir = "{state}"
runtime_dir = "{run}"

[store]
check_interval = 3600

[control]
socket = "{shared}/gw.sock"
group = "daemon"

[auth]
default = "none"
users = {{ daemon = "viewer", bin = "operator" }}

[devices.tank]
driver = "virtual"
interval = 3600

[devices.tank.points.level]
signal = "constant"
writable = true
"""


def as_user(config: Path, uid: int, *args: str) -> subprocess.CompletedProcess[str]:
    """gatewayctl as `uid`, with the socket's group (gid 1, "daemon") as its only group."""
    setpriv = require_binary("setpriv")
    return subprocess.run(
        [setpriv, f"--reuid={uid}", "--regid=1", "--clear-groups", sys.executable, "-m",
         "gateway.cli.main", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def operator_events(db: Path) -> list[tuple[str, dict[str, Any]]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT type, data FROM events WHERE stream = 'operator' ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()
    return [(t, cbor2.loads(d)) for t, d in rows]


@pytest.fixture
def daemon(tmp_path: Path, shared: Path) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        missing("root (to run gatewayctl as other users with setpriv)")
        pytest.skip("needs root")
    config = shared / "config.toml"
    config.write_text(CONFIG.format(state=tmp_path / "state", run=tmp_path / "run",
                                    shared=shared))  # fmt: skip
    config.chmod(0o644)
    d = start_daemon(config, tmp_path)
    try:
        yield d
    finally:
        d.stop()
        d.notify.close()


def test_viewer_operator_admin(daemon: Daemon, tmp_path: Path) -> None:
    config = daemon.config
    viewer, operator, nobody = 1, 2, 65534
    assert as_user(config, viewer, "status").returncode == 0

    denied = as_user(config, viewer, "command", "tank", "level", "3")
    assert denied.returncode == EXIT_USAGE, denied.stderr
    assert "needs role operator" in denied.stderr and "role viewer" in denied.stderr

    ok = as_user(config, operator, "command", "tank", "level", "3", "--id", "t-1", "--wait")
    assert ok.returncode == 0, ok.stderr
    assert "command t-1: succeeded" in ok.stdout
    for verb in (("reload",), ("db", "rebuild")):
        out = as_user(config, operator, *verb)
        assert out.returncode == EXIT_USAGE, (verb, out.stdout, out.stderr)
        assert "needs role admin" in out.stderr, out.stderr

    # db.prune has no gatewayctl verb: asked on the socket itself, as the operator
    prune = subprocess.run(
        [require_binary("setpriv"), f"--reuid={operator}", "--regid=1", "--clear-groups",
         sys.executable, "-c", "import sys; from gateway.control import call\n"
         "try:\n call(sys.argv[1], 'db.prune', {})\nexcept Exception as e: print(e)",
         str(daemon.config.parent / "gw.sock")],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert "db.prune: permission denied: it needs role admin" in prune.stdout, prune

    out = as_user(config, nobody, "status")
    assert out.returncode == EXIT_USAGE and "needs role viewer" in out.stderr

    db = tmp_path / "state" / "gateway.db"
    refusals = [(d["verb"], d["uid"], d["needs"]) for t, d in operator_events(db)
                if t == "auth.denied"]  # fmt: skip
    assert refusals == [
        ("command", viewer, "operator"),
        ("reload", operator, "admin"),
        ("db.rebuild", operator, "admin"),
        ("db.prune", operator, "admin"),
        ("status", nobody, "viewer"),
    ]
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        (by,) = conn.execute("SELECT by FROM commands WHERE id = 't-1'").fetchone()
    finally:
        conn.close()
    assert by == f"uid:{operator}"
