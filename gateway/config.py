"""Configuration: TOML in, frozen dataclasses out, every error collected with its TOML path.

`Section` is the toolkit every part uses to read its own table (the core sections here,
drivers their device options, `gateway.coap` and `gateway.sync` their sections): it records
the keys it reads, checks types and ranges, and reports every key nobody read as unknown,
with a "did you mean" where one is close. Nothing is dropped or adjusted silently.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.errors import ConfigError, ConfigIssue

DEFAULT_CONFIG_PATH: Final = "/etc/gateway/config.toml"

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()

# Section's readers are named after the types they read; these keep the builtins reachable.
_Str = str
_Bool = bool
_Float = float

_TOML_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true/false)",
    dict: "a table",
    list: "an array",
}


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


class Issues:
    """Collects config issues; `raise_if_any()` raises one ConfigError holding all of them."""

    def __init__(self) -> None:
        self.items: list[ConfigIssue] = []
        #: Not errors: the config loads, but something in it deserves a look (logged at load).
        self.warnings: list[ConfigIssue] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(ConfigIssue(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ConfigIssue(path, message))

    def extend(self, issues: Sequence[ConfigIssue]) -> None:
        self.items.extend(issues)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


def join_path(base: str, key: str) -> str:
    """TOML path of `key` inside `base`; keys that are not bare words are quoted."""
    bare = key and all(c.isalnum() or c in "-_" for c in key)
    part = key if bare else '"' + key.replace('"', '\\"') + '"'
    return f"{base}.{part}" if base else part


class Section:
    """One TOML table being read. Reads are typed; unread keys are reported by `done()`."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        issues: Issues,
        siblings: Sequence[str] = (),
    ) -> None:
        """`siblings`: keys valid in this table but read elsewhere (for "did you mean")."""
        self.data = data
        self.path = path
        self.issues = issues
        self._seen: set[str] = set()
        self._siblings = tuple(siblings)

    # -- helpers ---------------------------------------------------------------------------
    def at(self, key: str) -> str:
        return join_path(self.path, key) if key else self.path

    def error(self, key: str, message: str) -> None:
        self.issues.add(self.at(key) if key else self.path, message)

    def warn(self, key: str, message: str) -> None:
        self.issues.warn(self.at(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> list[str]:
        return list(self.data)

    def mark(self, *keys: str) -> None:
        """Mark keys as read by someone else (so `done()` does not report them)."""
        self._seen.update(keys)

    def unread(self) -> dict[str, Any]:
        return {k: v for k, v in self.data.items() if k not in self._seen}

    def _get(self, key: str, default: object, expected: str) -> tuple[bool, Any]:
        self._seen.add(key)
        if key not in self.data:
            if default is REQUIRED:
                self.error(key, f"missing required key ({expected})")
            return False, default
        return True, self.data[key]

    # -- typed readers ---------------------------------------------------------------------
    def str(
        self,
        key: _Str,
        default: Any = REQUIRED,
        *,
        choices: Sequence[str] | None = None,
        nonempty: _Bool = True,
        secret: _Bool = False,
    ) -> Any:
        """`secret`: a key, password...: messages say what is wrong, never the value."""
        found, value = self._get(key, default, "a string")
        if not found:
            return value
        if not isinstance(value, _Str):
            shown = "" if secret else f" {value!r}"
            self.error(key, f"must be a string, got {_type_name(value)}{shown}")
            return default if default is not REQUIRED else ""
        if nonempty and not value:
            self.error(key, "must not be empty")
        if choices is not None and value not in choices:
            hint = _did_you_mean(value, choices)
            self.error(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
        return value

    def int(
        self,
        key: _Str,
        default: Any = REQUIRED,
        *,
        min: int | None = None,
        max: int | None = None,
    ) -> Any:
        found, value = self._get(key, default, "an integer")
        if not found:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be an integer, got {_type_name(value)} {value!r}")
            return default if default is not REQUIRED else 0
        self._range(key, value, min, max)
        return value

    def float(
        self,
        key: _Str,
        default: Any = REQUIRED,
        *,
        min: _Float | None = None,
        max: _Float | None = None,
        gt: _Float | None = None,
    ) -> Any:
        found, value = self._get(key, default, "a number")
        if not found:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(key, f"must be a number, got {_type_name(value)} {value!r}")
            return default if default is not REQUIRED else 0.0
        value = float(value)
        if not math.isfinite(value):
            self.error(key, f"must be a finite number, got {value!r}")
            return value
        if gt is not None and not value > gt:
            self.error(key, f"must be > {gt:g}, got {value:g}")
        self._range(key, value, min, max)
        return value

    def bool(self, key: _Str, default: Any = REQUIRED) -> Any:
        found, value = self._get(key, default, "a boolean")
        if not found:
            return value
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {_type_name(value)} {value!r}")
            return default if default is not REQUIRED else False
        return value

    def list(self, key: _Str, default: Any = REQUIRED, *, of: type | None = None) -> Any:
        found, value = self._get(key, default, "an array")
        if not found:
            return value
        if not isinstance(value, list):
            self.error(key, f"must be an array, got {_type_name(value)} {value!r}")
            return default if default is not REQUIRED else []
        if of is not None:
            for i, item in enumerate(value):
                ok = isinstance(item, of) and not (of is not bool and isinstance(item, bool))
                if of is float:
                    ok = isinstance(item, int | float) and not isinstance(item, bool)
                if not ok:
                    self.issues.add(
                        f"{self.at(key)}[{i}]",
                        f"must be {_TOML_TYPE_NAMES.get(of, of.__name__)}, "
                        f"got {_type_name(item)} {item!r}",
                    )
        return value

    def raw(self, key: _Str, default: Any = REQUIRED) -> Any:
        """Any value, unchecked (the caller checks it)."""
        return self._get(key, default, "a value")[1]

    def table(self, key: _Str, *, required: _Bool = False) -> Section:
        """The sub-table `key` (an empty one when absent and not required)."""
        found, value = self._get(key, REQUIRED if required else None, "a table")
        if not found:
            return Section({}, self.at(key), self.issues)
        if not isinstance(value, dict):
            self.error(key, f"must be a table, got {_type_name(value)} {value!r}")
            return Section({}, self.at(key), self.issues)
        return Section(value, self.at(key), self.issues)

    def tables(self, key: _Str) -> dict[_Str, Section]:
        """A table of tables, such as `devices` or `points`: name -> Section."""
        return self.table(key).children()

    def children(self) -> dict[_Str, Section]:
        """This table's own entries as tables (`[alerts.<name>]`...): name -> Section; an
        entry that is not a table is reported."""
        out: dict[_Str, Section] = {}
        for name, value in self.data.items():
            self.mark(name)
            if not isinstance(value, dict):
                self.error(name, f"must be a table, got {_type_name(value)} {value!r}")
                continue
            out[name] = Section(value, self.at(name), self.issues)
        return out

    def done(self) -> None:
        """Report every key of this table that nobody read."""
        for key in self.data:
            if key not in self._seen:
                hint = _did_you_mean(key, sorted(self._seen | set(self._siblings)))
                self.error(key, f"unknown key{hint}")

    def _range(self, key: _Str, value: _Float, lo: _Float | None, hi: _Float | None) -> None:
        if lo is not None and value < lo:
            self.error(key, f"must be >= {lo:g}, got {value:g}")
        if hi is not None and value > hi:
            self.error(key, f"must be <= {hi:g}, got {value:g}")


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    import difflib  # only when something is wrong

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: Serial line speeds devices use (termios' standard rates from 1200 up).
STANDARD_BAUDRATES: Final = frozenset({
    1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400, 460800, 500000,
    576000, 921600, 1000000, 1152000, 1500000, 2000000, 2500000, 3000000, 3500000, 4000000,
})  # fmt: skip

#: Option keys whose values are secrets: never shown in a message, a repr or a log line.
SECRET_KEYS: Final = frozenset({"bindkey", "psk", "psk_hex", "psk_key", "password"})


def redact_url(url: str) -> str:
    """`url` with any `user:password@` part replaced by `***@`, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url
    return f"{scheme}{sep}***@{authority.rpartition('@')[2]}{rest[end:]}"


def secret_hex(text: str, nbytes: int | None = None) -> tuple[bytes | None, str]:
    """Decode a hex key: (bytes, "") or (None, what is wrong with it, without the value)."""
    digits = "".join(text.split())  # bytes.fromhex allows spaces between bytes
    bad = sum(1 for c in digits if c not in "0123456789abcdefABCDEF")
    want = "hexadecimal, an even number of digits"
    if nbytes:
        want = f"hexadecimal, {2 * nbytes} digits (a {nbytes}-byte key)"
    problems = []
    if nbytes is not None and len(digits) != 2 * nbytes:
        problems.append(f"it has {len(digits)}")
    elif nbytes is None and len(digits) % 2:
        problems.append(f"it has an odd number of characters ({len(digits)})")
    if bad:
        problems.append(f"{bad} character(s) not 0-9/a-f")
    if problems or not digits:
        return None, f"must be {want}; " + (", ".join(problems) or "it is empty")
    return bytes.fromhex(digits), ""


def has_userinfo(url: str) -> bool:
    """Whether a URL carries `user[:password]@` in its authority."""
    return redact_url(url) != url


def validate_name(section: Section, key: str, name: str, what: str) -> None:
    """Ids appear in CoAP paths, streams, MQTT topics and logs: the one name rule
    (`gateway.names`) applies."""
    from gateway import names

    message = names.problem(name, f"{what} name")
    if message is not None:
        section.issues.add(section.at(key), message)


# ------------------------------------------------------------------------------------------
# The configuration itself
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PointSpec:
    """One point (a value a device exposes). Driver-specific keys stay in `options`."""

    name: str
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    min: float | None = None
    max: float | None = None
    writable: bool = False
    interval: float | None = None  # overrides the device's polling interval
    deadband: float | None = None  # on-change: emit only when |change| > deadband
    remote_write: bool = False  # the cloud may write it (services.points)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One configured device. Keys not common to all drivers stay in `options`."""

    id: str
    driver: str
    interval: float = 10.0
    jitter: float = 0.1  # fraction of the interval
    timeout: float = 5.0
    enabled: bool = True
    description: str = ""
    offline_after: int = 3  # failed polls in a row before the device is reported unavailable
    points: tuple[PointSpec, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # driver options may hold keys: never show them
        shown = {k: "***" if k in SECRET_KEYS else v for k, v in self.options.items()}
        return (
            f"DeviceSpec(id={self.id!r}, driver={self.driver!r}, interval={self.interval!r}, "
            f"points={[p.name for p in self.points]!r}, options={shown!r})"
        )

    @property
    def path(self) -> str:
        return join_path("devices", self.id)

    def point_path(self, point: str) -> str:
        return join_path(join_path(self.path, "points"), point)

    def point(self, name: str) -> PointSpec | None:
        for p in self.points:
            if p.name == name:
                return p
        return None


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
    #: Sections owned by other parts (`coap`, `sync`, ...), parsed by their parsers.
    sections: Mapping[str, Any]
    source: str = ""
    #: Things that load but deserve a look (a password sent in clear...); logged at load.
    warnings: tuple[ConfigIssue, ...] = ()

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


# Sections owned by other packages: name -> "module:function". The function takes a Section
# and returns the parsed, frozen config object (or None when the section is absent and the
# feature is off). Loaded lazily so that `config check` costs little.
SECTION_PARSERS: dict[str, str] = {
    "coap": "gateway.coap.config:parse",
    "sync": "gateway.sync.config:parse",
    "metrics": "gateway.metrics:parse_section",
    "derived": "services.processing.config:parse_derived",
    "processing": "services.processing.config:parse_processing",
    "alerts": "services.notification.config:parse_alerts",
    "notify": "services.notification.config:parse_notify",
    "auth": "services.auth:parse",
    "sagas": "services.control.sagas:parse",
}

GENERIC_DEVICE_KEYS = (
    "driver", "interval", "jitter", "timeout", "enabled", "description", "offline_after",
)  # fmt: skip
GENERIC_POINT_KEYS = (
    "unit", "scale", "offset", "min", "max", "writable", "interval", "deadband", "remote_write",
)  # fmt: skip


def _import(ref: str) -> Any:
    import importlib

    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


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
    from drivers import DRIVERS

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
        from drivers import driver_class

        issues.warnings.extend(driver_class(driver).validate_device(spec) or ())
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
    from drivers import DRIVERS

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
            hint = _did_you_mean(kind, sorted(DRIVERS))
            issues.add(dsec.path, f"unknown driver {kind!r}{hint}")
            continue
        try:
            from drivers import driver_class

            issues.warnings.extend(driver_class(kind).validate_options(dsec.data, dsec.path) or ())
        except ConfigError as exc:
            issues.extend(exc.issues)
        drivers[kind] = dict(dsec.data)

    sections: dict[str, Any] = {}
    for name, ref in SECTION_PARSERS.items():
        if name in data:
            try:
                parser: Callable[[Section], Any] = _import(ref)
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
