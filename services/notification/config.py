"""The `[alerts]` and `[notify]` sections.

```toml
[alerts.boiler-hot]
point = "boiler-1/temperature"   # or expr = "..." with inputs = { ... }
raise_above = 85.0               # raised above this...
clear_below = 80.0               # ...cleared only below this (hysteresis)
min_duration = "30s"             # bad for this long before it is raised
severity = "critical"            # info | warning (default) | critical

[alerts.boiler-down]
device_unavailable = "boiler-1"

[alerts.boiler-heating-fast]
rate_of_change = "boiler-1/temperature"     # per second, between consecutive readings
raise_above = 0.5

[notify.siren]
command = ["/usr/local/bin/siren", "--on"]   # argv, no shell; the alert as JSON on stdin
timeout = "10s"
min_severity = "warning"
retries = 3
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from gateway.config import Section, validate_name
from services.durations import read_duration
from services.expr import Expr
from services.processing.config import parse_expr, parse_inputs, parse_point_ref

SEVERITIES: Final = ("info", "warning", "critical")
#: The keys that say what a rule watches: exactly one per rule.
SOURCES: Final = (
    "point", "expr", "rate_of_change", "device_unavailable", "anomaly", "outbox_older_than",
    "store_above", "service_degraded",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AlertRule:
    name: str
    kind: str  # one of SOURCES
    severity: str
    message: str
    min_duration: float
    point: tuple[str, str] | None = None  # point, anomaly
    expr: Expr | None = None
    inputs: Mapping[str, tuple[str, str]] | None = None
    device: str | None = None
    service: str | None = None  # service_degraded
    raise_above: float | None = None
    clear_below: float | None = None
    raise_below: float | None = None
    clear_above: float | None = None
    limit: float | None = None  # outbox_older_than (s), store_above (%)
    quiet: float = 300.0  # anomaly: cleared after this long without a flag


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    command: tuple[str, ...]
    timeout: float
    min_severity: str
    retries: int


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0


def parse_alerts(root: Section) -> dict[str, AlertRule]:
    out: dict[str, AlertRule] = {}
    for name, sec in root.children().items():
        rule = _parse_rule(name, sec)
        if rule is not None:
            out[name] = rule
    return out



def _parse_rule(name: str, sec: Section) -> AlertRule | None:
    validate_name(sec, "", name, "alert")
    sources = [k for k in SOURCES if sec.has(k)]
    severity = sec.str("severity", "warning", choices=SEVERITIES)
    message = sec.str("message", "", nonempty=False)
    min_duration = read_duration(sec, "min_duration", 0.0, zero_ok=True)
    if len(sources) != 1:
        sec.error(
            "",
            "needs exactly one of " + ", ".join(SOURCES)
            + (f" (got {', '.join(sources)})" if sources else ""),
        )  # fmt: skip
        sec.mark(*SOURCES, "inputs", "raise_above", "clear_below", "raise_below",
                 "clear_above", "quiet")  # fmt: skip
        return None
    kind = sources[0]
    common: dict[str, Any] = dict(
        name=name, kind=kind, severity=severity, message=message, min_duration=min_duration
    )
    rule: AlertRule | None = None
    if kind in ("point", "expr", "rate_of_change"):
        point = expr = inputs = None
        if kind != "expr":
            point = parse_point_ref(sec, kind, sec.str(kind))
        else:
            inputs = parse_inputs(sec)
            expr = parse_expr(sec, "expr", inputs)
        ra, cb = sec.float("raise_above", None), sec.float("clear_below", None)
        rb, ca = sec.float("raise_below", None), sec.float("clear_above", None)
        if cb is not None and ra is None:
            sec.error("clear_below", "goes with raise_above")
        if ca is not None and rb is None:
            sec.error("clear_above", "goes with raise_below")
        if ra is not None and cb is not None and cb > ra:
            sec.error("clear_below", f"must be <= raise_above ({ra:g}), got {cb:g}")
        if rb is not None and ca is not None and ca < rb:
            sec.error("clear_above", f"must be >= raise_below ({rb:g}), got {ca:g}")
        if ra is not None and rb is not None and rb >= ra:
            sec.error("raise_below", f"must be < raise_above ({ra:g}), got {rb:g}")
        if ra is None and rb is None and kind != "expr":
            sec.error("", f"a {kind} rule needs raise_above or raise_below (or both)")
        rule = AlertRule(
            **common, point=point, expr=expr, inputs=inputs,
            raise_above=ra, clear_below=cb if cb is not None else ra,
            raise_below=rb, clear_above=ca if ca is not None else rb,
        )  # fmt: skip
    elif kind == "device_unavailable":
        device = sec.str("device_unavailable")
        validate_name(sec, "device_unavailable", device, "device")
        rule = AlertRule(**common, device=device)
    elif kind == "anomaly":
        point = parse_point_ref(sec, "anomaly", sec.str("anomaly"))
        quiet = read_duration(sec, "quiet", 300.0)
        rule = AlertRule(**common, point=point, quiet=quiet)
    elif kind == "service_degraded":
        service = sec.str("service_degraded")
        validate_name(sec, "service_degraded", service, "service")
        rule = AlertRule(**common, service=service)
    elif kind == "outbox_older_than":
        rule = AlertRule(**common, limit=read_duration(sec, "outbox_older_than"))
    else:
        rule = AlertRule(**common, limit=sec.float("store_above", gt=0, max=100))
    sec.done()
    return rule


def parse_notify(root: Section) -> dict[str, Channel]:
    out: dict[str, Channel] = {}
    for name, sec in root.children().items():
        validate_name(sec, "", name, "channel")
        command = sec.list("command", of=str)
        if isinstance(command, list) and not command:
            sec.error("command", "must name a program (an array: argv, no shell)")
        elif isinstance(command, list) and command and not command[0].startswith("/"):
            sec.error("command", f"the program must be an absolute path, got {command[0]!r}")
        timeout = read_duration(sec, "timeout", 10.0)
        min_severity = sec.str("min_severity", "info", choices=SEVERITIES)
        retries = sec.int("retries", 3, min=0, max=100)
        sec.done()
        if isinstance(command, list) and all(isinstance(a, str) for a in command):
            out[name] = Channel(name, tuple(command), timeout, min_severity, retries)
    return out


__all__ = ["SEVERITIES", "AlertRule", "Channel", "parse_alerts", "parse_notify"]
