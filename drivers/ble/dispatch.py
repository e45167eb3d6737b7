"""From advertisements to readings: route to the device's decoder, dedupe, rate-limit, track.

No bleak and no asyncio here: the scanner hands each advertisement over as an `Advert`,
`Dispatcher.handle()` decides what (if anything) the core gets. It never raises: a bad
packet is counted and logged (first time at WARNING, then DEBUG), never propagated.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from drivers.base import Clock, DiscoveredDevice, DriverContext, RawReading
from drivers.ble import bthome, custom, ruuvi
from drivers.ble.common import AdvertisementError, Decoded, Value
from drivers.ble.config import BleDevice

#: An unconfigured device is reported again after this long (not on every advertisement).
DISCOVERY_REPEAT: Final = 3600.0
#: Addresses remembered for discovery; phones rotate random addresses, so bound it.
DISCOVERY_MEMORY: Final = 1024


@dataclass(frozen=True, slots=True)
class Advert:
    """One advertisement as the scanner saw it (bleak-independent)."""

    address: str  # upper case
    rssi: int | None = None
    name: str | None = None
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(slots=True)
class DeviceState:
    device: BleDevice
    guard: bthome.Guard | None
    last_seen: float
    available: bool | None = None
    last_emit_at: float | None = None
    last_values: dict[str, Value] = field(default_factory=dict)
    last_packet_id: int | None = None
    latest: dict[str, Value] = field(default_factory=dict)
    rssi: int | None = None
    rejected: dict[str, int] = field(default_factory=dict)
    #: A change held back by min_interval: (values, packet id), emitted once it is due.
    pending: tuple[dict[str, Value], int | None] | None = None
    last_raw: bytes | None = None  # the last accepted packet's bytes
    accepted: int = 0
    emitted: int = 0


def decode_known(adv: Advert) -> Decoded | None:
    """Decode an advertisement of a format we know without configuration (for discovery and
    `gatewayctl probe ble scan`); None if it is none of them. Never raises."""
    data = adv.service_data.get(bthome.UUID)
    try:
        if data is not None:
            if data[:1] and data[0] & 0x01:
                return Decoded(format="bthome-encrypted", values={}, encrypted=True)
            return bthome.parse(data, mac=adv.address)
        data = adv.manufacturer_data.get(ruuvi.COMPANY_ID)
        if data is not None and data[:1] == bytes([ruuvi.FORMAT]):
            return ruuvi.parse(data)
    except AdvertisementError:
        return None
    return None


class Dispatcher:
    """Configured devices by address; everything else is a discovery candidate."""

    def __init__(self, ctx: DriverContext, *, discovery: bool = True) -> None:
        self.ctx = ctx
        self.clock: Clock = ctx.clock
        self.log: logging.Logger = ctx.logger
        self.discovery = discovery
        self.by_address: dict[str, DeviceState] = {}
        self.by_id: dict[str, DeviceState] = {}
        self._discovered: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self.errors = 0  # unexpected decoder failures (bugs), counted

    # -- devices --------------------------------------------------------------------------
    def add(self, device: BleDevice) -> None:
        guard = bthome.Guard(device.key) if device.format == "bthome" else None
        state = DeviceState(device, guard, last_seen=self.clock.monotonic())
        self.by_address[device.address] = state
        self.by_id[device.id] = state

    def remove(self, device_id: str) -> None:
        state = self.by_id.pop(device_id, None)
        if state is not None:
            self.by_address.pop(state.device.address, None)

    # -- the hot path ---------------------------------------------------------------------
    def handle(self, adv: Advert) -> int:
        """Process one advertisement; returns how many readings were emitted."""
        state = self.by_address.get(adv.address)
        if state is None:
            if self.discovery:
                self._discover(adv)
            return 0
        try:
            return self._handle(state, adv)
        except Exception:  # a decoder bug must not take the scanner down with it
            self.errors += 1
            self.log.exception("BLE: unexpected error decoding %s", state.device.id)
            return 0

    def _handle(self, state: DeviceState, adv: Advert) -> int:
        now = self.clock.monotonic()
        dev = state.device
        data = self._select(state, adv)
        # No data of this format (a scan response), or the device repeating its last packet
        # (it does, several times a second): nothing new to decode.
        if data is None or data == state.last_raw:
            self._seen(state, now, adv)
            return self._flush(state, now)
        try:
            decoded = self._decode(state, data)
        except AdvertisementError as exc:
            if exc.reason == "duplicate":
                self._seen(state, now, adv)
                return self._flush(state, now)
            # A rejected packet does not count as a sign of life: a spoofer sending garbage
            # or downgraded packets under a device's address must not keep it "available".
            self._reject(state, exc)
            return 0
        self._seen(state, now, adv)
        state.last_raw = data
        state.accepted += 1
        values = {p: decoded.values[f] for p, f in dev.fields.items() if f in decoded.values}
        if not values:
            return 0
        state.latest.update(values)
        new_packet = decoded.packet_id is not None and decoded.packet_id != state.last_packet_id
        changed = new_packet or values != state.last_values
        event = bool(decoded.events) and any(dev.fields[p] in decoded.events for p in values)
        due = state.last_emit_at is None or now - state.last_emit_at >= dev.min_interval
        if (changed and (event or due)) or self._heartbeat_due(state, now):
            state.last_packet_id = decoded.packet_id
            state.last_values = values
            state.pending = None
            return self._emit(state, values, now)
        if changed:
            state.pending = (values, decoded.packet_id)
        return 0

    def _select(self, state: DeviceState, adv: Advert) -> bytes | None:
        """The bytes of the device's format in this advertisement, if any."""
        dev = state.device
        if dev.format == "bthome":
            return adv.service_data.get(bthome.UUID)
        if dev.format == "ruuvi":
            return adv.manufacturer_data.get(ruuvi.COMPANY_ID)
        assert dev.custom is not None
        return dev.custom.select(adv.manufacturer_data, adv.service_data)

    def _decode(self, state: DeviceState, data: bytes) -> Decoded:
        dev = state.device
        if dev.format == "bthome":
            assert state.guard is not None
            return state.guard.accept(data, dev.address)
        if dev.format == "ruuvi":
            return ruuvi.parse(data)
        assert dev.custom is not None
        return custom.parse(dev.custom, data)

    def _seen(self, state: DeviceState, now: float, adv: Advert) -> None:
        state.last_seen = now
        state.rssi = adv.rssi
        if state.available is not True:
            state.available = True
            self.ctx.set_available(state.device.id, True, "advertising")

    def _heartbeat_due(self, state: DeviceState, now: float) -> bool:
        hb = state.device.heartbeat
        return bool(hb and state.last_emit_at is not None and now - state.last_emit_at >= hb)

    def _flush(self, state: DeviceState, now: float) -> int:
        """Nothing new arrived: emit a held-back change once due, or a heartbeat."""
        dev = state.device
        if state.pending is not None and (
            state.last_emit_at is None or now - state.last_emit_at >= dev.min_interval
        ):
            values, state.last_packet_id = state.pending
            state.last_values = values
            state.pending = None
            return self._emit(state, values, now)
        if state.last_values and self._heartbeat_due(state, now):
            return self._emit(state, state.last_values, now)
        return 0

    def _emit(self, state: DeviceState, values: Mapping[str, Value], now: float) -> int:
        state.last_emit_at = now
        state.emitted += 1
        self.ctx.emit(state.device.id, [RawReading(p, v) for p, v in values.items()])
        return len(values)

    def _reject(self, state: DeviceState, exc: AdvertisementError) -> None:
        n = state.rejected.get(exc.reason, 0) + 1
        state.rejected[exc.reason] = n
        # First of a kind at WARNING (someone must look), repeats quietly (a noisy or hostile
        # neighbour must not flood the log); the counts are in the driver's health.
        level = logging.WARNING if n == 1 else logging.DEBUG
        self.log.log(level, "BLE %s (%s): packet rejected: %s", state.device.id,
                     state.device.address, exc)  # fmt: skip

    # -- availability and discovery -------------------------------------------------------
    def check_unseen(self) -> None:
        """Mark devices unseen for their timeout unavailable (call periodically)."""
        now = self.clock.monotonic()
        for state in self.by_id.values():
            timeout = state.device.unseen_timeout
            if state.available is not False and now - state.last_seen >= timeout:
                state.available = False
                self.ctx.set_available(
                    state.device.id, False, f"no advertisement for {timeout:g} s"
                )

    def mark_all_unavailable(self, reason: str) -> None:
        for state in self.by_id.values():
            if state.available is not False:
                state.available = False
                self.ctx.set_available(state.device.id, False, reason)

    def _discover(self, adv: Advert) -> None:
        decoded = decode_known(adv)
        if decoded is None:
            return
        now = self.clock.monotonic()
        last = self._discovered.get(adv.address)
        if last is not None and last[1] == decoded.format and now - last[0] < DISCOVERY_REPEAT:
            return
        self._discovered[adv.address] = (now, decoded.format)
        self._discovered.move_to_end(adv.address)
        while len(self._discovered) > DISCOVERY_MEMORY:
            self._discovered.popitem(last=False)
        self.ctx.discovered(
            DiscoveredDevice(
                driver="ble",
                address=adv.address,
                name=adv.name,
                kind=decoded.format,
                rssi=adv.rssi,
                values=dict(decoded.values),
            )
        )
