"""BLE configuration: `[drivers.ble]` options and `driver = "ble"` devices, checked and compiled.

Pure (no bleak, no I/O except reading a `bindkey_file` when asked to): every problem is
reported with its TOML path, all at once. The result is a plan the driver runs as is.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from drivers.base import device_options, point_options
from drivers.ble import bthome, ruuvi
from drivers.ble.custom import ENDIANS, TYPES, CustomFormat, FieldSpec
from gateway import secretfiles
from gateway.config import DeviceSpec, Issues, Section, join_path, secret_hex
from gateway.errors import ConfigError, ConfigIssue
from gateway.retry import BreakerSettings, RetrySettings, read_breaker, read_retry

FORMATS: Final = ("bthome", "ruuvi", "custom", "gatt")
SCAN_MODES: Final = ("active", "passive")
#: GATT value types: the custom decoder's numbers plus text and raw bytes.
GATT_TYPES: Final = (*TYPES, "utf8", "bytes")

_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_ADAPTER = re.compile(r"^hci[0-9]{1,3}$")
_UUID128 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_BASE_UUID: Final = "-0000-1000-8000-00805f9b34fb"


def normalize_uuid(text: str) -> str | None:
    """'fcd2', '0xFCD2', '0000fcd2', or a full UUID -> the full lower-case form; None if bad."""
    t = text.strip().lower()
    if t.startswith("0x"):
        t = t[2:]
    if re.fullmatch(r"[0-9a-f]{4}", t):
        return f"0000{t}{_BASE_UUID}"
    if re.fullmatch(r"[0-9a-f]{8}", t):
        return f"{t}{_BASE_UUID}"
    return t if _UUID128.match(t) else None


#: The scanner and GATT links retry after 1 s, doubling up to 60 s; a GATT device's breaker
#: opens after 5 failures in a row and rests 60 s.
RETRY = RetrySettings(initial=1.0, cap=60.0)
BREAKER = BreakerSettings(threshold=5, cooldown=60.0)
RETRY_OLD_KEYS = {"initial": "retry_initial", "cap": "retry_max"}
BREAKER_OLD_KEYS = {"threshold": "breaker_failures", "cooldown": "breaker_reset"}


@dataclass(frozen=True, slots=True)
class BleOptions:
    """`[drivers.ble]`."""

    scan_mode: str = "active"
    adapter: str | None = None  # None = BlueZ's first powered adapter
    discovery: bool = True  # report unconfigured devices of known formats
    max_connections: int = 3  # simultaneous GATT connections per adapter
    retry: RetrySettings = RETRY  # backoff after a failure (scanner, GATT)
    breaker: BreakerSettings = BREAKER  # per GATT device
    #: What the config check found worth a look (deprecated keys), not errors.
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class GattPoint:
    name: str
    char: str  # full UUID, lower case
    type: str
    endian: str = "little"
    byte_offset: int = 0
    notify: bool = False
    writable: bool = False
    interval: float | None = None


@dataclass(frozen=True, slots=True)
class BleDevice:
    """One configured device, compiled."""

    id: str
    address: str  # upper case
    format: str
    interval: float = 10.0
    timeout: float = 5.0
    key: bytes | None = field(default=None, repr=False)
    min_interval: float = 0.0
    heartbeat: float = 0.0
    unseen_timeout: float = 300.0
    #: point name -> decoded field name (advertisement formats)
    fields: Mapping[str, str] = field(default_factory=dict)
    custom: CustomFormat | None = None
    gatt: tuple[GattPoint, ...] = ()

    @property
    def advertises(self) -> bool:
        return self.format != "gatt"


def parse_options(options: Mapping[str, Any], path: str) -> BleOptions:
    issues = Issues()
    sec = Section(options, path, issues)
    adapter = sec.str("adapter", None)
    if adapter is not None and not _ADAPTER.match(adapter):
        sec.error("adapter", f"must name a BlueZ adapter such as 'hci0', got {adapter!r}")
    retry = read_retry(sec, RETRY, old=RETRY_OLD_KEYS)
    breaker = read_breaker(sec, BREAKER, old=BREAKER_OLD_KEYS)
    opts = BleOptions(
        scan_mode=sec.str("scan_mode", "active", choices=SCAN_MODES),
        adapter=adapter,
        discovery=sec.bool("discovery", True),
        max_connections=sec.int("max_connections", 3, min=1, max=16),
        retry=retry,
        breaker=breaker,
        warnings=tuple(issues.warnings),
    )
    sec.done()
    issues.raise_if_any()
    return opts


def _hex(sec: Section, key: str, length: int | None) -> bytes | None:
    text = sec.str(key, None)
    if text is None:
        return None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        sec.error(key, f"must be hexadecimal, got {text!r}")
        return None
    if length is not None and len(raw) != length:
        sec.error(key, f"must be {length} bytes ({2 * length} hex digits), got {len(raw)}")
        return None
    return raw


def _load_key(sec: Section, spec: DeviceSpec, load_secrets: bool) -> bytes | None:
    key: bytes | None = None
    text = sec.str("bindkey", None, secret=True)
    if isinstance(text, str):
        key, problem = secret_hex(text, 16)
        if key is None:
            sec.error("bindkey", problem)
    key_file = secretfiles.check(sec, "bindkey_file")
    if key_file is None:
        return key
    if sec.has("bindkey"):
        sec.error("bindkey_file", "give either bindkey or bindkey_file, not both")
        return key
    if not load_secrets:
        return None
    try:
        data = secretfiles.read(key_file, sec.at("bindkey_file"))
    except ConfigError as exc:
        sec.issues.extend(exc.issues)
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = "?"
    raw, problem = secret_hex(text, 16)
    if raw is None:
        detail = problem.partition("; ")[2]
        sec.error("bindkey_file", f"{key_file!r} must hold 32 hex digits (a 16-byte key); {detail}")
    return raw


def compile_device(spec: DeviceSpec, *, load_secrets: bool = False) -> BleDevice:
    """Check a device's BLE options and points; raise ConfigError with every issue."""
    sec, issues = device_options(spec)
    address = sec.str("address")
    if isinstance(address, str) and address and not _MAC.match(address):
        sec.error("address", f"must be a MAC address like '54:48:E6:8F:80:A5', got {address!r}")
    fmt = sec.str("format", choices=FORMATS)
    advert = fmt in ("bthome", "ruuvi", "custom")
    key: bytes | None = None
    min_interval = heartbeat = 0.0
    unseen = 300.0
    if advert:
        min_interval = sec.float("min_interval", 0.0, min=0)
        heartbeat = sec.float("heartbeat", 0.0, min=0)
        unseen = sec.float("unseen_timeout", 300.0, gt=0)
    if fmt == "bthome":
        key = _load_key(sec, spec, load_secrets)
    custom: CustomFormat | None = None
    fields: dict[str, str] = {}
    gatt: list[GattPoint] = []
    match_mid: int | None = None
    match_uuid: str | None = None
    prefix = b""
    if fmt == "custom":
        match_mid = sec.int("manufacturer_id", None, min=0, max=0xFFFF)
        raw_uuid = sec.str("service_uuid", None)
        if raw_uuid is not None:
            match_uuid = normalize_uuid(raw_uuid)
            if match_uuid is None:
                sec.error("service_uuid", f"must be a 16-bit or 128-bit UUID, got {raw_uuid!r}")
        if (match_mid is None) == (raw_uuid is None):
            sec.error("", "a custom format needs exactly one of manufacturer_id or service_uuid")
        prefix = _hex(sec, "match_prefix", None) or b""
    sec.done()

    custom_fields: list[FieldSpec] = []
    for point in spec.points:
        psec = point_options(spec, point, issues)
        if fmt != "gatt" and point.writable:
            psec.error("writable", "advertisement points cannot be written (use format 'gatt')")
        if fmt in ("bthome", "ruuvi"):
            name = psec.str("field", point.name)
            known = bthome.is_known_name(name) if fmt == "bthome" else name in ruuvi.NAMES
            if not known:
                choices = sorted(bthome.NAMES if fmt == "bthome" else ruuvi.NAMES)
                close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                what = "field" if psec.has("field") else ""
                psec.error(what, f"{name!r} is not a {fmt} field{hint}")
            fields[point.name] = name
        elif fmt == "custom":
            offset = psec.int("byte_offset", min=0, max=253)
            typ = psec.str("type", choices=tuple(TYPES))
            endian = psec.str("endian", "little", choices=ENDIANS)
            if typ in TYPES and isinstance(offset, int):
                custom_fields.append(FieldSpec(point.name, offset, typ, endian))
            fields[point.name] = point.name
        elif fmt == "gatt":
            raw_char = psec.str("char")
            char = normalize_uuid(raw_char) if isinstance(raw_char, str) else None
            if raw_char and char is None:
                psec.error("char", f"must be a 16-bit or 128-bit UUID, got {raw_char!r}")
            gatt.append(
                GattPoint(
                    name=point.name,
                    char=char or "",
                    type=psec.str("type", "bytes", choices=GATT_TYPES),
                    endian=psec.str("endian", "little", choices=ENDIANS),
                    byte_offset=psec.int("byte_offset", 0, min=0, max=511),
                    notify=psec.bool("notify", False),
                    writable=point.writable,
                    interval=point.interval,
                )
            )
        psec.done()
    if fmt == "custom":
        custom = CustomFormat(
            fields=tuple(custom_fields), manufacturer_id=match_mid, service_uuid=match_uuid,
            prefix=prefix,
        )  # fmt: skip
    if not spec.points:
        issues.add(join_path(spec.path, "points"), "a BLE device needs at least one point")
    issues.raise_if_any()
    return BleDevice(
        id=spec.id, address=address.upper(), format=fmt, interval=spec.interval,
        timeout=spec.timeout, key=key, min_interval=min_interval, heartbeat=heartbeat,
        unseen_timeout=unseen, fields=fields, custom=custom, gatt=tuple(gatt),
    )  # fmt: skip
