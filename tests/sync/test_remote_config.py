"""Remote configuration through a real Mosquitto and a real `gatewayd`: a document on the
config topic is applied and reported (on the response topic, through the outbox), refused
with `gatewayctl config check`'s own messages, rolled back when the gateway does not come up
healthy; `gatewayctl config history` lists every change, `gatewayctl config rollback` undoes
the last one."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.sync.codec import decode_batch
from tests.core.conftest import Daemon, start_daemon
from tests.peers import require_binary, wait_until
from tests.sync.conftest import Mosquitto, Subscriber

pytestmark = pytest.mark.peer("mosquitto")

CONFIG = """\
[gateway]
id = "gw"
state_dir = "{state}"
runtime_dir = "{run}"
watchdog = false

[store]
check_interval = 3600

[devices.boiler-1]
driver = "virtual"
interval = 0.5

[devices.boiler-1.points.temperature]
signal = "sine"
base = 60.0
{more}
[sync]
format = "json"
retry.initial = 0.05
retry.cap = 0.5
breaker.cooldown = 0.5
connect_timeout = 2.0
remote_config = {remote}
remote_config_probation = {probation}

[[sync.endpoints]]
url = "mqtt://127.0.0.1:{port}"
"""

METER = """
[devices.meter-2]
driver = "virtual"
interval = 0.5

