"""The one place where an exception becomes a CoAP response.

Our `GatewayError`s carry their code (`coap_code`); a few add an option (Size1 for 4.13,
Max-Age for 5.03). aiocoap's own renderable errors keep their rendering. Anything else is
a bug: 5.00, logged with its traceback, and the client learns nothing about our internals.
"""

from __future__ import annotations

import logging

from aiocoap import Code, Message
from aiocoap import error as coap_error

from gateway.errors import (
    CapacityError,
    GatewayError,
    PayloadTooLargeError,
    StoreClosedError,
    StoreFullError,
)

#: Diagnostic payloads are for humans reading a packet capture; keep them one datagram.
MAX_DIAGNOSTIC = 120


def _code(text: str) -> Code:
    cls, _, detail = text.partition(".")
    return Code((int(cls) << 5) | int(detail))


def diagnostic(text: str) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_DIAGNOSTIC:
        return raw
    return raw[: MAX_DIAGNOSTIC - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


def error_response(exc: BaseException, log: logging.Logger) -> Message:
    """A response for `exc` (the request failed); never raises."""
    if isinstance(exc, GatewayError):
        msg = Message(code=_code(exc.coap_code), payload=diagnostic(exc.message))
        if isinstance(exc, PayloadTooLargeError):
            msg.opt.size1 = exc.limit
        if isinstance(exc, StoreFullError | StoreClosedError | CapacityError):
            msg.opt.max_age = max(1, int(exc.retry_after))
        log.debug("request refused: %s %s", exc.coap_code, exc.message)
        return msg
    if isinstance(exc, coap_error.RenderableError):
        try:
            rendered: Message = exc.to_message()
            return rendered
        except Exception:
            log.exception("rendering %r failed", exc)
            return Message(code=Code.INTERNAL_SERVER_ERROR)
    log.error("unexpected error while serving a CoAP request", exc_info=exc)
    return Message(code=Code.INTERNAL_SERVER_ERROR)
