"""The control service: commands to devices and sagas (multi-step procedures). Its tables
(`commands`, `sagas`) are projections of their events, registered by `register()`."""

from __future__ import annotations

from gateway.store.projections import register_projection
from gateway.store.schema import register_schema
from services.control.projection import SCHEMA, CommandProjection


def register() -> None:
    """Declare its tables to the store (before it opens): called through `gateway.parts`."""
    register_schema("control", SCHEMA)
    register_projection(CommandProjection())
