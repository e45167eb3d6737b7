"""The optional parts of the gateway (drivers, ports, services, CLI verbs, probes), each
described once: the one place the kernel names them.

A part is described by module paths ("module:attr" strings), never imported here: the config
loader, the daemon and `gatewayctl` load only what a config or a command uses, so a gateway
without BLE never imports the BLE driver, and `gatewayctl config check` stays cheap.
Nothing of drivers or services is imported by the kernel except through this table.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

#: When a part's service runs: "always" (started first), "configured" (when one of its
#: `switches` sections is present and not `enabled = false`), "last" (always, started after
#: every other service), "never" (the part has no service).
Runs = Literal["always", "configured", "last", "never"]


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    kind: Literal["driver", "port", "service", "cli"]
    #: "module:Class": the Driver (kind "driver") or the Service class.
    impl: str = ""
    #: Config sections it owns: section name -> "module:function" parsing it (a `Section` in,
    #: a frozen config object out).
    sections: Mapping[str, str] = field(default_factory=dict)
    runs: Runs = "never"
    #: Sections that start its service (default: all of `sections`).
    switches: tuple[str, ...] | None = None
    #: "module:function" registering its tables (schema and projections) with the store; called
    #: before a store is opened for a config that uses the part, never at import.
    tables: str = ""
    #: Modules adding `gatewayctl` verbs: each has `add_parsers(sub)`.
    verbs: tuple[str, ...] = ()
    #: Module with `add_parser(sub)`: `gatewayctl probe <name>`.
    probe: str = ""
    #: The library the part's protocol needs (imported only when used), by import name.
    library: str = ""

    @property
    def starts_with(self) -> tuple[str, ...]:
        return tuple(self.sections) if self.switches is None else self.switches


# The order is the order of everything that iterates over parts: sections are parsed, services
# started (within "always", "configured", "last"), verbs listed and probes listed in it.
PARTS: Final[tuple[Part, ...]] = (
    Part("gatewayctl", "cli",
         verbs=("gateway.cli.core", "gateway.cli.export", "gateway.cli.metrics")),
    Part(
        "coap", "port", "gateway.coap.service:CoapService", {"coap": "gateway.coap.config:parse"},
        runs="configured", tables="gateway.coap.projection:register", library="aiocoap",
    ),
    Part(
        "sync", "port", "gateway.sync.service:SyncService", {"sync": "gateway.sync.config:parse"},
        runs="configured", verbs=("gateway.sync.cli",), library="aiomqtt",
    ),
    Part(
        "metrics", "service", "gateway.metrics:MetricsService",
        {"metrics": "gateway.metrics:parse_section"}, runs="configured",
    ),
    Part(
        "processing", "service", "services.processing.service:ProcessingService",
        {
            "derived": "services.processing.config:parse_derived",
            "processing": "services.processing.config:parse_processing",
        },
        runs="configured", tables="services.processing:register",
    ),
    Part(
        "notification", "service", "services.notification.service:NotificationService",
        {
            "alerts": "services.notification.config:parse_alerts",
            "notify": "services.notification.config:parse_notify",
        },
        runs="configured", switches=("alerts",), tables="services.notification:register",
        verbs=("services.notification.cli",),
    ),
    Part("auth", "service", "services.auth:AuthService", {"auth": "services.auth:parse"},
         runs="always"),
    Part("devices", "service", "services.devices:DevicesService", runs="always"),
    Part("collection", "service", "services.collection:CollectionService", runs="always"),
    # Last: the CoAP front door, if any, runs by then.
    Part(
        "control", "service", "services.control.service:ControlService",
        {"sagas": "services.control.sagas:parse"}, runs="last", tables="services.control:register",
        verbs=("services.control.cli",),
    ),
    Part("virtual", "driver", "drivers.virtual:VirtualDriver"),
    Part("modbus", "driver", "drivers.modbus:ModbusDriver", probe="drivers.modbus.probe",
         library="pymodbus"),
    Part("serial", "driver", "drivers.serial:SerialDriver", probe="drivers.serial.probe",
         library="serial"),
    Part("ble", "driver", "drivers.ble:BleDriver", probe="drivers.ble.probe", library="bleak"),
    Part("coap", "driver", "drivers.coap:CoapDriver", probe="drivers.coap.probe",
         library="aiocoap"),
)  # fmt: skip

#: kind -> "module:Class" of every driver.
DRIVERS: Final[Mapping[str, str]] = {p.name: p.impl for p in PARTS if p.kind == "driver"}

#: section -> "module:function" parsing it, for every section owned by a part.
SECTION_PARSERS: Final[Mapping[str, str]] = {s: ref for p in PARTS for s, ref in p.sections.items()}

#: Where pip finds a library, when its import name differs.
_DISTRIBUTIONS: Final = {"serial": "pyserial"}


def load(ref: str) -> Any:
    """The object a "module:attr" reference names, importing its module now."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def in_use(part: Part, sections: Mapping[str, object]) -> bool:
    """Whether a config with these (parsed) sections uses `part`'s service or tables."""
    return part.runs in ("always", "last") or any(s in sections for s in part.sections)


def services(sections: Mapping[str, object]) -> list[str]:
    """The services a config with these sections runs, as "module:Class", in start order."""
    first, configured, last = [], [], []
    for p in PARTS:
        if p.runs == "always":
            first.append(p.impl)
        elif p.runs == "last":
            last.append(p.impl)
        elif p.runs == "configured" and any(_enabled(sections.get(s)) for s in p.starts_with):
            configured.append(p.impl)
    return first + configured + last


def _enabled(conf: object) -> bool:
    return conf is not None and getattr(conf, "enabled", True) is not False


def register_tables(sections: Mapping[str, object]) -> None:
    """Register with the store the tables of every part these sections use: call it before
    opening a store for a config (the daemon, `gatewayctl db`)."""
    for p in PARTS:
        if p.tables and in_use(p, sections):
            load(p.tables)()


def verb_modules() -> Iterator[str]:
    for p in PARTS:
        yield from p.verbs


def probes() -> Iterator[Part]:
    return (p for p in PARTS if p.probe)


def missing_library(part: Part) -> str | None:
    """What to tell a user when `part`'s library cannot be imported here (None: it can).
    Looks the library up without importing it."""
    if not part.library:
        return None
    import importlib.util

    try:
        found = importlib.util.find_spec(part.library) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    dist = _DISTRIBUTIONS.get(part.library, part.library)
    return f"needs the Python package {dist!r}, which is not installed"
