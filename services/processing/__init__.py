"""Processing: derived points, tumbling windows and anomaly flags over committed readings.

`register()` declares the one table it keeps (window watermarks, a projection of its own
`aggregate` events) before a store opens for a config with `[derived]` or `[processing]`.
"""

from __future__ import annotations

from gateway.store.projections import register_projection
from gateway.store.schema import register_schema
from services.processing.projection import SCHEMA, WindowProjection


def register() -> None:
    """Declare its tables to the store (before it opens): called through `gateway.parts`."""
    register_schema("processing", SCHEMA)
    register_projection(WindowProjection())
