"""The one shared BleakScanner of the BLE driver, kept alive through BlueZ faults.

`Scanner.run()` starts bleak's scanner (active or passive, on the configured adapter), hands
every advertisement to a callback as an `Advert`, and watches BlueZ on D-Bus: when the adapter
disappears or bluetoothd stops, it stops, reports why, and starts again with backoff once it
can. `explain()` turns the faults people actually hit into a cause and a fix.
bleak and dbus-fast are imported only when a scan starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from drivers.ble import bthome, ruuvi
from drivers.ble.config import BleOptions
from drivers.ble.custom import CustomFormat
from drivers.ble.dispatch import Advert

ADAPTER_IFACE: Final = "org.bluez.Adapter1"


@dataclass(frozen=True, slots=True)
class Fault:
    """Why BLE does not work, and what to do about it."""

    cause: str
    fix: str

    def __str__(self) -> str:
        return f"{self.cause}. Fix: {self.fix}"


def _adapter_name(adapter: str | None) -> str:
    return f"adapter {adapter!r}" if adapter else "a Bluetooth adapter"


def explain(exc: BaseException, adapter: str | None = None, *, gatt: bool = False) -> Fault:
    """Map a bleak / D-Bus / OS error to a Fault (cause + fix). Never raises. `gatt`: the
    error came from talking to one device (its faults get device advice)."""
    name = type(exc).__name__
    text = str(exc)
    dbus_error = str(getattr(exc, "dbus_error", "") or "")
    reason = getattr(getattr(exc, "reason", None), "name", "")
    if (
        name == "AuthError"
        or reason.startswith("DENIED")
        or dbus_error == "org.freedesktop.DBus.Error.AccessDenied"
        or "AccessDenied" in text
    ):
        return Fault(
            "D-Bus denied this process access to BlueZ (org.bluez): permission denied",
            "run the gateway as a user in the 'bluetooth' group (systemd: "
            "SupplementaryGroups=bluetooth) or allow it in /etc/dbus-1/system.d/bluetooth.conf",
        )
    if (
        dbus_error
        in (
            "org.freedesktop.DBus.Error.ServiceUnknown",
            "org.freedesktop.DBus.Error.NameHasNoOwner",
        )
        or "org.bluez was not provided" in text
    ):
        return Fault(
            "BlueZ is not running (no 'org.bluez' service on the D-Bus system bus)",
            "install and start bluetoothd: 'systemctl enable --now bluetooth'",
        )
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError) or (
        isinstance(exc, OSError) and "bus" in text.lower()
    ):
        return Fault(
            f"the D-Bus system bus is not reachable ({exc})",
            "start D-Bus ('systemctl start dbus') or check DBUS_SYSTEM_BUS_ADDRESS",
        )
    if (
        reason == "POWERED_OFF"
        or "powered" in text.lower()
        or dbus_error == "org.bluez.Error.NotReady"
    ):
        return Fault(
            f"{_adapter_name(adapter)} is powered off",
            "'bluetoothctl power on' (and 'rfkill unblock bluetooth' if it is blocked)",
        )
    if name == "BleakDeviceNotFoundError" or (gatt and "UnknownObject" in dbus_error):
        return Fault(
            f"BlueZ does not know this device ({text or name})",
            "check that it is powered and advertising nearby ('gatewayctl probe ble scan'); "
            "BlueZ forgets devices it has not heard for a while",
        )
    if reason in ("NO_BLUETOOTH", "NO_BLE_CENTRAL_ROLE") or "not found" in text:
        return Fault(
            f"no Bluetooth adapter: BlueZ does not know {_adapter_name(adapter)}",
            "plug in or enable the adapter ('bluetoothctl list' shows what BlueZ sees; "
            "'rfkill unblock bluetooth'), or set [drivers.ble] adapter to one it lists",
        )
    if (
        "passive scanning" in text
        or "or_patterns" in text
        or "AdvertisementMonitor" in text
        or "NotSupported" in dbus_error
    ):
        return Fault(
            f"passive scanning is not supported here ({text or name})",
            'set [drivers.ble] scan_mode = "active", or run bluetoothd with --experimental '
            "(BlueZ >= 5.56 with the advertisement monitor API)",
        )
    if gatt:
        what = "timed out" if isinstance(exc, TimeoutError) else f"{name}: {text or dbus_error}"
        return Fault(
            f"GATT connection or transfer failed ({what})",
            "check that the device is powered, in range, and not connected to another "
            "central (a phone app); the driver retries with backoff",
        )
    if isinstance(exc, TimeoutError):
        return Fault("BlueZ did not answer in time", "check 'journalctl -u bluetooth'")
    return Fault(
        f"BLE error: {name}: {text or dbus_error}",
        "check 'bluetoothctl show' and 'journalctl -u bluetooth'",
    )


def or_patterns(customs: Sequence[CustomFormat]) -> list[tuple[int, int, bytes]]:
    """What passive scanning asks BlueZ to pass on: the formats we decode."""
    from bleak.assigned_numbers import AdvertisementDataType

    sd16 = AdvertisementDataType.SERVICE_DATA_UUID16
    mfr = AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA
    patterns: list[tuple[int, Any, bytes]] = [
        (0, sd16, bthome.UUID16.to_bytes(2, "little")),
        (0, mfr, ruuvi.COMPANY_ID.to_bytes(2, "little")),
    ]
    for fmt in customs:
        if fmt.manufacturer_id is not None:
            patterns.append((0, mfr, fmt.manufacturer_id.to_bytes(2, "little")))
        elif fmt.service_uuid is not None and fmt.service_uuid.endswith(
            "-0000-1000-8000-00805f9b34fb"
        ):
            uuid16 = int(fmt.service_uuid[4:8], 16)
            patterns.append((0, sd16, uuid16.to_bytes(2, "little")))
    return patterns


class AdapterPoweredOffError(Exception):
    pass


class _Watch:
    """Our own small D-Bus connection that tells when the adapter or BlueZ goes away."""

    def __init__(self, adapter: str | None) -> None:
        self.adapter_path = f"/org/bluez/{adapter}" if adapter else None
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.bus: Any = None

    def _lose(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)

    def _on_message(self, msg: Any) -> None:
        member = msg.member
        if member == "InterfacesRemoved":
            path, ifaces = msg.body
            if ADAPTER_IFACE in ifaces and self.adapter_path in (None, path):
                self._lose(f"adapter {path.rsplit('/', 1)[-1]} was removed")
        elif member == "NameOwnerChanged":
            name, _old, new = msg.body
            if name == "org.bluez" and not new:
                self._lose("BlueZ (org.bluez) left the bus: bluetoothd stopped")
        elif member == "PropertiesChanged" and msg.body and msg.body[0] == ADAPTER_IFACE:
            powered = msg.body[1].get("Powered")
            if powered is not None and not powered.value:
                self._lose(f"adapter {str(msg.path).rsplit('/', 1)[-1]} was powered off")

    async def open(self) -> None:
        from dbus_fast import BusType, Message
        from dbus_fast.aio import MessageBus

        self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        self.bus.add_message_handler(self._on_message)
        rules = [
            "type='signal',interface='org.freedesktop.DBus.ObjectManager',"
            "member='InterfacesRemoved'",
            "type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
            "arg0='org.bluez'",
            "type='signal',interface='org.freedesktop.DBus.Properties',"
            "member='PropertiesChanged',arg0='org.bluez.Adapter1'",
        ]
        for rule in rules:
            await self.bus.call(
                Message(
                    destination="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus",
                    interface="org.freedesktop.DBus",
                    member="AddMatch",
                    signature="s",
                    body=[rule],
                )
            )
        bus = self.bus

        async def watch_bus() -> None:
            with contextlib.suppress(Exception):
                await bus.wait_for_disconnect()
            self._lose("the D-Bus connection was lost")

        self._bus_task = asyncio.create_task(watch_bus(), name="ble-dbus-watch")

    async def check_powered(self) -> None:
        """Refuse to start on a configured adapter that is powered off (BlueZ would answer
        NotReady to StartDiscovery; asking first gives the clearer message)."""
        if self.adapter_path is None or self.bus is None:
            return
        from dbus_fast import Message, MessageType

        reply = await self.bus.call(
            Message(
                destination="org.bluez",
                path=self.adapter_path,
                interface="org.freedesktop.DBus.Properties",
                member="Get",
                signature="ss",
                body=[ADAPTER_IFACE, "Powered"],
            )
        )
        # Errors (no adapter, no BlueZ, access denied) are left to bleak's own start.
        if reply.message_type == MessageType.METHOD_RETURN and not reply.body[0].value:
            name = self.adapter_path.rsplit("/", 1)[-1]
            raise AdapterPoweredOffError(f"adapter {name} is powered off")

    async def close(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.bus.wait_for_disconnect()
            self.bus = None
        task = getattr(self, "_bus_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


StateCallback = Callable[[bool, str], None]


class Scanner:
    """Keeps one BleakScanner running; reports (ok, why) on every change of state."""

    def __init__(
        self,
        options: BleOptions,
        on_advert: Callable[[Advert], None],
        on_state: StateCallback,
        logger: logging.Logger,
        customs: Sequence[CustomFormat] = (),
    ) -> None:
        self.options = options
        self.on_advert = on_advert
        self.on_state = on_state
        self.log = logger
        self.customs = list(customs)
        self.fault: Fault | None = None
        self.scanning = False
        self.adverts = 0
        self.backoff = options.retry.backoff()  # between failed starts
        #: Set while scanning (diagnostics, and tests await it instead of sleeping).
        self.running = asyncio.Event()

    def _callback(self, device: Any, ad: Any) -> None:
        self.adverts += 1
        try:
            self.on_advert(
                Advert(
                    address=device.address.upper(),
                    rssi=ad.rssi,
                    name=ad.local_name,
                    manufacturer_data=ad.manufacturer_data,
                    service_data=ad.service_data,
                )
            )
        except Exception:  # never let a bug of ours break bleak's D-Bus message loop
            self.log.exception("BLE: error handling an advertisement")

    async def _start(self) -> Any:
        from bleak import BleakScanner

        bluez: dict[str, Any] = {}
        if self.options.adapter:
            bluez["adapter"] = self.options.adapter
        if self.options.scan_mode == "passive":
            bluez["or_patterns"] = or_patterns(self.customs)
        scanner = BleakScanner(
            self._callback,
            scanning_mode=self.options.scan_mode,  # type: ignore[arg-type]
            bluez=bluez,  # type: ignore[arg-type]
        )
        await scanner.start()
        return scanner

    async def run(self) -> None:
        """Scan until cancelled; faults are reported and retried, never raised."""
        backoff = self.backoff
        backoff.reset()
        failures = 0
        while True:
            watch = _Watch(self.options.adapter)
            scanner: Any = None
            try:
                await watch.open()
                await watch.check_powered()
                scanner = await self._start()
            except asyncio.CancelledError:
                await watch.close()
                raise
            except Exception as exc:
                await watch.close()
                fault = explain(exc, self.options.adapter)
                failures += 1
                self._down(fault, first=failures == 1 or fault != self.fault)
                await asyncio.sleep(backoff.next())
                continue
            failures = 0
            backoff.reset()
            self._up()
            try:
                why = await watch.lost
            finally:
                self.scanning = False
                self.running.clear()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await asyncio.shield(self._stop(scanner))
                await watch.close()
            self._down(explain_lost(why, self.options.adapter), first=True)
            await asyncio.sleep(backoff.first())  # then retries start from the first step

    async def _stop(self, scanner: Any) -> None:
        with contextlib.suppress(Exception):
            await scanner.stop()

    def _up(self) -> None:
        if self.fault is not None:
            self.log.info("BLE: scanning again (recovered from: %s)", self.fault.cause)
        else:
            self.log.info("BLE: scanning (%s)", self.options.scan_mode)
        self.fault = None
        self.scanning = True
        self.running.set()
        self.on_state(True, "scanning")

    def _down(self, fault: Fault, *, first: bool) -> None:
        # First failure loud, identical repeats quiet: a Pi without an adapter must not fill
        # its SD card with the same line every minute.
        self.log.log(logging.ERROR if first else logging.DEBUG, "BLE unavailable: %s", fault)
        self.fault = fault
        self.scanning = False
        self.running.clear()
        self.on_state(False, str(fault))


def explain_lost(why: str, adapter: str | None) -> Fault:
    if "bluetoothd stopped" in why:
        return Fault(
            f"BlueZ is not running ({why})",
            "start bluetoothd: 'systemctl enable --now bluetooth'",
        )
    if "powered off" in why:
        return Fault(why, "'bluetoothctl power on' (and 'rfkill unblock bluetooth')")
    if "removed" in why:
        return Fault(
            f"no Bluetooth adapter: {why}",
            "plug the adapter back in (the driver resumes by itself); 'bluetoothctl list'",
        )
    return Fault(why, "check 'systemctl status dbus bluetooth'")
