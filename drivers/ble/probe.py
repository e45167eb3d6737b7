"""`gatewayctl probe ble`: look at BLE devices on site, without the gateway's config.

    gatewayctl probe ble scan --seconds 10          nearby devices, RSSI, decoded values
    gatewayctl probe ble scan --count 1 --json      stop at the first decodable device
    gatewayctl probe ble read C0:FF:EE:00:00:01 2a6e

Uses the driver's own scanner settings and decoders (BTHome v2, RuuviTag 5), so what shows
here is what the daemon would decode. Exit status: 0 ok, 1 the connected device refused the
read, 2 bad arguments or a characteristic the device does not have, 4 when Bluetooth is
unavailable (the message names the cause and the fix) or the device cannot be reached.
bleak is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from typing import Any, cast

from drivers.ble import bleak_compat
from drivers.ble.config import normalize_uuid
from drivers.ble.dispatch import Advert, decode_known
from gateway.errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ble", help="scan for BLE devices or read a GATT characteristic")
    bsub = p.add_subparsers(dest="ble_verb", metavar="VERB")
    bsub.required = True

    scan = bsub.add_parser("scan", help="list nearby devices with RSSI and decoded values")
    scan.add_argument("--seconds", "-n", type=float, default=5.0, help="scan time (default 5)")
    scan.add_argument(
        "--count", type=int, help="stop early once this many devices of a known format are seen"
    )
    scan.add_argument("--passive", action="store_true", help="passive scan (BlueZ monitor API)")
    scan.add_argument("--adapter", help="BlueZ adapter, e.g. hci1 (default: the first powered)")
    scan.set_defaults(func=run_scan)

    read = bsub.add_parser("read", help="connect and read one GATT characteristic")
    read.add_argument("address", help="device MAC address, e.g. C0:FF:EE:00:00:01")
    read.add_argument("char", help="characteristic UUID: 2a6e, 0x2A6E or the full 128-bit form")
    read.add_argument("--timeout", type=float, default=10.0, help="connect timeout (default 10)")
    read.add_argument("--adapter", help="BlueZ adapter, e.g. hci1 (default: hci0)")
    read.set_defaults(func=run_read)


def _fail(message: str, status: int) -> int:
    print(f"gatewayctl: {message}", file=sys.stderr)
    return status


async def _close_bleak() -> None:
    # bleak keeps one D-Bus connection per loop; close it so the loop ends cleanly.
    with contextlib.suppress(Exception):
        await bleak_compat.close_manager()


# -- scan ------------------------------------------------------------------------------------
async def _scan(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from bleak import BleakScanner

    from drivers.ble.scanner import or_patterns

    seen: dict[str, dict[str, Any]] = {}
    enough = asyncio.Event()

    def callback(device: Any, ad: Any) -> None:
        adv = Advert(
            address=device.address.upper(), rssi=ad.rssi, name=ad.local_name,
            manufacturer_data=ad.manufacturer_data, service_data=ad.service_data,
        )  # fmt: skip
        decoded = decode_known(adv)
        seen[adv.address] = {
            "address": adv.address,
            "name": adv.name,
            "rssi": adv.rssi,
            "format": decoded.format if decoded else None,
            "values": dict(decoded.values) if decoded else {},
            "manufacturer_data": {f"0x{k:04X}": v.hex() for k, v in ad.manufacturer_data.items()},
            "service_data": {k: v.hex() for k, v in ad.service_data.items()},
        }
        known = sum(1 for s in seen.values() if s["format"])
        if args.count is not None and known >= args.count:
            enough.set()

    bluez: dict[str, Any] = {"adapter": args.adapter} if args.adapter else {}
    if args.passive:
        bluez["or_patterns"] = or_patterns(())
    mode: Any = "passive" if args.passive else "active"
    scanner = BleakScanner(callback, scanning_mode=mode, bluez=cast(Any, bluez))
    await scanner.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough.wait(), args.seconds)
    finally:
        with contextlib.suppress(Exception):
            await scanner.stop()
    return seen


def run_scan(args: argparse.Namespace) -> int:
    from drivers.ble.scanner import explain

    if args.seconds <= 0:
        return _fail("--seconds must be > 0", EXIT_USAGE)
    bleak_compat.check()

    async def main() -> dict[str, dict[str, Any]]:
        try:
            return await _scan(args)
        finally:
            await _close_bleak()

    try:
        seen = asyncio.run(main())
    except Exception as exc:
        return _fail(f"BLE unavailable: {explain(exc, args.adapter)}", EXIT_UNAVAILABLE)
    rows = sorted(seen.values(), key=lambda s: -(s["rssi"] if s["rssi"] is not None else -999))
    if getattr(args, "json", False):
        json.dump(rows, sys.stdout, indent=2, default=_json_default, sort_keys=True)
        sys.stdout.write("\n")
        return EXIT_OK
    if not rows:
        print("no BLE devices heard")
        return EXIT_OK
    lines = [("ADDRESS", "RSSI", "NAME", "FORMAT", "VALUES")]
    for s in rows:
        values = " ".join(f"{k}={_fmt(v)}" for k, v in s["values"].items())
        if not s["format"]:
            mfr = [f"mfr {k}:{v}" for k, v in s["manufacturer_data"].items()]
            svc = [f"svc {_short(k)}:{v}" for k, v in s["service_data"].items()]
            values = " ".join(mfr + svc)
        lines.append(
            (s["address"], str(s["rssi"]), s["name"] or "-", s["format"] or "-", values or "-")
        )
    widths = [max(len(r[i]) for r in lines) for i in range(4)]
    for r in lines:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return EXIT_OK


def _short(uuid: str) -> str:
    return uuid[4:8] if uuid.endswith("-0000-1000-8000-00805f9b34fb") else uuid


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def _json_default(obj: object) -> Any:
    return obj.hex() if isinstance(obj, bytes) else str(obj)


# -- read ------------------------------------------------------------------------------------
def interpretations(data: bytes) -> dict[str, Any]:
    """A few plausible readings of raw characteristic bytes, to help write a point's config."""
    out: dict[str, Any] = {}
    kinds = (("uint8", 1, False), ("int8", 1, True), ("uint16", 2, False), ("int16", 2, True),
             ("uint32", 4, False), ("int32", 4, True))  # fmt: skip
    for name, size, signed in kinds:
        if len(data) >= size:
            out[f"{name} (little)"] = int.from_bytes(data[:size], "little", signed=signed)
    if data and all(32 <= b < 127 for b in data):
        out["utf8"] = data.decode()
    return out


