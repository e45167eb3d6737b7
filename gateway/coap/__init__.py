"""CoAP front door: SenML ingest, device state with Observe, Resource Directory, DTLS/OSCORE.

Importing this package registers the `coap` schema and the RD projection with the store
(cheap: no aiocoap import); the server itself is `gateway.coap.service.CoapService`.
"""

from typing import cast

from gateway.coap.projection import SCHEMA, RdProjection
from gateway.store.projections import Projection, register_projection
from gateway.store.schema import register_schema

register_schema("coap", SCHEMA)
# cast: the store's Projection protocol currently also lists a private helper
# (`_apply_other`) that only DeviceProjection has; RdProjection implements the real contract.
register_projection(cast(Projection, RdProjection()))
