"""aiocoap's private names used by the CoAP driver (the client side), in one place
(pyproject caps aiocoap). The front door's are in `gateway.coap.aiocoap_compat`; the driver
does not import the front door's package (importing it registers the door's schema).

aiocoap has no public release for an OSCORE filesystem context: `_destroy()` persists the
sequence number and frees the directory's lock, so the next user (a restart) can load it.
Stock path when that differs: the context is released by aiocoap's own `__del__` when the
last reference to it goes. `check()` runs when the driver starts; a difference is said once.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.compat import wrong_signatures

log = logging.getLogger("drivers.coap")

_checked: bool | None = None


def check(logger: logging.Logger = log) -> bool:
    """Whether aiocoap's OSCORE context has `_destroy(self)` (once per process; `reset()`
    forgets the answer); if not, one line in the log."""
    global _checked
    if _checked is None:
        _checked = _shape_ok()
        if not _checked:
            from importlib.metadata import version

            logger.warning(
                "coap: aiocoap %s internals differ (FilesystemSecurityContext._destroy): "
                "OSCORE contexts are released when aiocoap collects them",
                version("aiocoap"),
            )
    return _checked


def reset() -> None:
    """Forget the checked answer (tests that simulate other internals)."""
    global _checked
    _checked = None


def _shape_ok() -> bool:
    try:
        from aiocoap.oscore import FilesystemSecurityContext
    except ImportError:  # no OSCORE extra: nothing to release either
        return True
    return not wrong_signatures(FilesystemSecurityContext, {"_destroy": ("self",)})


def release_oscore(context: Any) -> None:
    """Persist and unlock an OSCORE filesystem context now (stock path: when collected)."""
    if context is not None and getattr(context, "lockfile", None) is not None and check():
        context._destroy()
