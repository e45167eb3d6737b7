"""`.ci/install --system`: the README's one command, run into a temporary root (`--root`).

There is no systemd PID 1 here, so the installed service is started the way systemd would
start it: the installed unit's `ExecStart=` command line (paths mapped into the root), with
`STATE_DIRECTORY`, `RUNTIME_DIRECTORY` and `NOTIFY_SOCKET` set, until it sends READY=1; the
installed `gatewayctl` then talks to it. `systemd-analyze verify` checks the installed unit.
Installs come from PyPI (pip's cache keeps them quick) or from a wheelhouse with no network.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import notify_until
from tests.support.peers import Peer, free_port, require_binary

ROOT = Path(__file__).resolve().parent.parent
UNIT = "etc/systemd/system/gatewayd.service"
CONFIG = "etc/gateway/config.toml"


def readme_install_command() -> list[str]:
    """The one command of README's "Running under systemd", without its `sudo`."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running under systemd", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) == 1, f"the install is no longer one command: {lines}"
    argv = shlex.split(lines[0])
    assert argv[:2] == ["sudo", "bash"] and argv[2] == ".ci/install", argv
    return argv[1:]


def install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def install_readme_command(root: Path) -> subprocess.CompletedProcess[str]:
    """The README's command, into `root` instead of /."""
    res = install(*readme_install_command(), "--root", str(root))
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def unit_value(unit_text: str, key: str) -> str:
    m = re.search(rf"^{key}=(.*)$", unit_text, flags=re.M)
    assert m is not None, key
    return m.group(1).strip()


def systemd_env(root: Path, unit_text: str) -> dict[str, str]:
    """What systemd sets for the unit's StateDirectory=/RuntimeDirectory=, inside `root`."""
    state = root / "var/lib" / unit_value(unit_text, "StateDirectory")
    runtime = root / "run" / unit_value(unit_text, "RuntimeDirectory")
    state.mkdir(parents=True, exist_ok=True)
    runtime.mkdir(parents=True, exist_ok=True)
    return {"STATE_DIRECTORY": str(state), "RUNTIME_DIRECTORY": str(runtime)}


def in_root(root: Path, argv: list[str]) -> list[str]:
    """Absolute paths of a command line, as seen from inside `root`."""
    return [str(root / a.lstrip("/")) if a.startswith("/") else a for a in argv]


def use_free_coap_port(root: Path) -> None:
    """What an operator does to the installed config (tests run side by side on 5683)."""
    conf = root / CONFIG
    text = conf.read_text()
    assert text.count("port = 5683") == 1
    conf.write_text(text.replace("port = 5683", f"port = {free_port(socket.SOCK_DGRAM)}"))


class Service:
    """The installed ExecStart, started as systemd would start it."""

    def __init__(self, root: Path, tmp: Path) -> None:
        unit_text = (root / UNIT).read_text()
        self.env = systemd_env(root, unit_text)
        argv = in_root(root, shlex.split(unit_value(unit_text, "ExecStart")))
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(60)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GATEWAY_CONFIG")}
        env.update(self.env, NOTIFY_SOCKET=str(self.notify_path))
        self.log = tmp / "gatewayd.log"
        self.peer = Peer(argv, cwd=tmp, env=env, log=self.log)

    def wait_ready(self) -> None:
        notify_until(self.notify, "READY=1", self.log)

    def stop(self) -> int | None:
        try:
            return self.peer.stop(timeout=30)
        finally:
            self.notify.close()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for s in started:
        s.stop()


