"""Processing: derived points, tumbling windows and anomaly flags over committed readings.

Imported when a `[derived]` or `[processing]` section is configured (its config parser lives
here): it declares the one table it keeps (window watermarks, a projection of its own
`aggregate` events) before the store opens.
"""

from __future__ import annotations

from gateway.store.projections import register_projection
from gateway.store.schema import register_schema
from services.processing.projection import SCHEMA, WindowProjection

register_schema("processing", SCHEMA)
register_projection(WindowProjection())
