"""Point rules: the one place a write is judged before any driver sees it.

The device and point exist, the device is enabled, the point is `writable`, the value has
the point's kind and lies within `min`/`max` in engineering units; then scale and offset are
undone once, here, and the driver gets the raw value. Each refusal is its own error class
(`gateway.errors.WriteRefusedError`), so the CLI, CoAP and the cloud say the same thing.
Drivers keep only what only they know (what fits the wire).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from gateway.config import DeviceSpec, PointSpec
from gateway.errors import (
    DeviceDisabledError,
    NotWritableError,
    OutOfRangeError,
    RemoteWriteError,
    UnknownDeviceError,
    UnknownPointError,
    WrongTypeError,
)


class Write(NamedTuple):
    """A write that passed the rules: what the driver gets."""

    spec: DeviceSpec
    point: PointSpec
    value: Any  # engineering units, as asked (bool for a flag)
    raw: Any  # what the driver writes: scale and offset undone


def kind_of(spec: DeviceSpec, point: PointSpec) -> str:
    from drivers import DRIVERS, driver_class

    if spec.driver not in DRIVERS:
        return "any"
    return driver_class(spec.driver).value_kind(spec, point)


def remote_allowed(spec: DeviceSpec, point: PointSpec, allow: Sequence[str]) -> bool:
    """A cloud write needs the point's `remote_write = true` or a `[control] allow_remote`
    pattern ("device/point", "device/*")."""
    if point.remote_write:
        return True
    return any(fnmatch.fnmatchcase(f"{spec.id}/{point.name}", pat) for pat in allow)


def check_write(
    devices: Mapping[str, DeviceSpec],
    device: str,
    point: str,
    value: Any,
    *,
    remote: bool = False,
    allow_remote: Sequence[str] = (),
) -> Write:
    """Judge a write; raises the WriteRefusedError subclass that names the refusal."""
    spec = devices.get(device)
    if spec is None:
        raise UnknownDeviceError(f"no configured device {device!r}")
    p = spec.point(point)
    if p is None:
        raise UnknownPointError(f"{device}: no point {point!r}")
    if not spec.enabled:
        raise DeviceDisabledError(f"{device}: the device is disabled (enabled = false)")
    if not p.writable:
        raise NotWritableError(f"{device}/{point}: the point is not writable")
    if remote and not remote_allowed(spec, p, allow_remote):
        raise RemoteWriteError(
            f"{device}/{point}: cloud writes are off for this point (set remote_write = true "
            f"on it, or list it in [control] allow_remote)"
        )
    kind = kind_of(spec, p)
    where = f"{device}/{point}"
    if kind == "bool":
        if isinstance(value, bool):
            return Write(spec, p, value, value)
        if isinstance(value, int) and value in (0, 1):
            return Write(spec, p, bool(value), bool(value))
        raise WrongTypeError(f"{where}: needs true/false, got {value!r}")
    if kind == "string":
        if not isinstance(value, str):
            raise WrongTypeError(f"{where}: needs a string, got {value!r}")
        return Write(spec, p, value, value)
    if kind == "number" or (isinstance(value, int | float) and not isinstance(value, bool)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WrongTypeError(f"{where}: needs a number, got {value!r}")
        if not math.isfinite(value):
            raise WrongTypeError(f"{where}: needs a finite number, got {value!r}")
        if p.min is not None and value < p.min:
            raise OutOfRangeError(f"{where}: {value:g} is below the minimum {p.min:g}")
        if p.max is not None and value > p.max:
            raise OutOfRangeError(f"{where}: {value:g} is above the maximum {p.max:g}")
        return Write(spec, p, value, to_raw(p, value))
    return Write(spec, p, value, value)


def to_raw(point: PointSpec, value: int | float) -> int | float:
    """Undo the point's scale and offset (the inverse of the collection service's `convert`)."""
    if point.scale == 1.0 and point.offset == 0.0:
        return value
    return (value - point.offset) / point.scale
