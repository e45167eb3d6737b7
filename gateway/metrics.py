"""Every figure of `gatewayctl status --json` as metrics, where monitoring already looks.

`render(status)` turns the daemon's status document into text in one of two formats:

- OpenMetrics 1.0 (`gatewayctl metrics`): counter families are named without `_total` and
  their samples with it, and the text ends with `# EOF`;
- the Prometheus text format 0.0.4 (the textfile written for node_exporter's textfile
  collector, whose parser predates OpenMetrics): counters named with `_total`, no `# EOF`.

Figures with a known meaning get a conventional name (units in the name, `_total` for
counters); any other number a service reports becomes `gatewayd_<service>_<figure>` as a
gauge, so a new figure shows up without touching this table. `MetricsService` writes the
textfile atomically (temporary file + rename in the same directory) every `interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, Section
from gateway.service import Health, Service, ServiceContext

#: (path in the status document, name, type, help). A path is dot-separated keys.
KNOWN: tuple[tuple[str, str, str, str], ...] = (
    ("uptime", "gatewayd_uptime_seconds", "gauge", "Seconds since the daemon started."),
    ("reloads", "gatewayd_reloads", "counter", "Configuration reloads applied."),
    ("devices", "gatewayd_configured_devices", "gauge", "Devices in the configuration."),
    ("store.file_bytes", "gatewayd_store_file_bytes", "gauge", "Database file size."),
    ("store.used_bytes", "gatewayd_store_used_bytes", "gauge", "Bytes used in the database."),
    ("store.quota_bytes", "gatewayd_store_quota_bytes", "gauge", "The store's quota."),
    ("store.last_seq", "gatewayd_store_last_seq", "gauge", "Sequence number of the last event."),
    ("store.events", "gatewayd_store_events", "gauge", "Events in the log."),
    ("store.dropped", "gatewayd_store_dropped_events", "counter",
     "Events dropped by the drop_oldest quota policy."),
    ("store.rejected", "gatewayd_store_rejected_events", "counter",
     "Appends refused by the reject_new quota policy."),
    ("store.written_bytes", "gatewayd_storage_written_bytes", "counter",
     "Bytes the daemon made the kernel write to storage (/proc/self/io)."),
    ("outbox.depth", "gatewayd_outbox_events", "gauge", "Events not yet delivered to the cloud."),
    ("outbox.bytes", "gatewayd_outbox_bytes", "gauge", "Bytes of undelivered events."),
    ("outbox.dead_letters", "gatewayd_outbox_dead_letters", "gauge",
     "Events the cloud refused for good."),
)  # fmt: skip

#: Service figures with a known meaning: (service, figure) -> (name, type, help).
SERVICE_FIGURES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("collection", "polls"): ("gatewayd_polls", "counter", "Device polls started."),
    ("collection", "failures"): ("gatewayd_poll_failures", "counter", "Device polls failed."),
    ("collection", "skipped_cycles"): ("gatewayd_poll_skipped_cycles", "counter",
                                       "Poll cycles skipped because a poll overran."),
    ("collection", "push_dropped"): ("gatewayd_push_dropped_readings", "counter",
                                     "Pushed readings dropped (queue full)."),
    ("coap", "accepted"): ("gatewayd_coap_accepted_requests", "counter",
                           "CoAP requests whose data was stored."),
    ("coap", "duplicates"): ("gatewayd_coap_duplicate_requests", "counter",
                             "CoAP retransmissions answered from the deduplication cache."),
    ("sync", "delivered"): ("gatewayd_sync_delivered_events", "counter",
                            "Events delivered to the cloud."),
    ("sync", "dead_lettered"): ("gatewayd_sync_dead_lettered_events", "counter",
                                "Events dead-lettered since start."),
    ("sync", "delivery_rate"): ("gatewayd_sync_delivery_rate_events_per_second", "gauge",
                                "Recent delivery rate."),
    ("sync", "oldest_age"): ("gatewayd_outbox_oldest_age_seconds", "gauge",
                             "Age of the oldest undelivered event."),
}  # fmt: skip

_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class _Family:
    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float]]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and math.isfinite(v):
        return float(v)
    return None


def _get(doc: Mapping[str, Any], path: str) -> Any:
    cur: Any = doc
    for key in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def families(status: Mapping[str, Any]) -> list[_Family]:
    out: dict[str, _Family] = {}

    def add(name: str, kind: str, help_: str, labels: dict[str, str], value: float) -> None:
        fam = out.setdefault(name, _Family(name, kind, help_, []))
        fam.samples.append((labels, value))

    gw = {"gateway": str(status.get("gateway", ""))}
    if "live" in status:
        add("gatewayd_up", "gauge", "1 when the daemon answered, 0 when read from the file.",
            gw, 1.0 if status["live"] else 0.0)  # fmt: skip
    add("gatewayd_info", "gauge", "The gateway and its version (value 1).",
        {**gw, "version": str(status.get("version", ""))}, 1.0)  # fmt: skip
    for path, name, kind, help_ in KNOWN:
        v = _number(_get(status, path))
        if v is not None:
            add(name, kind, help_, gw, v)
    if "last_reload_error" in status:
        add("gatewayd_last_reload_failed", "gauge", "1 when the last reload was refused.",
            gw, 1.0 if status.get("last_reload_error") else 0.0)  # fmt: skip
    for service, h in sorted((status.get("services") or {}).items()):
        labels = {**gw, "service": service}
        state = str(h.get("state", ""))
        add("gatewayd_service_up", "gauge", "1 when the service runs (ok or degraded).", labels,
            1.0 if state in ("ok", "degraded") else 0.0)  # fmt: skip
        add("gatewayd_service_degraded", "gauge", "1 when the service runs degraded.", labels,
            1.0 if state == "degraded" else 0.0)  # fmt: skip
        if (r := _number(h.get("restarts"))) is not None:
            add("gatewayd_service_restarts", "counter", "Restarts by the supervisor.", labels, r)
        for figure, value in sorted(h.items()):
            if figure in ("state", "detail", "restarts"):
                continue
            if figure == "per_device" and isinstance(value, Mapping):
                _per_device(add, labels, value)
                continue
            if isinstance(value, list):  # e.g. the unavailable devices
                add(_generic(service, figure), "gauge", f"How many {figure} ({service}).",
                    labels, float(len(value)))  # fmt: skip
                continue
            v = _number(value)
            if v is None:
                continue
            known = SERVICE_FIGURES.get((service, figure))
            if known is not None:
                add(known[0], known[1], known[2], labels, v)
            else:
                add(_generic(service, figure), "gauge", f"{figure} ({service}).", labels, v)
    return list(out.values())


#: Per-device figures of the collection service: figure -> (name, type, help).
DEVICE_FIGURES: dict[str, tuple[str, str, str]] = {
    "polls": ("gatewayd_device_polls", "counter", "Polls of the device."),
    "failures": ("gatewayd_device_poll_failures", "counter", "Polls of the device that failed."),
    "available": ("gatewayd_device_up", "gauge", "1 when the device answers (absent: unknown)."),
    "last_read_s": ("gatewayd_device_last_read_seconds", "gauge",
                    "How long the device's last answered read took."),
}  # fmt: skip


def _per_device(
    add: Callable[[str, str, str, dict[str, str], float], None],
    labels: dict[str, str],
    devices: Mapping[str, Any],
) -> None:
    for device, figures in sorted(devices.items()):
        if not isinstance(figures, Mapping):
            continue
        for figure, (name, kind, help_) in DEVICE_FIGURES.items():
            v = _number(figures.get(figure))
            if v is not None:
                add(name, kind, help_, {**labels, "device": str(device)}, v)


def _generic(service: str, figure: str) -> str:
    return _NAME_OK.sub("_", f"gatewayd_{service}_{figure}")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _value(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def render(status: Mapping[str, Any], fmt: str = "openmetrics") -> str:
    """The status document as OpenMetrics (`openmetrics`) or Prometheus 0.0.4 (`prometheus`)."""
    lines: list[str] = []
    for fam in families(status):
        counter = fam.type == "counter"
        family = fam.name if (fmt == "openmetrics" or not counter) else f"{fam.name}_total"
        lines.append(f"# HELP {family} {_escape(fam.help)}")
        lines.append(f"# TYPE {family} {fam.type}")
        sample = f"{fam.name}_total" if counter else fam.name
        for labels, v in fam.samples:
            lab = ",".join(f'{k}="{_escape(x)}"' for k, x in labels.items())
            lines.append(f"{sample}{{{lab}}} {_value(v)}")
    if fmt == "openmetrics":
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one (rename in one directory)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
        os.chmod(tmp, 0o644)  # node_exporter runs as its own user
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- [metrics] -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MetricsConfig:
    textfile: str
    interval: float = 15.0


def parse_section(s: Section) -> MetricsConfig:
    """`[metrics]`: `textfile` (absolute, *.prom), `interval` (s, >= 1)."""
    textfile = s.str("textfile")
    if not isinstance(textfile, str):  # missing: already reported
        textfile = ""
    elif not os.path.isabs(textfile):
        s.error("textfile", f"must be an absolute path, got {textfile!r}")
    elif textfile and not textfile.endswith(".prom"):
        s.error("textfile", f"node_exporter's textfile collector reads *.prom, got {textfile!r}")
    config = MetricsConfig(textfile=textfile, interval=s.float("interval", 15.0, min=1.0))
    s.done()
    return config


class MetricsService(Service):
    """Writes the textfile every `interval` seconds. A failed write shows in health and is
    logged once per distinct error; it never stops the daemon."""

    name = "metrics"

    def __init__(self) -> None:
        self.config: MetricsConfig | None = None
        self.written = 0
        self.last_error = ""

    async def start(self, ctx: ServiceContext) -> None:
        self.config = ctx.config.section("metrics", MetricsConfig)
        self._ctx = ctx
        ctx.create_task(self._loop(), name="metrics")

    async def stop(self) -> None:
        """Nothing to release: the supervisor cancels the loop; the last file stays."""

    async def reload(self, config: GatewayConfig) -> None:
        self.config = config.section("metrics", MetricsConfig)

    async def _loop(self) -> None:
        while self.config is not None:
            await self.write_once()
            await asyncio.sleep(self.config.interval)

    async def write_once(self) -> None:
        assert self.config is not None
        path = Path(self.config.textfile)
        try:
            text = render(await self._ctx.control.ask("status"), "prometheus")
            await asyncio.to_thread(write_atomically, path, text)
        except OSError as exc:
            if str(exc) != self.last_error:
                self._ctx.logger.warning("metrics: cannot write %s: %s", path, exc)
            self.last_error = str(exc)
        else:
            self.written += 1
            self.last_error = ""

    def health(self) -> Health:
        where = self.config.textfile if self.config else "-"
        if self.last_error:
            return Health.degraded(f"{where} not written: {self.last_error}", written=self.written)
        return Health.ok(where, written=self.written)
