"""CoAP front door: SenML ingest, device state with Observe, Resource Directory, DTLS/OSCORE.

The server is `gateway.coap.service.CoapService`; its table (`coap_rd`) is registered with
the store by `gateway.coap.projection.register`, which the daemon calls (through
`gateway.parts`) before the store opens. Importing this package does nothing: the CoAP
driver uses its SenML codec without the front door.
"""
