"""The control service: commands to devices and sagas (multi-step procedures). Its tables
(`commands`, `sagas`) are projections of their events, registered here."""

from __future__ import annotations

from gateway.store.projections import register_projection
from gateway.store.schema import register_schema
from services.control.projection import SCHEMA, CommandProjection

register_schema("control", SCHEMA)
register_projection(CommandProjection())
