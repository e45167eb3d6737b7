"""Commands end to end: `gatewayctl command` -> the control service -> the Modbus driver ->
a pymodbus slave, read back by mbpoll; each step an event of the command's own stream."""

from __future__ import annotations

from pathlib import Path

from gateway.errors import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.control.support import cli, cli_json, command_events
from tests.drivers_modbus.support import ModbusServer, mbpoll
from tests.support.daemon import Daemon


def test_cli_command_writes_the_register_once_per_id(
    gatewayd: Daemon, server: ModbusServer, tmp_path: Path
) -> None:
    out = cli(gatewayd.config, "command", "plc", "setpoint", "21.5", "--id", "c-1", "--wait")
    assert out.returncode == 0, out.stderr
    assert "command c-1: succeeded, read back 21.5" in out.stdout
    # scale 0.1 undone once, by the core: the register holds 215
    assert mbpoll("127.0.0.1", "-m", "tcp", "-p", str(server.port), "-a", "1", "-t", "4",
                  "-r", "0", "-c", "1") == ["215"]  # fmt: skip
    assert server.writes() == 1
    # the same id again: the first one's outcome, no second write (even with another value)
    again = cli(gatewayd.config, "command", "plc", "setpoint", "50", "--id", "c-1", "--wait")
    assert again.returncode == 0 and "command c-1: succeeded" in again.stdout
    assert server.writes() == 1
    types = [t for t, _ in command_events(tmp_path / "state" / "gateway.db", "c-1")]
    assert types == ["command.requested", "command.accepted", "command.sent",
                     "command.succeeded"]  # fmt: skip
    rc, row = cli_json(gatewayd.config, "commands", "--id", "c-1")
    assert rc == 0 and row["status"] == "succeeded" and row["by"].startswith("uid:")
    shown = cli(gatewayd.config, "devices", "plc")  # the device with its recent commands
    assert shown.returncode == 0 and "commands: 0 pending, 1 recent" in shown.stdout
    assert "c-1" in shown.stdout and "succeeded" in shown.stdout


def test_every_refusal_names_its_reason_and_writes_nothing(
    gatewayd: Daemon, server: ModbusServer
) -> None:
    cases = [
        (("nope", "setpoint", "1"), "unknown_device", EXIT_USAGE),
        (("plc", "nope", "1"), "unknown_point", EXIT_USAGE),
        (("plc", "status", "1"), "not_writable", EXIT_USAGE),
        (("plc", "setpoint", "100.5"), "out_of_range", EXIT_USAGE),
        (("plc", "setpoint", '"hot"'), "wrong_type", EXIT_USAGE),
        (("off", "level", "1"), "device_disabled", EXIT_USAGE),
        (("plc", "setpoint", "1", "--timeout", "0.000001"), "expired", EXIT_USAGE),
    ]
    for args, reason, status in cases:
        out = cli(gatewayd.config, "command", *args, "--wait")
        assert out.returncode == status, (args, out.stdout, out.stderr)
        assert f"rejected ({reason})" in out.stdout, (args, out.stdout)
    assert server.writes() == 0


def test_a_silent_slave_is_an_unknown_outcome_never_retried(
    gatewayd: Daemon, server: ModbusServer
) -> None:
    out = cli(gatewayd.config, "command", "mute", "setpoint", "7", "--id", "m-1", "--wait")
    assert out.returncode == EXIT_FAILURE, out.stderr
    assert "command m-1: failed (unknown_outcome)" in out.stdout
    assert server.writes() == 1  # one write request reached it, and only one


def test_a_full_queue_rejects_and_an_expired_command_is_never_sent(
    tmp_path: Path, server: ModbusServer
) -> None:
    from tests.control.support import control_config
    from tests.control.test_recovery import status
    from tests.support.daemon import start_daemon
    from tests.support.peers import wait_until

    config = control_config(tmp_path, server.port, timeout=2.0, extra_control="queue = 1")
    db = tmp_path / "state" / "gateway.db"
    d = start_daemon(config, tmp_path)
    try:
        # q-1 in flight on the silent unit, q-2 waits (its deadline passes meanwhile), q-3
        # finds the queue full
        assert cli(config, "command", "mute", "setpoint", "1", "--id", "q-1").returncode == 0
        wait_until(lambda: status(db, "q-1") == "sent", "q-1 sent")
        out = cli(config, "command", "mute", "setpoint", "2", "--id", "q-2", "--timeout", "0.5")
        assert out.returncode == 0 and "accepted" in out.stdout, out.stdout
        full = cli(config, "command", "mute", "setpoint", "3", "--id", "q-3")
        assert full.returncode == EXIT_UNAVAILABLE, full.stdout
        assert "rejected (queue_full)" in full.stdout
        wait_until(lambda: status(db, "q-2") == "expired", "q-2 expired", attempts=400)
        assert [t for t, _ in command_events(db, "q-2")] == [
            "command.requested", "command.accepted", "command.expired"]  # fmt: skip
        assert server.writes() == 1  # q-1 only
    finally:
        d.stop()
        d.notify.close()
