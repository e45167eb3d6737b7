"""The control socket: verbs that change or delete state are refused for callers that are not
root, the daemon's user or in `[control] group`, and every one that runs is an event naming
its caller (SO_PEERCRED); read-only verbs stay open (issue 11, item 7).

The refused caller is a real process running as `nobody`, connecting to the daemon's real
socket (opened to everyone by hand, as a careless chmod or a shared runtime dir would)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon, run_cli, start_daemon, write_config

NOBODY = 65534
ADM = 4  # a group `nobody` is not in

CLIENT = r"""
import json, socket, sys
out = []
for line in sys.argv[2:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sys.argv[1])
    s.sendall(line.encode() + b"\n")
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    s.close()
    out.append(json.loads(buf))
print(json.dumps(out))
"""


@pytest.fixture
def shared_run_dir() -> Iterator[Path]:
    """A runtime dir `nobody` can reach (pytest's tmp_path sits under a 0700 parent)."""
    d = Path(tempfile.mkdtemp(prefix="gw-control-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _as_user(
    sock: Path, requests: Sequence[Mapping[str, object]], groups: list[int]
) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", CLIENT, str(sock), *map(json.dumps, requests)],
        user=NOBODY, group=NOBODY, extra_groups=groups, capture_output=True, text=True,
        timeout=60, cwd="/",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout))


def _control_events(config: Path) -> list[dict[str, Any]]:
    out = run_cli(config, "--json", "events", "tail", "-n", "1000", "--stream", "operator")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return [e for e in events if e["type"] == "control.verb"]


def _start(tmp_path: Path, run_dir: Path, daemons: list[Daemon]) -> tuple[Daemon, Path, Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    config = write_config(tmp_path)
    text = config.read_text()
    text = text.replace(f'runtime_dir = "{tmp_path / "run"}"', f'runtime_dir = "{run_dir}"')
    config.write_text(text + '\n[control]\ngroup = "adm"\n')
    d = start_daemon(config, tmp_path)
    daemons.append(d)
    sock = run_dir / "gatewayd.sock"
    os.chmod(sock, 0o666)  # anyone may connect: the daemon itself must still say no
    return d, config, sock


PRUNE = {"verb": "db.prune", "args": {"older_than": 0}}
NOTE = {"verb": "note", "args": {"text": "replaced sensor", "author": "mallory"}}
STATUS = {"verb": "status", "args": {}}


def test_mutating_verbs_are_refused_for_other_users(
    tmp_path: Path, shared_run_dir: Path, daemon_factory: list[Daemon]
) -> None:
    d, config, sock = _start(tmp_path, shared_run_dir, daemon_factory)
    replies = _as_user(sock, [PRUNE, NOTE, {"verb": "reload", "args": {}}, STATUS], groups=[])
    for verb, reply in zip(("db.prune", "note", "reload"), replies, strict=False):
        assert reply["ok"] is False, reply
        assert reply["error"].startswith(f"{verb}: permission denied"), reply
        assert "group 'adm'" in reply["error"] and f"uid {NOBODY}" in reply["error"], reply
    assert replies[3]["ok"] is True and replies[3]["result"]["pid"] == d.pid  # read-only: open
    assert _control_events(config) == []  # nothing ran, nothing recorded
    assert "db.prune refused for uid 65534" in d.log.read_text()


def test_group_members_and_root_may_and_are_recorded(
    tmp_path: Path, shared_run_dir: Path, daemon_factory: list[Daemon]
) -> None:
    _, config, sock = _start(tmp_path, shared_run_dir, daemon_factory)
    # `nobody` with adm as a supplementary group (SO_PEERGROUPS), not its primary one.
    replies = _as_user(sock, [PRUNE, NOTE], groups=[ADM])
    assert [r["ok"] for r in replies] == [True, True], replies
    # root through gatewayctl.
    out = run_cli(config, "note", "checked by root")
    assert out.returncode == 0, out.stderr

    events = _control_events(config)
    got = [(e["data"]["verb"], e["data"]["uid"], e["data"]["gid"], e["data"]["ok"]) for e in events]
    assert got == [
        ("db.prune", NOBODY, NOBODY, True),
        ("note", NOBODY, NOBODY, True),
        ("note", 0, 0, True),
    ], events
    assert events[0]["data"]["args"] == {"older_than": 0}
    pids = [e["data"]["pid"] for e in events]
    assert pids[0] == pids[1] != pids[2] and all(p > 0 for p in pids), pids  # one client, then ctl
