"""Spec types: the toolkit every part reads its own config table with, and the device specs.

`Section` records the keys it reads, checks types and ranges, and reports every key nobody
read as unknown, with a "did you mean" where one is close; `Issues` collects every problem
with its TOML path. `DeviceSpec` and `PointSpec` are what drivers are handed. This module
imports nothing of drivers or services (they import it), so the loader can name drivers
without an import cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.errors import ConfigError, ConfigIssue


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
            hint = did_you_mean(value, choices)
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
                hint = did_you_mean(key, sorted(self._seen | set(self._siblings)))
                self.error(key, f"unknown key{hint}")

    def _range(self, key: _Str, value: _Float, lo: _Float | None, hi: _Float | None) -> None:
        if lo is not None and value < lo:
            self.error(key, f"must be >= {lo:g}, got {value:g}")
        if hi is not None and value > hi:
            self.error(key, f"must be <= {hi:g}, got {value:g}")


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    import difflib  # only when something is wrong

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


GENERIC_DEVICE_KEYS = (
    "driver", "interval", "jitter", "timeout", "enabled", "description", "offline_after",
)  # fmt: skip
GENERIC_POINT_KEYS = (
    "unit", "scale", "offset", "min", "max", "writable", "interval", "deadband", "remote_write",
)  # fmt: skip