def run_read(args: argparse.Namespace) -> int:
    from drivers.ble.scanner import explain

    if not _MAC.match(args.address):
        return _fail(f"not a MAC address: {args.address!r}", EXIT_USAGE)
    char = normalize_uuid(args.char)
    if char is None:
        return _fail(f"not a characteristic UUID: {args.char!r}", EXIT_USAGE)
    address = args.address.upper()
    bleak_compat.check()
    connected = []  # non-empty: the read failed while the device was still connected

    async def main() -> bytes:
        from bleak import BleakClient
        from bleak.backends.device import BLEDevice

        adapter = args.adapter or "hci0"
        path = f"/org/bluez/{adapter}/dev_{address.replace(':', '_')}"
        device = BLEDevice(address, None, {"path": path, "props": {}})
        bluez: dict[str, Any] = {"adapter": args.adapter} if args.adapter else {}
        try:
            client = BleakClient(device, timeout=args.timeout, bluez=cast(Any, bluez))
            async with client:
                try:
                    async with asyncio.timeout(args.timeout):
                        return bytes(await client.read_gatt_char(char))
                except Exception:
                    if client.is_connected:
                        connected.append(True)
                    raise
        finally:
            await _close_bleak()

    started = time.monotonic()
    try:
        data = asyncio.run(main())
    except Exception as exc:
        from bleak.exc import BleakCharacteristicNotFoundError

        why = f"cannot read {char} from {address}: {explain(exc, args.adapter)}"
        if isinstance(exc, BleakCharacteristicNotFoundError):
            return _fail(f"{address} has no characteristic {char}", EXIT_USAGE)
        if connected and not isinstance(exc, TimeoutError):
            return _fail(why, EXIT_FAILURE)  # connected, and the device said no
        return _fail(why, EXIT_UNAVAILABLE)
    result: dict[str, Any] = {
        "address": address,
        "char": char,
        "hex": data.hex(),
        "length": len(data),
        "as": interpretations(data),
        "seconds": round(time.monotonic() - started, 3),
    }
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(f"{address} {char}: {data.hex() or '(empty)'} ({len(data)} bytes)")
        for k, v in interpretations(data).items():
            print(f"  {k:>14}: {v}")
    return EXIT_OK
