"""Notification: alert rules over committed events; raised/cleared events; delivery to local
channels with dedupe. Imported when `[alerts]` is configured (its config parser lives here):
it declares its tables (open alerts, delivery cursors) before the store opens."""

from __future__ import annotations

from gateway.store.projections import register_projection
from gateway.store.schema import register_schema
from services.notification.projection import SCHEMA, AlertProjection

register_schema("notification", SCHEMA)
register_projection(AlertProjection())
