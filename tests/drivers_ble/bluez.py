"""A real D-Bus with BlueZ's API on it, for bleak to talk to (no Bluetooth hardware here).

`BluezBus` starts a private `dbus-daemon` and python-dbusmock's `bluez5` template on it, and
drives the mock (adapters, advertising devices, GATT characteristics) with dbus-python.
Tests point bleak at it with DBUS_SYSTEM_BUS_ADDRESS. See ../shared/PEERS.md ("BLE").
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.support.peers import Peer, require_binary, wait_until

DEVICE = "org.bluez.Device1"
SERVICE = "org.bluez.GattService1"
CHAR = "org.bluez.GattCharacteristic1"
OM = "org.freedesktop.DBus.ObjectManager"
MOCK = "org.freedesktop.DBus.Mock"
BLUEZ_MOCK = "org.bluez.Mock"

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
  {extra}
</busconfig>
"""

#: What /etc/dbus-1/system.d/bluetooth.conf does to a user outside the `bluetooth` group
#: (narrowed to the interface bleak needs first, so that the test can still drive the mock).
DENY_BLUEZ = """<policy context="mandatory">
    <deny send_destination="org.bluez" send_interface="org.freedesktop.DBus.ObjectManager"/>
  </policy>"""

_CONNECT = (
    # a blocked device refuses connections, as BlueZ does (tests block it to make it fail)
    "if self.props['org.bluez.Device1']['Blocked']:\n"
    "    raise dbus.exceptions.DBusException('Page Timeout', name='org.bluez.Error.Failed')\n"
    "self.props['org.bluez.Device1']['Connected'] = dbus.Boolean(True)\n"
    "self.props['org.bluez.Device1']['ServicesResolved'] = dbus.Boolean(True)\n"
    "self.EmitSignal('org.freedesktop.DBus.Properties', 'PropertiesChanged', 'sa{sv}as',"
    " ['org.bluez.Device1', {'Connected': dbus.Boolean(True),"
    " 'ServicesResolved': dbus.Boolean(True)}, []])\n"
    "self.connects = getattr(self, 'connects', 0) + 1\n"
)
_DISCONNECT = (
    "self.props['org.bluez.Device1']['Connected'] = dbus.Boolean(False)\n"
    "self.props['org.bluez.Device1']['ServicesResolved'] = dbus.Boolean(False)\n"
    "self.EmitSignal('org.freedesktop.DBus.Properties', 'PropertiesChanged', 'sa{sv}as',"
    " ['org.bluez.Device1', {'Connected': dbus.Boolean(False),"
    " 'ServicesResolved': dbus.Boolean(False)}, []])\n"
)
_READ = "ret = self.props['org.bluez.GattCharacteristic1']['Value']\n"


def _read(error: str | None) -> str:
    if error is None:
        return _READ
    return (
        "raise dbus.exceptions.DBusException("
        f"'Read not permitted', name='org.bluez.Error.{error}')\n"
    )


_WRITE = (
    "self.props['org.bluez.GattCharacteristic1']['Value'] = dbus.Array(args[0], signature='y')\n"
    "self.writes = getattr(self, 'writes', []) + [bytes(args[0])]\n"
)
_START_NOTIFY = (
    "self.props['org.bluez.GattCharacteristic1']['Notifying'] = dbus.Boolean(True)\n"
    "self.EmitSignal('org.freedesktop.DBus.Properties', 'PropertiesChanged', 'sa{sv}as',"
    " ['org.bluez.GattCharacteristic1', {'Notifying': dbus.Boolean(True)}, []])\n"
)
_STOP_NOTIFY = _START_NOTIFY.replace("True", "False")


def device_path(address: str, adapter: str = "hci0") -> str:
    return f"/org/bluez/{adapter}/dev_{address.replace(':', '_')}"


