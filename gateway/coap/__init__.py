"""CoAP front door: SenML ingest, device state with Observe, Resource Directory, DTLS/OSCORE.

Importing this package registers the `coap` schema and the RD projection with the store
(cheap: no aiocoap import); the server itself is `gateway.coap.service.CoapService`.
"""

from gateway.coap.projection import SCHEMA, RdProjection
from gateway.store.projections import register_projection
from gateway.store.schema import register_schema

register_schema("coap", SCHEMA)
register_projection(RdProjection())
