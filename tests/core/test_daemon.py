"""gatewayd as a process: ready, status, reload, SIGTERM and SIGKILL durability, CLI."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from gateway import config as cfg
from gateway.control import call
from gateway.errors import GatewayError
from gateway.store import maintenance
from tests.core.conftest import Daemon, run_cli, start_daemon, write_config
from tests.peers import wait_until


def db_path(config: Path) -> Path:
    return cfg.load(config).db_path


def socket_path(config: Path) -> Path:
    return cfg.load(config).socket_path


def count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


class Producer:
    """Threads appending operator notes through the control socket; records what was acked."""

    def __init__(self, sock: Path, threads: int = 4) -> None:
        self.sock = sock
        self.acked: list[tuple[int, str]] = []
        self.first_ack = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _run(self, me: int) -> None:
        n = 0
        while not self._stop.is_set():
            text = f"p{me}-{n}"
            n += 1
            try:
                r = call(self.sock, "note", {"text": text}, timeout=30)
            except (GatewayError, OSError, ValueError):
                return  # the daemon went away: this note was not acknowledged
            with self._lock:
                self.acked.append((r["seq"], text))
                self._lock.notify_all()
            self.first_ack.set()

    def wait_acks(self, n: int) -> None:
        """Block until `n` notes are acknowledged (the producers stop only on a dead daemon)."""
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.acked) >= n, timeout=60), "no acks"

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def notes_in(db: Path) -> dict[int, str]:
    import cbor2

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        # The operator stream also holds who ran each note (`control.verb`): notes only.
        rows = conn.execute(
            "SELECT seq, data FROM events WHERE stream='operator' AND type='operator.note'"
        )
        return {seq: cbor2.loads(data)["text"] for seq, data in rows}
    finally:
        conn.close()


def test_ready_status_and_cli(tmp_path: Path, daemon_factory: list[Daemon]) -> None:
    config = write_config(tmp_path)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    db = db_path(config)
    wait_until(
        lambda: count(db, "SELECT count(*) FROM latest WHERE device='boiler-1'") == 2,
        "readings of boiler-1",
    )
    r = run_cli(config, "--json", "status")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert status["live"] is True and status["gateway"] == "gw-test"
    assert status["services"]["collection"]["state"] == "ok"
    assert status["services"]["devices"]["state"] == "ok"
    assert status["store"]["last_seq"] > 0

    r = run_cli(config, "devices")
    assert r.returncode == 0 and "boiler-1" in r.stdout and "meter-1" in r.stdout
    r = run_cli(config, "readings", "boiler-1")
    assert r.returncode == 0, r.stderr
    assert "temperature" in r.stdout and "Cel" in r.stdout
    r = run_cli(config, "--json", "readings", "boiler-1", "pressure")
    rows = json.loads(r.stdout)
    assert [x["point"] for x in rows] == ["pressure"] and rows[0]["unit"] == "bar"
    r = run_cli(config, "readings", "no-such-device")
    assert r.returncode == 2 and "no readings for no-such-device" in r.stderr
    r = run_cli(config, "readings", "boiler-1", "--since", "yesterday")
    assert r.returncode == 2 and "--since: not a duration" in r.stderr
    r = run_cli(config, "events", "tail", "-n", "3", "--stream", "device:*")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    r = run_cli(config, "note", "replaced the pressure sensor")
    assert r.returncode == 0 and r.stdout.startswith("noted as event ")
    r = run_cli(config, "db", "check")
    assert r.returncode == 0 and r.stdout.startswith("ok: ")
    r = run_cli(config, "db", "backup", str(tmp_path / "backup.db"))
    assert r.returncode == 0, r.stderr
    assert maintenance.projections_match_rebuild(tmp_path / "backup.db")
    r = run_cli(config, "db", "backup", str(tmp_path / "backup.db"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli(config, "db", "rebuild")
    assert r.returncode == 0 and "rebuilt by the daemon" in r.stdout
    r = run_cli(config, "frobnicate")
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr

    assert d.stop() == 0
    assert not socket_path(config).exists()
    # Daemon down: the CLI reads the file.
    r = run_cli(config, "status")
    assert r.returncode == 0 and "not running" in r.stdout
    r = run_cli(config, "devices")
    assert r.returncode == 0 and "boiler-1" in r.stdout and "as last recorded" in r.stdout
    r = run_cli(config, "db", "rebuild")
    assert r.returncode == 0 and "daemon not running" in r.stdout
    r = run_cli(config, "note", "x")
    assert r.returncode == 4 and "gatewayd is not running" in r.stderr


def test_sighup_applies_a_valid_config_and_keeps_the_old_on_errors(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    db, sock = db_path(config), socket_path(config)
    text = config.read_text()
    config.write_text(
        text + '\n[devices.pump-7]\ndriver = "virtual"\ninterval = 0.05\n'
        '[devices.pump-7.points.speed]\nsignal = "constant"\nbase = 1450\n'
    )
    d.peer.signal(signal.SIGHUP)
    d.messages("RELOADING=1")
    d.messages("READY=1")
    wait_until(
        lambda: count(db, "SELECT count(*) FROM latest WHERE device='pump-7'") == 1,
        "readings of the new device",
    )
    config.write_text(text + "\n[devices.bad]\ndriver = 'virtual'\ninterval = -1\n")
    d.peer.signal(signal.SIGHUP)
    d.messages("READY=1")
    status = call(sock, "status")
    assert "devices.bad.interval: must be > 0, got -1" in status["last_reload_error"]
    assert status["devices"] == 3  # the running config (with pump-7) stays
    assert "devices.bad.interval: must be > 0" in d.log.read_text()
    assert d.stop() == 0


def test_sigterm_under_load_loses_nothing_acknowledged(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, stop_timeout=5.0)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    producer = Producer(socket_path(config))
    assert producer.first_ack.wait(30)
    d.peer.signal(signal.SIGTERM)
    # The bound: stop_timeout, plus interpreter start-up/teardown slack.
    try:
        rc = d.peer.proc.wait(timeout=5.0 + 10)
    except subprocess.TimeoutExpired:
        raise AssertionError("gatewayd did not exit within its stop bound") from None
    producer.stop()
    assert rc == 0
    stored = notes_in(db_path(config))
    missing = [(s, t) for s, t in producer.acked if stored.get(s) != t]
    assert producer.acked and not missing
    assert "STOPPING=1" in "".join(d.messages("STOPPING=1"))


def test_sigkill_at_random_moments_keeps_every_acknowledged_event(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path)
    db = db_path(config)
    acked: list[tuple[int, str]] = []
    rng = random.Random()
    for round_ in range(10):
        d = start_daemon(config, tmp_path, name=f"gatewayd-{round_}")
        producer = Producer(socket_path(config), threads=8)
        assert producer.first_ack.wait(30)
        # A random moment: after a random number of further acknowledgements.
        producer.wait_acks(len(producer.acked) + rng.randint(0, 300))
        d.kill()
        producer.stop()
        d.peer.stop()
        d.notify.close()
        acked.extend(producer.acked)
        stored = notes_in(db)
        missing = [(s, t) for s, t in acked if stored.get(s) != t]
        assert not missing, f"round {round_}: acknowledged but lost: {missing[:5]}"
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            conn.close()
        assert maintenance.projections_match_rebuild(db)
    assert len(acked) > 100


def test_import_gateway_loads_no_driver_library() -> None:
    code = (
        "import sys, gateway, gateway.daemon, gateway.cli.main, gateway.store\n"
        "import services.collection\n"
        "from gateway import config\n"
        "c = config.load('config.toml')\n"
        "from gateway.daemon import build_services\n"
        "build_services(c)\n"
        "import drivers.virtual\n"
        "bad = [m for m in ('bleak', 'pymodbus', 'aiomqtt', 'aiocoap', 'serial', 'dbus_fast')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_corrupt_database_at_start_is_quarantined_and_the_daemon_runs(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path)
    db = db_path(config)
    db.parent.mkdir(parents=True)
    garbage = b"\x00garbage, not SQLite\xff" * 500
    db.write_bytes(garbage)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    moved = list(db.parent.glob("gateway.db.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == garbage
    assert "is corrupt" in d.log.read_text() and str(moved[0]) in d.log.read_text()
    r = run_cli(config, "--json", "events", "tail", "--stream", "gateway")
    assert r.returncode == 0
    types = [json.loads(line)["type"] for line in r.stdout.splitlines()]
    assert types[0] == "store.quarantined"
    assert d.stop() == 0


def test_a_reload_refreezes_what_it_built_and_applies_the_switch_interval(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    # gc.freeze() keeps start-up objects out of the GC's generations; a reload builds new
    # ones (a device, its driver state) that live as long: frozen again after the reload.
    config = write_config(tmp_path)
    text = config.read_text().replace("[store]", "switch_interval_ms = 2\n\n[store]", 1)
    config.write_text(text)
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    sock = socket_path(config)
    before = call(sock, "status")["process"]
    assert before["switch_interval_ms"] == 2.0
    config.write_text(
        text.replace("switch_interval_ms = 2", "switch_interval_ms = 1")
        + '\n[devices.pump-7]\ndriver = "virtual"\ninterval = 0.05\n'
        '[devices.pump-7.points.speed]\nsignal = "constant"\nbase = 1450\n'
    )
    d.peer.signal(signal.SIGHUP)
    d.messages("RELOADING=1")
    d.messages("READY=1")
    status = call(sock, "status")
    assert status["reloads"] == 1 and status["devices"] == 3  # (the config has two)
    after = status["process"]
    assert after["switch_interval_ms"] == 1.0
    # Without a new freeze the count cannot grow (measured: it stayed the same).
    assert after["gc_frozen"] > before["gc_frozen"]
    assert d.stop() == 0