class BluezBus:
    """A private bus with (optionally) the BlueZ mock on it. `stop()` stops both, by PID."""

    def __init__(
        self,
        tmp: Path,
        *,
        extra_policy: str = "",
        bluez: bool = True,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        require_binary("dbus-daemon")
        try:
            import dbus  # noqa: F401
            import dbusmock  # noqa: F401
        except ImportError:
            from tests.support.peers import missing

            missing("python-dbusmock / dbus-python")
        self.tmp = tmp
        self.sock = tmp / "bus.sock"
        self.address = f"unix:path={self.sock}"
        conf = tmp / "bus.conf"
        conf.write_text(_CONFIG.format(sock=self.sock, extra=extra_policy))
        self.daemon = Peer(
            ["dbus-daemon", "--nofork", f"--config-file={conf}"], log=tmp / "dbus-daemon.log"
        )
        self.mock: Peer | None = None
        self.parameters = dict(parameters or {})
        self._conn: Any = None
        try:
            wait_until(self._accepting, "dbus-daemon accepting connections")
            if bluez:
                self.start_bluez()
        except BaseException:
            self.stop()
            raise

    # -- processes ------------------------------------------------------------------------
    def _accepting(self) -> bool:
        # The socket file appears at bind(), a moment before listen(): connect to be sure.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.sock))
            except OSError:
                return False
        return True

    def _bus(self) -> Any:
        import dbus

        if self._conn is None:
            self._conn = dbus.bus.BusConnection(self.address)
        return self._conn

    def start_bluez(self) -> None:
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.address)
        argv = [sys.executable, "-m", "dbusmock", "--system", "--template", "bluez5"]
        argv += ["--parameters", json.dumps(self.parameters)]
        self.mock = Peer(argv, env=env, log=self.tmp / "dbusmock.log")
        wait_until(lambda: bool(self._bus().name_has_owner("org.bluez")), "BlueZ mock on D-Bus")

    def stop_bluez(self) -> None:
        if self.mock is not None:
            self.mock.stop()
            self.mock = None

    def stop(self) -> None:
        self.stop_bluez()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.daemon.stop()

    # -- BlueZ objects --------------------------------------------------------------------
    def _obj(self, path: str, interface: str = MOCK) -> Any:
        import dbus

        return dbus.Interface(self._bus().get_object("org.bluez", path), interface)

    def add_adapter(self, name: str = "hci0") -> None:
        self._obj("/", BLUEZ_MOCK).AddAdapter(name, "gateway-test")

    def power(self, on: bool, name: str = "hci0") -> None:
        import dbus

        self._obj(f"/org/bluez/{name}").UpdateProperties(
            "org.bluez.Adapter1", {"Powered": dbus.Boolean(on)}
        )

    def remove_adapter(self, name: str = "hci0") -> None:
        self._obj("/", BLUEZ_MOCK).RemoveAdapterWithDevices(name)

    def add_device(
        self,
        address: str,
        *,
        name: str | None = None,
        rssi: int = -60,
        manufacturer_data: Mapping[int, bytes] | None = None,
        service_data: Mapping[str, bytes] | None = None,
        adapter: str = "hci0",
    ) -> str:
        """A remote device as BlueZ shows it after hearing it advertise."""
        import dbus

        path = device_path(address, adapter)
        props: dict[str, Any] = {
            "Address": dbus.String(address),
            "AddressType": dbus.String("public"),
            "Alias": dbus.String(name or address.replace(":", "-")),
            "Adapter": dbus.ObjectPath(f"/org/bluez/{adapter}"),
            "Paired": dbus.Boolean(False),
            "Bonded": dbus.Boolean(False),
            "Trusted": dbus.Boolean(False),
            "Blocked": dbus.Boolean(False),
            "Connected": dbus.Boolean(False),
            "ServicesResolved": dbus.Boolean(False),
            "LegacyPairing": dbus.Boolean(False),
            "RSSI": dbus.Int16(rssi),
            "UUIDs": dbus.Array([], signature="s"),
            "ManufacturerData": _mdata(manufacturer_data or {}),
            "ServiceData": _sdata(service_data or {}),
        }
        if name is not None:
            props["Name"] = dbus.String(name)
        root = self._obj("/")
        root.AddObject(
            path,
            DEVICE,
            props,
            [
                ("Connect", "", "", _CONNECT),
                ("Disconnect", "", "", _DISCONNECT),
                ("Pair", "", "", ""),
            ],
        )
        _interfaces_added(root, path, DEVICE, props)
        return path

    def advertise(
        self,
        address: str,
        *,
        rssi: int,
        manufacturer_data: Mapping[int, bytes] | None = None,
        service_data: Mapping[str, bytes] | None = None,
        adapter: str = "hci0",
    ) -> None:
        """The device advertises again: new data and/or RSSI (bleak reports changes only)."""
        import dbus

        props: dict[str, Any] = {"RSSI": dbus.Int16(rssi)}
        if manufacturer_data is not None:
            props["ManufacturerData"] = _mdata(manufacturer_data)
        if service_data is not None:
            props["ServiceData"] = _sdata(service_data)
        self._obj(device_path(address, adapter)).UpdateProperties(DEVICE, props)

    def add_characteristic(
        self,
        address: str,
        uuid: str,
        value: bytes,
        *,
        flags: Iterable[str] = ("read", "write", "notify"),
        service_uuid: str = "0000181a-0000-1000-8000-00805f9b34fb",
        handle: int = 0x000B,
        adapter: str = "hci0",
        read_error: str | None = None,
    ) -> str:
        """A GATT characteristic (under one service per device; bleak reads the handle from
        the last 4 hex digits of the path). `read_error`: ReadValue fails with this BlueZ
        error (e.g. "NotPermitted", as BlueZ reports an ATT error from the device)."""
        import dbus

        dev = device_path(address, adapter)
        svc = f"{dev}/service000a"
        root = self._obj("/")
        if not getattr(self, "_services", None):
            self._services: set[str] = set()
        if svc not in self._services:
            sprops = {
                "UUID": dbus.String(service_uuid),
                "Device": dbus.ObjectPath(dev),
                "Primary": dbus.Boolean(True),
                "Includes": dbus.Array([], signature="o"),
                "Handle": dbus.UInt16(0x000A),
            }
            root.AddObject(svc, SERVICE, sprops, [])
            _interfaces_added(root, svc, SERVICE, sprops)
            self._services.add(svc)
        path = f"{svc}/char{handle:04x}"
        cprops = {
            "UUID": dbus.String(uuid),
            "Service": dbus.ObjectPath(svc),
            "Value": dbus.Array(value, signature="y"),
            "Notifying": dbus.Boolean(False),
            "Flags": dbus.Array(list(flags), signature="s"),
            "Handle": dbus.UInt16(handle),
            "MTU": dbus.UInt16(23),
        }
        root.AddObject(
            path,
            CHAR,
            cprops,
            [
                ("ReadValue", "a{sv}", "ay", _read(read_error)),
                ("WriteValue", "aya{sv}", "", _WRITE),
                ("StartNotify", "", "", _START_NOTIFY),
                ("StopNotify", "", "", _STOP_NOTIFY),
            ],
        )
        _interfaces_added(root, path, CHAR, cprops)
        return path

    def set_blocked(self, address: str, blocked: bool, adapter: str = "hci0") -> None:
        import dbus

        self._obj(device_path(address, adapter)).UpdateProperties(
            DEVICE, {"Blocked": dbus.Boolean(blocked)}
        )

    def disconnect(self, address: str, adapter: str = "hci0") -> None:
        """The device drops the link (out of range, rebooted)."""
        import dbus

        dev = dbus.Interface(
            self._bus().get_object("org.bluez", device_path(address, adapter)), DEVICE
        )
        dev.Disconnect()

    def notify(self, char_path: str, value: bytes) -> None:
        import dbus

        self._obj(char_path).UpdateProperties(CHAR, {"Value": dbus.Array(value, signature="y")})

    def char_value(self, char_path: str) -> bytes:
        import dbus

        props = dbus.Interface(
            self._bus().get_object("org.bluez", char_path), "org.freedesktop.DBus.Properties"
        )
        return bytes(props.Get(CHAR, "Value"))


def _interfaces_added(root: Any, path: str, interface: str, props: dict[str, Any]) -> None:
    import dbus

    body = dbus.Dictionary({interface: dbus.Dictionary(props, signature="sv")}, signature="sa{sv}")
    root.EmitSignal(
        OM,
        "InterfacesAdded",
        "oa{sa{sv}}",
        dbus.Array([dbus.ObjectPath(path), body], signature="v"),
    )


def _mdata(data: Mapping[int, bytes]) -> Any:
    import dbus

    return dbus.Dictionary(
        {dbus.UInt16(k): dbus.Array(v, signature="y") for k, v in data.items()}, signature="qv"
    )


def _sdata(data: Mapping[str, bytes]) -> Any:
    import dbus

    return dbus.Dictionary(
        {dbus.String(k): dbus.Array(v, signature="y") for k, v in data.items()}, signature="sv"
    )
