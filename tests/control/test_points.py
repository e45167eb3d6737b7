"""The point rules (services.points): one refusal class per reason, scale undone once."""

from __future__ import annotations

import pytest

from gateway import config as cfg
from gateway.errors import (
    ConfigError,
    DeviceDisabledError,
    NotWritableError,
    OutOfRangeError,
    RemoteWriteError,
    UnknownDeviceError,
    UnknownPointError,
    WriteRefusedError,
    WrongTypeError,
)
from services.points import check_write

CONFIG = """
[devices.plc]
driver = "modbus"
host = "127.0.0.1"
port = 1502

[devices.plc.points.setpoint]
address = 0
type = "int16"
scale = 0.1
offset = -10.0
min = -20.0
max = 80.0
writable = true

[devices.plc.points.run]
table = "coil"
address = 0
writable = true
remote_write = true

[devices.plc.points.status]
address = 1

[devices.sim]
driver = "virtual"
enabled = false

[devices.sim.points.level]
signal = "constant"
writable = true
"""


def test_each_refusal_has_its_class_and_the_scale_is_undone_once() -> None:
    devices = cfg.loads(CONFIG).devices
    w = check_write(devices, "plc", "setpoint", 21.5)
    assert w.raw == pytest.approx(315.0)  # (21.5 - -10) / 0.1, in engineering units before
    assert check_write(devices, "plc", "run", 1).raw is True
    cases: list[tuple[str, str, object, type[WriteRefusedError], str]] = [
        ("nope", "x", 1, UnknownDeviceError, "4.04"),
        ("plc", "nope", 1, UnknownPointError, "4.04"),
        ("plc", "status", 1, NotWritableError, "4.05"),
        ("plc", "setpoint", 80.5, OutOfRangeError, "4.00"),
        ("plc", "setpoint", -20.5, OutOfRangeError, "4.00"),
        ("plc", "setpoint", "hot", WrongTypeError, "4.00"),
        ("plc", "setpoint", True, WrongTypeError, "4.00"),
        ("plc", "run", 2, WrongTypeError, "4.00"),
        ("sim", "level", 1.0, DeviceDisabledError, "4.03"),
    ]
    for device, point, value, cls, code in cases:
        with pytest.raises(cls) as got:
            check_write(devices, device, point, value)
        assert got.value.coap_code == code and got.value.reason
    with pytest.raises(RemoteWriteError):
        check_write(devices, "plc", "setpoint", 1.0, remote=True)
    check_write(devices, "plc", "run", True, remote=True)  # remote_write = true
    check_write(devices, "plc", "setpoint", 1.0, remote=True, allow_remote=["plc/*"])


def test_allow_remote_patterns_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"control.allow_remote\[0\]"):
        cfg.loads('[control]\nallow_remote = ["plc"]\n')


def test_auth_and_saga_mistakes_are_reported_with_their_paths() -> None:
    text = """
[auth]
default = "boss"
[auth.users]
alice = "god"

[sagas.s1]
steps = [
  { write = "plc", value = 1 },
  { wait = "plc/x >", timeout = 5 },
  { write = "plc/y", wait = "plc/y > 1" },
  { write = "plc/y", value = 1, undo = 0, retries = 2 },
]
[sagas.empty]
steps = []
"""
    with pytest.raises(ConfigError) as got:
        cfg.loads(text)
    paths = {i.path for i in got.value.issues}
    assert {
        "auth.default", "auth.users.alice", "sagas.s1.steps[0].write", "sagas.s1.steps[1].wait",
        "sagas.s1.steps[2]", "sagas.s1.steps[3].retries", "sagas.empty.steps",
    } <= paths, got.value  # fmt: skip
