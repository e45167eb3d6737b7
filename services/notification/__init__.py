"""Notification: alert rules over committed events; raised/cleared events; delivery to local
channels with dedupe. `register()` declares its tables (open alerts, delivery cursors) before
a store opens for a config with `[alerts]` or `[notify]`."""

from __future__ import annotations

from gateway.store.projections import register_projection
from gateway.store.schema import register_schema
from services.notification.projection import SCHEMA, AlertProjection


def register() -> None:
    """Declare its tables to the store (before it opens): called through `gateway.parts`."""
    register_schema("notification", SCHEMA)
    register_projection(AlertProjection())