[devices.meter-2.points.energy]
signal = "counter"
unit = "kWh"
"""


def document(tmp: Path, port: int, *, more: str = "", remote: bool = True,
             probation: float = 30.0) -> str:  # fmt: skip
    return CONFIG.format(state=tmp / "state", run=tmp / "run", more=more, port=port,
                         remote=str(remote).lower(), probation=probation)  # fmt: skip


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def ctl(config: Path, *args: str) -> tuple[int, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "--config", str(config), "--json", *args],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        return p.returncode, p.stdout + p.stderr


def publish(port: int, payload: bytes, tmp: Path) -> None:
    f = tmp / "doc.bin"
    f.write_bytes(payload)
    subprocess.run(
        [require_binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5",
         "-q", "1", "-t", "gateways/gw/config", "-f", str(f)],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip


def reports(sub: Subscriber) -> list[dict[str, Any]]:
    """config.change events seen on the response topic (batches from the outbox), each once
    (delivery is at-least-once: a batch in flight when the link restarts comes twice)."""
    seen: dict[str, dict[str, Any]] = {}
    for topic, payload in sub.raw():
        if topic == "gateways/gw/responses" and payload[:1] == b"[":
            for e in decode_batch(payload):
                if e["type"] == "config.change":
                    seen.setdefault(e["key"], e["data"])
    return list(seen.values())


def outcomes(sub: Subscriber, h: str) -> list[str]:
    return [r["outcome"] for r in reports(sub) if r.get("hash") == h]


def connected(config: Path) -> bool:
    rc, st = ctl(config, "status")
    return rc == 0 and st["services"].get("sync", {}).get("link") == "connected"


class Site:
    def __init__(self, tmp: Path, broker: Mosquitto, **kw: Any) -> None:
        self.tmp = tmp
        self.broker = broker
        self.sub = Subscriber(broker.port, tmp, topic="gateways/gw/responses")
        self.config = tmp / "config.toml"
        self.original = document(tmp, broker.port, **kw)
        self.config.write_text(self.original)
        self.config.chmod(0o640)
        self.daemon: Daemon | None = None
        try:
            self.daemon = start_daemon(self.config, tmp)
            wait_until(lambda: connected(self.config), "sync connected", attempts=300)
        except BaseException:
            self.close()
            raise

    def send(self, text: str | bytes) -> str:
        data = text.encode() if isinstance(text, str) else text
        publish(self.broker.port, data, self.tmp)
        return sha(data)

    def wait_for(self, h: str, outcome: str, attempts: int = 600) -> None:
        wait_until(lambda: outcome in outcomes(self.sub, h), f"report {outcome!r} for {h[:12]}; "
                   f"seen {reports(self.sub)}", attempts=attempts)  # fmt: skip

    def log(self) -> str:
        assert self.daemon is not None
        return self.daemon.log.read_text(errors="replace")

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.peer.stop(timeout=30)
            self.daemon.notify.close()
        self.sub.stop()


@pytest.fixture
def site(mosquitto: Mosquitto, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    s = Site(tmp_path, mosquitto, **getattr(request, "param", {}))
    try:
        yield s
    finally:
        s.close()


def test_valid_config_is_applied_reported_listed_and_rolled_back_by_cli(site: Site) -> None:
    new = document(site.tmp, site.broker.port, more=METER)
    h = site.send(new)
    site.wait_for(h, "confirmed")
    assert outcomes(site.sub, h) == ["accepted", "applied", "confirmed"]
    site.send(new)  # the same again: nothing to do, said so
    site.wait_for(h, "unchanged")
    accepted = next(r for r in reports(site.sub) if r["outcome"] == "accepted")
    assert accepted["source"] == "cloud"
    assert accepted["endpoint"] == f"mqtt://127.0.0.1:{site.broker.port}"
    assert accepted["previous"] == sha(site.original)
    assert accepted["kept_as"] == "config.toml.1"
    # Installed in place, the one it replaced kept beside it with its mode.
    assert site.config.read_text() == new
    assert (site.tmp / "config.toml.1").read_text() == site.original
    assert site.config.stat().st_mode & 0o777 == 0o640
    rc, st = ctl(site.config, "status")
    assert rc == 0 and st["devices"] == 2, st
    wait_until(lambda: "meter-2" in {d["id"] for d in ctl(site.config, "devices")[1]},
               "meter-2 polled")  # fmt: skip

    rc, hist = ctl(site.config, "config", "history")
    assert rc == 0
    assert [(r["outcome"], r["hash"]) for r in hist] == [
        ("accepted", h), ("applied", h), ("confirmed", h), ("unchanged", h)]  # fmt: skip

    # The operator undoes it on site: the previous file is back and running, reported too.
    rc, res = ctl(site.config, "config", "rollback")
    assert rc == 0, res
    assert res["applied"] is True and res["restored"] == "config.toml.1"
    assert res["hash"] == sha(site.original)
    assert site.config.read_text() == site.original
    assert (site.tmp / "config.toml.rolled-back").read_text() == new
    assert not (site.tmp / "config.toml.1").exists()
    rc, st = ctl(site.config, "status")
    assert st["devices"] == 1
    site.wait_for(sha(site.original), "rolled_back")
    back = next(r for r in reports(site.sub) if r["outcome"] == "rolled_back")
    assert back["source"] == "cli" and back["previous"] == h
    rc, hist = ctl(site.config, "config", "history")
    assert hist[-1]["outcome"] == "rolled_back"
    # A mutating control verb: audited with the caller's credentials.
    p = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "--config", str(site.config), "--json",
         "events", "tail", "--stream", "operator", "-n", "5"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    events = [json.loads(line) for line in p.stdout.splitlines()]
    audit = [e["data"] for e in events if e["data"].get("verb") == "config.rollback"]
    assert audit and audit[0]["ok"] is True and "uid" in audit[0], events
    # Nothing more to roll back to: a clear error, nothing changed.
    rc, err = ctl(site.config, "config", "rollback")
    assert rc != 0 and "no previous config is kept" in err, err
    assert site.config.read_text() == site.original


def _check(tmp: Path, text: str) -> list[str]:
    """What `gatewayctl config check` says about `text` as a file."""
    f = tmp / "checked.toml"
    f.write_text(text)
    rc, out = ctl(f, "config", "check", str(f))
    assert rc == 3 and out["ok"] is False, out
    return [f"{e['path']}: {e['message']}" if e["path"] else e["message"] for e in out["errors"]]


def test_invalid_or_not_toml_is_refused_with_config_check_messages(site: Site) -> None:
    bad = document(site.tmp, site.broker.port, more=METER).replace(
        'interval = 0.5\n\n[devices.meter-2.points', 'interval = -1\ncolour = "red"\n\n'
        "[devices.meter-2.points",
    ).replace('url = "mqtt', 'username = "u"\npassword = 424242\nurl = "mqtt')  # fmt: skip
    h = site.send(bad)
    site.wait_for(h, "refused")
    report = next(r for r in reports(site.sub) if r["hash"] == h)
    want = _check(site.tmp, bad)
    assert len(want) >= 3, want
    assert report["errors"] == want
    assert report["error_count"] == len(want)
    assert "424242" not in json.dumps(reports(site.sub)) and "424242" not in site.log()

    garbage = b"[gateway\nid = "
    h2 = site.send(garbage)
    site.wait_for(h2, "refused")
    report = next(r for r in reports(site.sub) if r["hash"] == h2)
    want = _check(site.tmp, garbage.decode())
    assert len(want) == 1 and "not valid TOML" in want[0]
    assert report["errors"] == [want[0].replace(str(site.tmp / "checked.toml"), str(site.config))]

    h3 = site.send(b"\xff\xfe not text")
    site.wait_for(h3, "refused")
    assert "not UTF-8" in next(r for r in reports(site.sub) if r["hash"] == h3)["reason"]

    # Nothing written, nothing changed.
    assert site.config.read_text() == site.original
    assert sorted(p.name for p in site.tmp.glob("config.toml*")) == ["config.toml"]
    hist = ctl(site.config, "config", "history")[1]
    assert [r["outcome"] for r in hist] == ["refused"] * 3
    assert ctl(site.config, "status")[1]["devices"] == 1


@pytest.mark.parametrize("site", [{"probation": 2.0}], indirect=True)
def test_config_that_loses_the_link_is_rolled_back(site: Site) -> None:
    from tests.peers import free_port

    dead = free_port()  # nobody listens there
    new = document(site.tmp, dead, more=METER, probation=2.0)
    h = site.send(new)
    # The reports wait in the outbox while the link is down, and arrive after the rollback.
    site.wait_for(sha(site.original), "rolled_back")
    assert outcomes(site.sub, h) == ["accepted", "applied"]
    back = next(r for r in reports(site.sub) if r["outcome"] == "rolled_back")
    assert back["source"] == "cloud" and back["previous"] == h
    assert back["applied"] is True
    assert "not healthy within 2 s" in back["reason"] and "sync link" in back["reason"]
    assert f"127.0.0.1:{dead}" in back["reason"]
    assert site.config.read_text() == site.original
    assert (site.tmp / "config.toml.rolled-back").read_text() == new
    wait_until(lambda: connected(site.config), "connected again to the first broker")
    st = ctl(site.config, "status")[1]
    assert st["devices"] == 1
    assert st["services"]["sync"]["endpoint"] == f"mqtt://127.0.0.1:{site.broker.port}"
    hist = ctl(site.config, "config", "history")[1]
    assert [r["outcome"] for r in hist] == ["accepted", "applied", "rolled_back"]
    # The same document again (a retry, a retained message) is not applied again.
    site.send(new)
    wait_until(lambda: len(outcomes(site.sub, h)) == 3, "the second try reported")
    assert "was rolled back" in [r for r in reports(site.sub) if r["hash"] == h][-1]["reason"]
    assert site.config.read_text() == site.original


@pytest.mark.parametrize("site", [{"probation": 6.0}], indirect=True)
def test_probation_survives_a_kill_and_still_rolls_back(site: Site) -> None:
    from tests.peers import free_port

    new = document(site.tmp, free_port(), more=METER, probation=6.0)
    h = site.send(new)
    wait_until(lambda: "applied" in [r["outcome"] for r in ctl(site.config, "config",
                                                                "history")[1]],
               "the change applied")  # fmt: skip
    assert site.daemon is not None
    site.daemon.kill()  # on probation, with the link down and the reports in the outbox
    site.daemon.peer.stop()
    site.daemon.notify.close()
    assert site.config.read_text() == new
    site.daemon = start_daemon(site.config, site.tmp, name="gatewayd-2")  # the new config
    site.wait_for(sha(site.original), "rolled_back")
    assert outcomes(site.sub, h) == ["accepted", "applied"]
    assert site.config.read_text() == site.original
    assert "on probation when gatewayd stopped" in site.log()
    assert not list(site.tmp.glob(".config.toml.probation*"))


def test_config_that_turns_remote_config_off_is_applied_then_obeyed(site: Site) -> None:
    off = document(site.tmp, site.broker.port, remote=False)
    h = site.send(off)
    site.wait_for(h, "confirmed")
    assert site.config.read_text() == off
    # From now on documents are refused, and reported so (nothing written).
    again = document(site.tmp, site.broker.port, more=METER)
    h2 = site.send(again)
    site.wait_for(h2, "refused")
    report = next(r for r in reports(site.sub) if r["hash"] == h2)
    assert "remote configuration is off" in report["reason"]
    assert site.config.read_text() == off
    assert ctl(site.config, "status")[1]["devices"] == 1


def test_the_config_verb_for_the_link_is_not_on_the_control_socket(site: Site) -> None:
    doc = document(site.tmp, site.broker.port, more=METER)
    from gateway.control import call
    from gateway.errors import GatewayError

    with pytest.raises(GatewayError, match="unknown verb"):
        call(site.tmp / "run" / "gatewayd.sock", "config.remote",
             {"document": doc, "endpoint": "forged"})  # fmt: skip
    assert site.config.read_text() == site.original
