"""The `[derived]` and `[processing]` sections.

```toml
[derived.boiler-1.efficiency]
expr = "(t_out - t_in) * flow * 4.186 / power"
inputs = { t_out = "boiler-1/t_out", t_in = "boiler-1/t_in", flow = "boiler-1/flow",
           power = "boiler-1/power" }
unit = "%"
min_interval = "5s"     # at most one value per 5 s (the newest inputs win)
max_age = "1m"          # an input older than this makes the value missing

[processing.boiler-1.temperature]
window = "1m"           # tumbling windows aligned to the wall clock
counter = false         # true: the aggregate also carries `sum`
empty = false           # true: a window without readings emits count = 0
anomaly = true          # or { alpha = 0.05, threshold = 4.0, warmup = 30 }
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config import Section, validate_name
from services.durations import read_duration
from services.expr import Expr, ExprSyntaxError, compile_expr


@dataclass(frozen=True, slots=True)
class DerivedPoint:
    device: str
    point: str
    expr: Expr
    #: expression name -> (device, point)
    inputs: Mapping[str, tuple[str, str]]
    unit: str | None
    min_interval: float
    max_age: float | None
    path: str


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    alpha: float = 0.05  # EWMA weight of a new reading
    threshold: float = 4.0  # |z| above this is an anomaly
    warmup: int = 30  # readings before any flag


@dataclass(frozen=True, slots=True)
class PointProcessing:
    device: str
    point: str
    window: float | None
    counter: bool
    empty: bool
    anomaly: AnomalyConfig | None


def parse_point_ref(sec: Section, key: str, ref: object) -> tuple[str, str] | None:
    """`"device/point"` -> (device, point); a bad one is an issue at `sec.key`."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        sec.error(key, f'must be "device/point", got {ref!r}')
        return None
    device, point = ref.split("/")
    before = len(sec.issues.items)
    validate_name(sec, key, device, "device")
    validate_name(sec, key, point, "point")
    return None if len(sec.issues.items) > before else (device, point)


def parse_expr(sec: Section, key: str, names: Mapping[str, object]) -> Expr | None:
    text = sec.str(key)
    if not isinstance(text, str) or not text:
        return None
    try:
        return compile_expr(text, names)
    except ExprSyntaxError as exc:
        sec.error(key, str(exc))
        return None


def parse_inputs(sec: Section) -> dict[str, tuple[str, str]]:
    inputs_sec = sec.table("inputs", required=True)
    out: dict[str, tuple[str, str]] = {}
    for name, ref in inputs_sec.data.items():
        inputs_sec.mark(name)
        if not (name.isascii() and name.isidentifier()) or name in _RESERVED:
            inputs_sec.error(name, "an input name must be a plain identifier, not a keyword")
            continue
        parsed = parse_point_ref(inputs_sec, name, ref)
        if parsed is not None:
            out[name] = parsed
    return out


_RESERVED = frozenset({"and", "or", "not", "if", "else", "true", "false",
                       "min", "max", "abs", "round", "clamp"})  # fmt: skip


def parse_derived(root: Section) -> dict[tuple[str, str], DerivedPoint]:
    out: dict[tuple[str, str], DerivedPoint] = {}
    for device, dsec in root.children().items():
        validate_name(dsec, "", device, "device")
        for point, psec in dsec.children().items():
            validate_name(psec, "", point, "point")
            inputs = parse_inputs(psec)
            expr = parse_expr(psec, "expr", inputs)
            unit = psec.str("unit", None)
            min_interval = read_duration(psec, "min_interval", 0.0, zero_ok=True)
            max_age = read_duration(psec, "max_age", None)
            psec.done()
            if expr is not None:
                if not expr.names:
                    psec.error("expr", "uses none of its inputs (a constant is not a point)")
                unused = sorted(set(inputs) - expr.names)
                if unused:
                    psec.error("inputs", f"declared but not used by expr: {', '.join(unused)}")
                out[(device, point)] = DerivedPoint(
                    device, point, expr, inputs, unit, min_interval, max_age, psec.path
                )
    _check_cycles(root, out)
    return out



def _check_cycles(root: Section, points: Mapping[tuple[str, str], DerivedPoint]) -> None:
    """A derived point that depends on itself (directly or through others) would feed itself."""
    state: dict[tuple[str, str], int] = {}

    def visit(key: tuple[str, str], chain: list[tuple[str, str]]) -> None:
        if state.get(key) == 2 or key not in points:
            return
        if state.get(key) == 1:
            loop = " -> ".join(f"{d}/{p}" for d, p in [*chain[chain.index(key) :], key])
            root.issues.add(points[key].path + ".inputs", f"derived points form a loop: {loop}")
            state[key] = 2
            return
        state[key] = 1
        for ref in points[key].inputs.values():
            visit(ref, [*chain, key])
        state[key] = 2

    for key in points:
        visit(key, [])


def parse_processing(root: Section) -> dict[tuple[str, str], PointProcessing]:
    out: dict[tuple[str, str], PointProcessing] = {}
    for device, dsec in root.children().items():
        validate_name(dsec, "", device, "device")
        for point, psec in dsec.children().items():
            validate_name(psec, "", point, "point")
            window = read_duration(psec, "window", None)
            if window is not None and _uneven(window):
                psec.error(
                    "window",
                    "must divide a day into whole windows (e.g. 1m, 5m, 15m, 1h, 1d), "
                    f"got {window:g} s",
                )
            counter = psec.bool("counter", False)
            empty = psec.bool("empty", False)
            anomaly = _parse_anomaly(psec)
            psec.done()
            if window is None and anomaly is None:
                psec.error("", "needs a window or anomaly (or both)")
            out[(device, point)] = PointProcessing(device, point, window, counter, empty, anomaly)
    return out


def _uneven(window: float) -> bool:
    """Windows align to the wall clock: a whole number of them per day (or whole days)."""
    if window <= 0:
        return False
    if window <= 86400:
        return window < 1 or bool(86400 % window)
    return bool(window % 86400)


def _parse_anomaly(psec: Section) -> AnomalyConfig | None:
    raw: Any = psec.raw("anomaly", None)
    if raw is None or raw is False:
        return None
    if raw is True:
        return AnomalyConfig()
    if not isinstance(raw, dict):
        psec.error("anomaly", f"must be true or a table, got {raw!r}")
        return None
    a = Section(raw, psec.at("anomaly"), psec.issues)
    conf = AnomalyConfig(
        alpha=a.float("alpha", 0.05, gt=0, max=1),
        threshold=a.float("threshold", 4.0, gt=0),
        warmup=a.int("warmup", 30, min=2),
    )
    a.done()
    return conf
