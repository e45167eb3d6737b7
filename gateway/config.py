"""Configuration: TOML in, frozen dataclasses out, every error collected with its TOML path.

The core sections are read here; every other part reads its own table with the toolkit in
`gateway.spec` (re-exported here), and the parts that exist are named in `gateway.parts`.
Nothing is dropped or adjusted silently.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway import parts
from gateway.errors import ConfigError, ConfigIssue
from gateway.parts import DRIVERS, SECTION_PARSERS
from gateway.spec import GENERIC_DEVICE_KEYS as GENERIC_DEVICE_KEYS
from gateway.spec import GENERIC_POINT_KEYS as GENERIC_POINT_KEYS
from gateway.spec import REQUIRED as REQUIRED
from gateway.spec import SECRET_KEYS as SECRET_KEYS
from gateway.spec import DeviceSpec as DeviceSpec
from gateway.spec import Issues as Issues
from gateway.spec import PointSpec as PointSpec
from gateway.spec import Section as Section
from gateway.spec import did_you_mean
from gateway.spec import has_userinfo as has_userinfo
from gateway.spec import join_path as join_path
from gateway.spec import redact_url as redact_url
from gateway.spec import secret_hex as secret_hex
from gateway.spec import validate_name as validate_name

DEFAULT_CONFIG_PATH: Final = "/etc/gateway/config.toml"

T = TypeVar("T")

#: Serial line speeds devices use (termios' standard rates from 1200 up).
STANDARD_BAUDRATES: Final = frozenset({
    1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400, 460800, 500000,
    576000, 921600, 1000000, 1152000, 1500000, 2000000, 2500000, 3000000, 3500000, 4000000,
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class GatewaySection:
    id: str = "gateway"
    state_dir: str = "/var/lib/gateway"
    runtime_dir: str = "/run/gateway"
    log_level: str = "info"
    stop_timeout: float = 10.0
    watchdog: bool = True
    #: The GIL switch interval (ms): how long a thread holding the GIL runs before another
    #: one (the event loop) may take it; Python's own default is 5 ms (gateway.daemon).
    switch_interval_ms: float = 0.5


@dataclass(frozen=True, slots=True)
class StoreConfig:
    file: str = "gateway.db"
    synchronous: str = "full"  # full | normal
    retention_days: float = 30.0
    quota_mb: float = 256.0
    overflow: str = "reject_new"  # reject_new | drop_oldest
    batch_max: int = 1000  # group commit: at most this many appends per transaction
    linger_ms: float = 0.0  # group commit: wait this long for more appends (0 = none)
    #: Readings nobody waits for (polled, pushed) are committed at most this often (s); an
    #: append somebody waits for commits at once and takes them along. 0: every append.
    commit_interval: float = 3.0
    #: SQLite page size of a new database (an existing one keeps its own): every commit
    #: writes each page it touched to the WAL, so small pages mean fewer bytes per commit.
    page_size: int = 1024
    snapshot_every: int = 1000  # events per stream between snapshots
    check_interval: float = 10.0  # seconds between quota/retention checks


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: str = "gatewayd.sock"
    group: str | None = None
    # The control service (services/control): commands to devices.
    deadline: float = 30.0  # seconds a command may wait before it is expired, never sent
    queue: int = 16  # commands waiting per device; one more is rejected (queue_full)
    retries: int = 3  # re-sends after a refused connection (never after a time-out)
    allow_remote: tuple[str, ...] = ()  # "device/point" or "device/*": cloud writes allowed
    remote_sagas: tuple[str, ...] = ()  # sagas the cloud may start


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    gateway: GatewaySection
    store: StoreConfig
    control: ControlConfig
    devices: Mapping[str, DeviceSpec]
    #: `[drivers.<kind>]` tables: driver-wide options (adapter, scan mode...), as given.
    drivers: Mapping[str, Mapping[str, Any]]
    #: Sections owned by other parts (`coap`, `sync`, ...; see `gateway.parts`), as their
    #: parsers returned them: read one with `section()`, which checks its type.
    sections: Mapping[str, object]
    source: str = ""
    #: Things that load but deserve a look (a password sent in clear...); logged at load.
    warnings: tuple[ConfigIssue, ...] = ()

    def section(self, name: str, kind: type[T]) -> T | None:
        """The parsed `[name]` section (None when absent), as the `kind` its part parses it to."""
        value = self.sections.get(name)
        if value is None:
            return None
        if not isinstance(value, kind):
            raise TypeError(f"section {name!r} is a {type(value).__name__}, not {kind.__name__}")
        return value

    @property
    def state_dir(self) -> Path:
        return Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or self.gateway.state_dir)

    @property
    def runtime_dir(self) -> Path:
        env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return Path(env or self.gateway.runtime_dir)

    @property
    def db_path(self) -> Path:
        p = Path(self.store.file)
        return p if p.is_absolute() else self.state_dir / p

    @property
    def socket_path(self) -> Path:
        p = Path(self.control.socket)
        return p if p.is_absolute() else self.runtime_dir / p


def _parse_point(name: str, sec: Section) -> PointSpec:
    validate_name(sec, "", name, "point")
    unit = sec.str("unit", None)
    scale = sec.float("scale", 1.0)
    offset = sec.float("offset", 0.0)
    lo = sec.float("min", None)
    hi = sec.float("max", None)
    if lo is not None and hi is not None and lo > hi:
        sec.error("max", f"must be >= min ({lo:g}), got {hi:g}")
    if scale == 0:
        sec.error("scale", "must not be 0")
    writable = sec.bool("writable", False)
    interval = sec.float("interval", None, gt=0)
    deadband = sec.float("deadband", None, min=0)
    remote_write = sec.bool("remote_write", False)
    sec.mark(*GENERIC_POINT_KEYS)
    return PointSpec(
        name=name, unit=unit, scale=scale, offset=offset, min=lo, max=hi, writable=writable,
        interval=interval, deadband=deadband, remote_write=remote_write, options=sec.unread(),
    )  # fmt: skip


def _parse_device(dev_id: str, sec: Section, issues: Issues) -> DeviceSpec | None:
    validate_name(sec, "", dev_id, "device")
    driver = sec.str("driver", REQUIRED, choices=sorted(DRIVERS))
    interval = sec.float("interval", 10.0, gt=0)
    jitter = sec.float("jitter", 0.1, min=0, max=1)
    timeout = sec.float("timeout", 5.0, gt=0)
    enabled = sec.bool("enabled", True)
    description = sec.str("description", "", nonempty=False)
    offline_after = sec.int("offline_after", 3, min=1, max=1000)
    points = tuple(_parse_point(name, p) for name, p in sec.tables("points").items())
    sec.mark(*GENERIC_DEVICE_KEYS, "points")
    spec = DeviceSpec(
        id=dev_id, driver=driver, interval=interval, jitter=jitter, timeout=timeout,
        enabled=enabled, description=description, offline_after=offline_after, points=points,
        options=sec.unread(),
    )  # fmt: skip
    _odd_baudrate(sec, spec.options.get("baudrate"))
    if driver not in DRIVERS:
        return None
    try:
        issues.warnings.extend(parts.load(DRIVERS[driver]).validate_device(spec) or ())
    except ConfigError as exc:
        issues.extend(exc.issues)
    return spec


def _odd_baudrate(sec: Section, value: Any) -> None:
    """A serial line's speed (serial and Modbus RTU devices; the driver checks its range).
    Linux takes any rate, so an odd one is not an error, but a typo (96000 for 9600) fails
    silently on the wire: a warning names the standard rates nearest to it."""
    if not isinstance(value, int) or isinstance(value, bool) or value in STANDARD_BAUDRATES:
        return
    if value <= 0:
        return  # the driver reports it
    if value % 10 == 0 and value // 10 in STANDARD_BAUDRATES:  # a zero too many
        hint = f"did you mean {value // 10}?"
    elif value * 10 in STANDARD_BAUDRATES:  # a zero too few
        hint = f"did you mean {value * 10}?"
    else:
        near = sorted(sorted(STANDARD_BAUDRATES, key=lambda b: abs(math.log(b / value)))[:2])
        hint = f"the nearest are {near[0]} and {near[1]}"
    sec.warn("baudrate", f"{value} is not a standard rate ({hint}); fine if the device uses it")


def _page_size(s: Section) -> int:
    size: int = s.int("page_size", 1024, min=512, max=65536)
    if size & (size - 1):
        s.error("page_size", f"must be a power of two (512 ... 65536), got {size}")
        return 1024
    return size


def parse(data: Mapping[str, Any], source: str = "") -> GatewayConfig:
    """Validate a parsed TOML document; raises ConfigError with every issue found."""
    issues = Issues()
    root = Section(data, "", issues)

    g = root.table("gateway")
    gw_id = g.str("id", "gateway")
    validate_name(g, "id", gw_id, "gateway")
    gateway = GatewaySection(
        id=gw_id,
        state_dir=g.str("state_dir", "/var/lib/gateway"),
        runtime_dir=g.str("runtime_dir", "/run/gateway"),
        log_level=g.str("log_level", "info", choices=["debug", "info", "warning", "error"]),
        stop_timeout=g.float("stop_timeout", 10.0, gt=0, max=300),
        watchdog=g.bool("watchdog", True),
        switch_interval_ms=g.float("switch_interval_ms", 0.5, gt=0, max=100),
    )
    g.done()

    s = root.table("store")
    store = StoreConfig(
        file=s.str("file", "gateway.db"),
        synchronous=s.str("synchronous", "full", choices=["full", "normal"]),
        retention_days=s.float("retention_days", 30.0, gt=0),
        quota_mb=s.float("quota_mb", 256.0, gt=0),
        overflow=s.str("overflow", "reject_new", choices=["reject_new", "drop_oldest"]),
        batch_max=s.int("batch_max", 1000, min=1, max=100_000),
        linger_ms=s.float("linger_ms", 0.0, min=0, max=1000),
        commit_interval=s.float("commit_interval", 3.0, min=0, max=60),
        page_size=_page_size(s),
        snapshot_every=s.int("snapshot_every", 1000, min=1),
        check_interval=s.float("check_interval", 10.0, gt=0),
    )
    s.done()

    c = root.table("control")
    allow_remote = c.list("allow_remote", [], of=str)
    for i, pat in enumerate(allow_remote):
        if isinstance(pat, str) and pat.count("/") != 1:
            issues.add(f"control.allow_remote[{i}]", f"must be 'device/point' or 'device/*', "
                       f"got {pat!r}")  # fmt: skip
    control = ControlConfig(
        socket=c.str("socket", "gatewayd.sock"), group=c.str("group", None),
        deadline=c.float("deadline", 30.0, gt=0, max=86400), queue=c.int("queue", 16, min=1,
        max=10_000), retries=c.int("retries", 3, min=0, max=100),
        allow_remote=tuple(str(a) for a in allow_remote),
        remote_sagas=tuple(str(a) for a in c.list("remote_sagas", [], of=str)),
    )  # fmt: skip
    c.done()

    devices: dict[str, DeviceSpec] = {}
    for dev_id, dsec in root.tables("devices").items():
        # The generic keys are read here; the rest belongs to the driver, which reports
        # its own unknown keys (an unknown driver's keys are not judged at all).
        spec = _parse_device(dev_id, dsec, issues)
        if spec is not None:
            devices[dev_id] = spec

    drivers: dict[str, Mapping[str, Any]] = {}
    for kind, dsec in root.tables("drivers").items():
        if kind not in DRIVERS:
            hint = did_you_mean(kind, sorted(DRIVERS))
            issues.add(dsec.path, f"unknown driver {kind!r}{hint}")
            continue
        try:
            warned = parts.load(DRIVERS[kind]).validate_options(dsec.data, dsec.path)
            issues.warnings.extend(warned or ())
        except ConfigError as exc:
            issues.extend(exc.issues)
        drivers[kind] = dict(dsec.data)

    sections: dict[str, Any] = {}
    for name, ref in SECTION_PARSERS.items():
        if name in data:
            try:
                parser: Callable[[Section], Any] = parts.load(ref)
            except ImportError:
                issues.add(name, "this section is not supported by this build")
                root.mark(name)
                continue
            sec = root.table(name)
            sections[name] = parser(sec)

    root.done()
    issues.raise_if_any()
    return GatewayConfig(
        gateway=gateway, store=store, control=control, devices=devices, drivers=drivers,
        sections=sections, source=source, warnings=tuple(issues.warnings),
    )  # fmt: skip


def loads(text: str, source: str = "<string>") -> GatewayConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"{source}: not valid TOML: {exc}")]) from None
    return parse(data, source)


def load(path: str | os.PathLike[str]) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("", f"{p}: no such file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigIssue("", f"{p}: cannot read: {exc}")]) from None
    return loads(text, str(p))


def default_path() -> str:
    return os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH
