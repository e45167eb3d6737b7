"""Dispatch, dedupe, rate limit, unseen timeout and discovery: pure, with a hand-moved clock."""

from __future__ import annotations

import logging

import pytest

from drivers.ble.config import compile_device
from drivers.ble.dispatch import Advert, Dispatcher
from drivers.testing import ManualClock, RecordingContext
from gateway.config import loads

UUID = "0000fcd2-0000-1000-8000-00805f9b34fb"
MAC = "54:48:E6:8F:80:A5"


def setup(
    extra: str = "", points: str = "temperature"
) -> tuple[Dispatcher, RecordingContext, ManualClock]:
    toml = f'[devices.k]\ndriver = "ble"\naddress = "{MAC}"\nformat = "bthome"\n{extra}\n'
    for p in points.split():
        toml += f"[devices.k.points.{p}]\n"
    spec = loads(toml).devices["k"]
    clock = ManualClock()
    ctx = RecordingContext("test.ble", clock)
    d = Dispatcher(ctx)
    d.add(compile_device(spec, load_secrets=True))
    return d, ctx, clock


def adv(hexdata: str, rssi: int = -60, address: str = MAC) -> Advert:
    return Advert(address=address, rssi=rssi, service_data={UUID: bytes.fromhex(hexdata)})


def test_repeats_are_deduplicated_and_changes_emitted() -> None:
    d, ctx, _ = setup()
    assert d.handle(adv("4002ca09")) == 1
    assert d.handle(adv("4002ca09", rssi=-50)) == 0  # a repeat
    assert d.handle(adv("4002cb09")) == 1  # value changed
    assert [r.value for _, r in ctx.readings] == [25.06, 25.07]


def test_new_packet_id_with_same_values_is_a_new_measurement() -> None:
    d, ctx, _ = setup()
    d.handle(adv("40000102ca09"))
    assert d.handle(adv("40000102ca09")) == 0
    assert d.handle(adv("40000202ca09")) == 1
    assert len(ctx.emits) == 2


def test_min_interval_holds_back_changes_until_due() -> None:
    d, ctx, clock = setup("min_interval = 10")
    d.handle(adv("4002ca09"))
    clock.now += 1
    assert d.handle(adv("4002cb09")) == 0  # changed, but too soon
    clock.now += 1
    assert d.handle(adv("4002cb09")) == 0  # the device repeats it; still too soon
    clock.now += 9
    assert d.handle(adv("4002cb09")) == 1  # the held-back change, once due
    assert [r.value for _, r in ctx.readings] == [25.06, 25.07]


def test_events_bypass_min_interval() -> None:
    d, ctx, clock = setup("min_interval = 60", points="temperature button")
    d.handle(adv("4000013a01"))
    clock.now += 1
    assert d.handle(adv("4000023a02")) == 1
    assert ctx.values("k") == {"button": "double_press"}


def test_heartbeat_re_emits_unchanged_values() -> None:
    d, ctx, clock = setup("heartbeat = 30")
    d.handle(adv("4002ca09"))
    clock.now += 10
    assert d.handle(adv("4002ca09")) == 0
    clock.now += 25
    assert d.handle(adv("4002ca09")) == 1
    assert len(ctx.emits) == 2


def test_unseen_timeout_makes_device_unavailable_and_back() -> None:
    d, ctx, clock = setup("unseen_timeout = 30")
    d.handle(adv("4002ca09"))
    assert ctx.availability == [("k", True, "advertising")]
    clock.now += 29
    d.check_unseen()
    assert len(ctx.availability) == 1
    clock.now += 2
    d.check_unseen()
    d.check_unseen()  # reported once per change
    assert ctx.availability[1:] == [("k", False, "no advertisement for 30 s")]
    d.handle(adv("4002ca09"))
    assert ctx.availability[-1] == ("k", True, "advertising")


def test_never_seen_device_times_out_too() -> None:
    d, ctx, clock = setup("unseen_timeout = 5")
    clock.now += 6
    d.check_unseen()
    assert ctx.availability == [("k", False, "no advertisement for 5 s")]


@pytest.mark.parametrize(
    "hexdata", ["", "4001", "4002", "20ffff", "40ff00", "4153", "40" + "00" * 400, "41" + "00" * 9]
)
def test_bad_packets_never_escape(hexdata: str, caplog: pytest.LogCaptureFixture) -> None:
    d, ctx, _ = setup()
    with caplog.at_level(logging.DEBUG, "test.ble"):
        assert d.handle(adv(hexdata)) == 0
        assert d.handle(adv(hexdata)) == 0
    assert ctx.emits == []
    state = d.by_id["k"]
    assert sum(state.rejected.values()) == 2
    levels = [r.levelno for r in caplog.records if "rejected" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG]  # loud once, then quiet


def test_downgrade_is_rejected_for_a_keyed_device() -> None:
    d, _ctx, _ = setup('bindkey = "231d39c1d7cc1ab1aee224cd096db932"')
    assert d.handle(adv("4002ca09")) == 0
    assert d.by_id["k"].rejected == {"downgrade": 1}
    assert d.handle(adv("41a47266c95f730011223378237214")) == 1


def test_discovery_reports_unknown_devices_once() -> None:
    d, ctx, clock = setup()
    other = "A4:C1:38:00:00:01"
    d.handle(adv("4002ca09", address=other))
    d.handle(adv("4002cb09", address=other))
    ruuvi = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    d.handle(Advert(address="CB:B8:33:4C:88:4F", manufacturer_data={0x0499: ruuvi}))
    d.handle(Advert(address="11:22:33:44:55:66", manufacturer_data={0x004C: b"\x02\x15"}))
    assert [(f.address, f.kind) for f in ctx.found] == [
        (other, "bthome"), ("CB:B8:33:4C:88:4F", "ruuvi-5"),
    ]  # fmt: skip
    assert ctx.emits == []  # discovered, never ingested
    clock.now += 3601
    d.handle(adv("4002ca09", address=other))
    assert len(ctx.found) == 3


def test_discovery_can_be_off() -> None:
    d, ctx, _ = setup()
    d.discovery = False
    d.handle(adv("4002ca09", address="A4:C1:38:00:00:01"))
    assert ctx.found == []


def test_a_decoder_bug_is_contained(monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ctx, _ = setup()

    def boom(*_a: object, **_k: object) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(d, "_decode", boom)
    assert d.handle(adv("4002ca09")) == 0
    assert d.errors == 1


def test_rejected_packets_are_no_sign_of_life() -> None:
    d, ctx, clock = setup('bindkey = "231d39c1d7cc1ab1aee224cd096db932"\nunseen_timeout = 10')
    d.handle(adv("41a47266c95f730011223378237214"))
    assert ctx.availability == [("k", True, "advertising")]
    for _ in range(3):
        clock.now += 4
        d.handle(adv("4002ca09"))  # unencrypted packets under its address: rejected
    d.check_unseen()
    assert ctx.availability[-1] == ("k", False, "no advertisement for 10 s")
