"""The registry of optional parts (`gateway/parts.py`): its module paths are strings that no
type checker reads, so every one of them is loaded here, and the services a config starts
come out in the order the daemon always started them."""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from drivers.base import Driver
from gateway import parts
from gateway.service import Service

ROOT = Path(__file__).resolve().parents[2]


def test_every_reference_in_the_registry_resolves_to_what_its_field_says() -> None:
    names = set()
    for part in parts.PARTS:
        assert (part.kind, part.name) not in names, f"{part.name} described twice"
        names.add((part.kind, part.name))
        if part.kind == "driver":
            cls = parts.load(part.impl)
            assert issubclass(cls, Driver) and cls.kind == part.name, part
        elif part.impl:
            cls = parts.load(part.impl)
            assert issubclass(cls, Service) and cls.name == part.name, part
        for ref in part.sections.values():
            assert callable(parts.load(ref)), ref
        if part.tables:  # (not called: that would register them for every later test)
            assert callable(parts.load(part.tables)), part.tables
        for module in part.verbs:
            assert callable(importlib.import_module(module).add_parsers), module
        if part.probe:
            assert callable(importlib.import_module(part.probe).add_parser), part.probe
        assert set(part.starts_with) <= set(part.sections), part


def test_a_section_has_one_owner() -> None:
    owners = [s for p in parts.PARTS for s in p.sections]
    assert len(owners) == len(set(owners)) == len(parts.SECTION_PARSERS)


@dataclass(frozen=True)
class _Conf:
    enabled: bool = True


def _names(sections: dict[str, object]) -> list[str]:
    return [ref.rpartition(":")[2] for ref in parts.services(sections)]


def test_services_start_in_the_daemons_order() -> None:
    core = ["AuthService", "DevicesService", "CollectionService"]
    assert _names({}) == [*core, "ControlService"]
    every: dict[str, object] = {
        "coap": _Conf(), "sync": _Conf(), "metrics": _Conf(), "derived": {}, "processing": {},
        "alerts": {}, "notify": {}, "auth": _Conf(), "sagas": {},
    }  # fmt: skip
    assert _names(every) == [
        *core, "CoapService", "SyncService", "MetricsService", "ProcessingService",
        "NotificationService", "ControlService",
    ]  # fmt: skip
    # A part serving two sections starts once; `enabled = false` keeps a service off;
    # [notify] alone (channels without rules) starts no notification service.
    assert _names({"coap": _Conf(enabled=False), "processing": {}, "notify": {}}) == [
        *core, "ProcessingService", "ControlService",
    ]  # fmt: skip


def test_importing_any_module_registers_no_tables() -> None:
    """Tables are registered where a part is started (`parts.register_tables`), never by an
    import: the CoAP driver's payload codec used to register the CoAP front door's table."""
    code = (
        "import importlib, pathlib\n"
        "from gateway.store.projections import projections\n"
        "from gateway.store.schema import schemas\n"
        "for f in sorted(p for d in ('gateway', 'drivers', 'services')"
        " for p in pathlib.Path(d).rglob('*.py')):\n"
        "    parts = f.with_suffix('').parts\n"
        "    importlib.import_module('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))\n"
        "print(sorted(schemas()), [type(p).__name__ for p in projections()])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['core'] ['DeviceProjection']"