def gatewayctl(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The installed gatewayctl with no flags; only /etc is mapped into the root (as the unit's
    environment maps the state and runtime directories)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    clean.update(env, GATEWAY_CONFIG=str(root / CONFIG))
    return subprocess.run(
        [str(root / "usr/local/bin/gatewayctl"), *args],
        capture_output=True, text=True, timeout=60, check=False, env=clean,
    )  # fmt: skip


def test_readme_install_starts_as_systemd_would(
    tmp_path: Path, service_factory: list[Service]
) -> None:
    require_binary("systemctl")  # enables the unit offline (--root)
    require_binary("systemd-sysusers")
    root = tmp_path / "root"
    out = install_readme_command(root)
    # Not PID 1 here and not the running system: nothing is started, the unit is enabled.
    assert "enabled for the next boot" in out.stdout, out.stdout
    assert (root / "etc/systemd/system/multi-user.target.wants/gatewayd.service").is_symlink()
    unit_text = (root / UNIT).read_text()
    assert unit_text == (ROOT / "systemd/gatewayd.service").read_text()
    assert (root / "usr/lib/sysusers.d/gateway.conf").read_text() == (
        ROOT / "systemd/gateway.sysusers"
    ).read_text()
    groups = {line.split(":")[0] for line in (root / "etc/group").read_text().splitlines()}
    assert {"dialout", "bluetooth"} <= groups  # systemd-sysusers ran on the snippet
    assert (root / "opt/gatewayd/current/bin/python").exists()
    # The installed config: the shipped one, with the unit's directories, absolute.
    installed = tomllib.loads((root / CONFIG).read_text())
    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    assert installed["gateway"]["state_dir"] == "/var/lib/" + unit_value(
        unit_text, "StateDirectory"
    )
    assert installed["gateway"]["runtime_dir"] == "/run/" + unit_value(
        unit_text, "RuntimeDirectory"
    )
    assert installed["devices"] == shipped["devices"] and installed["coap"] == shipped["coap"]

    use_free_coap_port(root)
    service = Service(root, tmp_path)
    service_factory.append(service)
    service.wait_ready()
    assert list(Path(service.env["STATE_DIRECTORY"]).glob("*.db"))
    status = gatewayctl(root, service.env, "--json", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f'"pid": {service.peer.pid}' in status.stdout, status.stdout
    assert service.stop() == 0, service.log.read_text()


def test_installed_unit_verifies_clean(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the installed unit. Its `--root=` would need a whole OS in
    the root (/bin/kill, sysinit.target), so the unit is checked in place with ExecStart's
    binary mapped into the root: verify then fails if the installed binary is missing."""
    tool = require_binary("systemd-analyze")
    root = tmp_path / "root"
    install_readme_command(root)
    unit_text = (root / UNIT).read_text()
    exe = shlex.split(unit_value(unit_text, "ExecStart"))[0]
    assert (root / exe.lstrip("/")).resolve().is_file()
    check = tmp_path / "check" / "gatewayd.service"
    check.parent.mkdir()
    check.write_text(unit_text.replace(f"ExecStart={exe} ", f"ExecStart={root}{exe} "))
    res = subprocess.run([tool, "verify", str(check)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert [line for line in (res.stdout + res.stderr).splitlines() if "gatewayd" in line] == []
    # The same check fails once the installed binary is gone.
    (root / exe.lstrip("/")).unlink()
    res = subprocess.run([tool, "verify", str(check)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode != 0


def test_offline_upgrade_keeps_config_and_uninstall_keeps_data(
    tmp_path: Path, service_factory: list[Service]
) -> None:
    root = tmp_path / "root"
    wheels = tmp_path / "wheels"
    built = install("bash", ".ci/install", "--wheelhouse", str(wheels))
    assert built.returncode == 0, built.stdout + built.stderr
    assert list(wheels.glob("gatewayd-*.whl")) and list(wheels.glob("aiocoap-*.whl"))
    # Offline: the installer passes --no-index; an unreachable index makes sure of it.
    offline = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple"}
    system = ["bash", ".ci/install", "--system", "--root", str(root), "--wheelhouse", str(wheels)]
    first = install(*system, env=offline)
    assert first.returncode == 0, first.stdout + first.stderr
    opt = root / "opt/gatewayd"
    v1 = os.readlink(opt / "current")
    use_free_coap_port(root)
    edited = (root / CONFIG).read_text()

    # Upgrade: a new venv beside the old, `current` switched, `previous` kept, config kept.
    second = install(*system, env=offline)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "kept " in second.stdout and (root / CONFIG).read_text() == edited
    v2 = os.readlink(opt / "current")
    assert v2 != v1 and os.readlink(opt / "previous") == v1
    assert {p.name for p in (opt / "venvs").iterdir()} == {Path(v1).name, Path(v2).name}

    # The upgraded install serves, with the database the first one left.
    service = Service(root, tmp_path)
    service_factory.append(service)
    service.wait_ready()
    note = gatewayctl(root, service.env, "note", "before uninstall")
    assert note.returncode == 0, note.stdout + note.stderr
    assert service.stop() == 0, service.log.read_text()
    db = sorted(Path(service.env["STATE_DIRECTORY"]).glob("*.db"))
    assert db

    # A config the new version refuses: nothing is switched, the new venv is removed.
    assert edited.count('log_level = "info"') == 1
    (root / CONFIG).write_text(edited.replace('log_level = "info"', 'log_level = "loud"'))
    refused = install(*system, env=offline)
    assert refused.returncode != 0
    assert "does not pass" in refused.stderr, refused.stderr
    assert os.readlink(opt / "current") == v2
    assert {p.name for p in (opt / "venvs").iterdir()} == {Path(v1).name, Path(v2).name}
    (root / CONFIG).write_text(edited)

    # Uninstall: code, unit and links gone; configuration and data kept.
    gone = install("bash", ".ci/install", "--system", "--root", str(root), "--uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    for path in ("opt/gatewayd", UNIT, "usr/lib/sysusers.d/gateway.conf",
                 "usr/local/bin/gatewayd", "usr/local/bin/gatewayctl",
                 "etc/systemd/system/multi-user.target.wants/gatewayd.service"):  # fmt: skip
        assert not (root / path).exists() and not (root / path).is_symlink(), path
    assert (root / CONFIG).read_text() == edited
    assert all(p.exists() for p in db)
