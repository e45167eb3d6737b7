"""CoAP device driver: the gateway as a CoAP client of devices serving their own resources.

Importing this package does not import aiocoap (config check stays cheap): the driver loads
its client module in `start()`.
"""

from drivers.coap.driver import CoapDriver

__all__ = ["CoapDriver"]
