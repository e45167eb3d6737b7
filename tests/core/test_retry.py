"""The one retry policy: the `retry` and `breaker` tables, their one reader, the deprecated
names each part used before (accepted, with a warning naming the new key)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from gateway.breaker import Backoff
from gateway.config import Issues, Section, loads
from gateway.retry import BreakerSettings, RetrySettings, read_breaker, read_retry

RETRY = RetrySettings(initial=0.5, cap=30.0)
BREAKER = BreakerSettings(threshold=3, cooldown=30.0)
OLD_RETRY = {"initial": "reconnect_delay", "cap": "reconnect_delay_max"}
OLD_BREAKER = {"threshold": "breaker_threshold", "cooldown": "breaker_cooldown"}


def read(data: dict[str, Any]) -> tuple[RetrySettings, BreakerSettings, Issues]:
    issues = Issues()
    sec = Section(data, "devices.m", issues)
    retry = read_retry(sec, RETRY, old=OLD_RETRY)
    breaker = read_breaker(sec, BREAKER, old=OLD_BREAKER)
    sec.done()
    return retry, breaker, issues


def shown(issues: list[Any]) -> list[str]:
    return [str(i) for i in issues]


def test_absent_tables_give_the_defaults() -> None:
    retry, breaker, issues = read({})
    assert (retry, breaker) == (RETRY, BREAKER) and not issues and not issues.warnings
    assert retry.jitter == "full"


def test_the_tables_are_read() -> None:
    retry, breaker, issues = read({
        "retry": {"initial": 2, "cap": 40, "multiplier": 3, "jitter": "half"},
        "breaker": {"threshold": 7, "cooldown": 9.5},
    })  # fmt: skip
    assert retry == RetrySettings(2.0, 40.0, 3.0, "half")
    assert breaker == BreakerSettings(7, 9.5)
    assert not issues and not issues.warnings


def test_the_settings_make_the_shared_backoff_and_breaker() -> None:
    b = RetrySettings(1.0, 10.0, 3.0, "none").backoff()
    assert isinstance(b, Backoff) and [b.next() for _ in range(4)] == [1.0, 3.0, 9.0, 10.0]
    full = RetrySettings(1.0, 10.0).backoff(lambda: 0.25)
    assert (full.floor, full.next()) == (0.0, 0.25)
    assert RetrySettings(1.0, 10.0, jitter="half").backoff(lambda: 0.0).next() == 0.5
    assert BreakerSettings(2, 5.0).breaker().cooldown == 5.0
    grows = BreakerSettings(2).breaker(RetrySettings(1.0, 8.0), lambda: 1.0)
    grows.failure(0.0)
    grows.failure(0.0)
    assert grows.retry_at == 1.0
    again = RetrySettings(1.0, 10.0, jitter="none").backoff()
    assert [again.next(), again.next(), again.first(), again.next()] == [1.0, 2.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="needs the retry settings"):
        BreakerSettings(2).breaker()


def test_old_names_are_read_with_a_warning_naming_the_new_key() -> None:
    retry, breaker, issues = read({
        "reconnect_delay": 0.05, "reconnect_delay_max": 0.2,
        "breaker_threshold": 2, "breaker_cooldown": 0.3,
    })  # fmt: skip
    assert retry == RetrySettings(0.05, 0.2) and breaker == BreakerSettings(2, 0.3)
    assert not issues
    assert shown(issues.warnings) == [
        "devices.m.reconnect_delay: deprecated name: use `retry.initial` instead",
        "devices.m.reconnect_delay_max: deprecated name: use `retry.cap` instead",
        "devices.m.breaker_threshold: deprecated name: use `breaker.threshold` instead",
        "devices.m.breaker_cooldown: deprecated name: use `breaker.cooldown` instead",
    ]


def test_old_and_new_name_together_is_an_error() -> None:
    _, _, issues = read({"reconnect_delay": 1.0, "retry": {"initial": 2.0}})
    assert shown(issues.items) == [
        "devices.m.reconnect_delay: given twice: as 'reconnect_delay' and as `retry.initial`;"
        " keep `retry.initial` only"
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"retry": {"initial": 10, "cap": 1}}, "devices.m.retry.cap: must be >= initial (10)"),
        (
            {"reconnect_delay": 10, "reconnect_delay_max": 1},
            "devices.m.reconnect_delay_max: must be >= reconnect_delay (10)",
        ),
        ({"retry": {"initial": 0}}, "devices.m.retry.initial: must be > 0, got 0"),
        ({"retry": {"multiplier": 0.5}}, "devices.m.retry.multiplier: must be >= 1, got 0.5"),
        (
            {"retry": {"jitter": "ful"}},
            "devices.m.retry.jitter: must be one of 'full', 'half', 'none', got 'ful'",
        ),
        ({"retry": {"intial": 1}}, "devices.m.retry.intial: unknown key (did you mean"),
        ({"breaker": {"threshold": 0}}, "devices.m.breaker.threshold: must be >= 1, got 0"),
        ({"breaker": {"cooldown": -1}}, "devices.m.breaker.cooldown: must be > 0, got -1"),
        ({"retry": 3}, "devices.m.retry: must be a table, got an integer 3"),
    ],
)
def test_bad_values_name_their_path(data: dict[str, Any], expected: str) -> None:
    _, _, issues = read(data)
    assert any(m.startswith(expected) for m in shown(issues.items)), shown(issues.items)


def test_a_breaker_resting_like_its_retry_has_no_cooldown_key() -> None:
    issues = Issues()
    sec = Section({"breaker": {"threshold": 2, "cooldown": 5}}, "devices.c", issues)
    assert read_breaker(sec, BreakerSettings(3)) == BreakerSettings(2)
    assert shown(issues.items) == ["devices.c.breaker.cooldown: unknown key"]


# -- every part takes its backoff from its own `retry` table, through the shared helper --------
TABLE = 'retry = { initial = 0.25, cap = 7.0, multiplier = 3, jitter = "none" }'
WANT = RetrySettings(initial=0.25, cap=7.0, multiplier=3.0, jitter="none")
LOG = logging.getLogger("test.retry")


def _modbus() -> None:
    from drivers.modbus.bus import Bus
    from drivers.modbus.config import parse_device

    spec = loads(f'[devices.m]\ndriver = "modbus"\nhost = "127.0.0.1"\n{TABLE}\n'
                 "[devices.m.points.p]\naddress = 0\n").devices["m"]  # fmt: skip
    Bus(parse_device(spec).bus, LOG)


def _serial() -> None:
    from drivers.serial.link import SerialLink
    from drivers.serial.options import parse_options

    spec = loads(f'[devices.s]\ndriver = "serial"\nport = "/dev/ttyX"\n{TABLE}\n'
                 'parser = { type = "nmea" }\n'
                 '[devices.s.points.lat]\nfield = "gga.lat"\n').devices["s"]  # fmt: skip
    opts = parse_options(spec)
    SerialLink("s", opts.port, on_data=lambda b: None, on_state=lambda up, why: None,
               logger=LOG, retry=opts.retry)  # fmt: skip


def _ble_options() -> Any:
    from drivers.ble.config import parse_options

    c = loads(f"[drivers.ble]\n{TABLE}\n")
    return parse_options(c.drivers["ble"], "drivers.ble")


def _ble_scanner() -> None:
    from drivers.ble.scanner import Scanner

    async def main() -> None:  # the scanner's Event wants a loop
        Scanner(_ble_options(), lambda a: None, lambda ok, why: None, LOG)

    asyncio.run(main())


def _ble_gatt() -> None:
    from drivers.ble.config import compile_device
    from drivers.ble.gatt import ConnectionPool, GattLink

    spec = loads('[devices.g]\ndriver = "ble"\naddress = "C0:FF:EE:00:00:01"\n'
                 'format = "gatt"\n[devices.g.points.t]\n'
                 'char = "2a6e"\ntype = "int16"\n').devices["g"]  # fmt: skip
    ctx = SimpleNamespace(logger=LOG, clock=SimpleNamespace(monotonic=time.monotonic))

    async def main() -> None:
        GattLink(compile_device(spec), _ble_options(), ConnectionPool(1), cast(Any, ctx))

    asyncio.run(main())


def _coap() -> None:
    from drivers.coap.driver import device_breaker
    from drivers.coap.options import compile_device

    spec = loads(f'[devices.c]\ndriver = "coap"\nuri = "coap://h"\n{TABLE}\n').devices["c"]
    device_breaker(compile_device(spec))


def _sync_link() -> None:
    from gateway.sync.link import MqttLink

    c = loads(f'[sync]\n{TABLE}\n[[sync.endpoints]]\nurl = "mqtt://h"\n')
    MqttLink(c.sections["sync"], "gw", LOG)


def _file_sink() -> None:
    from gateway.sync.filesink import FileSink

    c = loads(f'[sync]\n{TABLE}\n[sync.file]\ndirectory = "/nonexistent"\n')
    cfg = c.sections["sync"]
    FileSink(cfg.file, LOG, cfg.retry)


@pytest.mark.parametrize(
    "build", [_modbus, _serial, _ble_scanner, _ble_gatt, _coap, _sync_link, _file_sink],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
def test_each_part_backs_off_with_the_shared_backoff_of_its_retry_table(
    build: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple[RetrySettings, Backoff]] = []
    real = RetrySettings.backoff

    def spy(self: RetrySettings, rng: Callable[[], float] = random.random) -> Backoff:
        b = real(self, rng)
        made.append((self, b))
        return b

    monkeypatch.setattr(RetrySettings, "backoff", spy)
    build()
    assert made, "the part made no Backoff from its retry settings"
    for settings, b in made:
        assert settings == WANT
        assert (b.base, b.cap, b.multiplier, b.floor) == (0.25, 7.0, 3.0, 1.0)


def test_a_crashed_service_restarts_after_the_shared_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway import supervisor

    made: list[RetrySettings] = []
    real = RetrySettings.backoff

    def spy(self: RetrySettings, rng: Callable[[], float] = random.random) -> Backoff:
        made.append(self)
        return real(self, lambda: 1.0)

    monkeypatch.setattr(RetrySettings, "backoff", spy)
    assert [supervisor.restart_delay(n) for n in (1, 2, 4, 5, 9)] == [1.0, 2.0, 8.0, 60.0, 60.0]
    assert set(made) == {RetrySettings(initial=0.5, cap=60.0)}
