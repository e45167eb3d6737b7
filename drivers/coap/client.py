"""One device's CoAP client link over aiocoap: context, credentials, requests, observations.

This is the only module of the driver that imports aiocoap; the driver imports it in
`start()`. Every aiocoap failure is turned into the gateway's error hierarchy here, so the
rest of the driver never sees an aiocoap exception type.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiocoap
import aiocoap.error
from aiocoap import defaults as aiocoap_defaults

from drivers.coap import aiocoap_compat
from drivers.coap.options import CoapDevice
from gateway import secretfiles
from gateway.config import join_path
from gateway.errors import (
    ConfigError,
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    DriverError,
)

_METHODS = {"GET": aiocoap.GET, "PUT": aiocoap.PUT, "POST": aiocoap.POST,
            "DELETE": aiocoap.DELETE, "FETCH": aiocoap.FETCH}  # fmt: skip

#: RFC 7252 section 5.10.5: Max-Age defaults to 60 s when the option is absent.
DEFAULT_MAX_AGE = 60.0


@dataclass(frozen=True, slots=True)
class Response:
    """A response, stripped of aiocoap types."""

    code: str  # "2.05"
    payload: bytes
    content_format: int | None
    max_age: float  # seconds (the option, or the RFC default)
    observe: int | None  # the Observe option's sequence number, when present
    url: str

    @property
    def ok(self) -> bool:
        return self.code.startswith("2.")


def _code(message: Any) -> str:
    c = int(message.code)
    return f"{c >> 5}.{c & 0x1F:02d}"


def to_response(message: Any, url: str) -> Response:
    cf = message.opt.content_format
    max_age = message.opt.max_age
    return Response(
        code=_code(message), payload=bytes(message.payload),
        content_format=int(cf) if cf is not None else None,
        max_age=float(max_age) if max_age is not None else DEFAULT_MAX_AGE,
        observe=message.opt.observe, url=url,
    )  # fmt: skip


class DeviceAuthError(DeviceUnavailableError):
    """The device refused our credentials (4.01) or the DTLS handshake failed fatally."""


def protocol_error(device: str, resp: Response) -> DeviceProtocolError:
    diag = resp.payload[:80].decode("utf-8", "replace") if resp.payload else ""
    text = f"{resp.url}: {resp.code}" + (f" {diag!r}" if diag else "")
    if resp.code in ("4.01", "4.03"):
        return _AuthProtocolError(device, text, resp.code)
    return DeviceProtocolError(device, text, resp.code)


class _AuthProtocolError(DeviceProtocolError):
    """A 4.01/4.03 answer: the link works but our credentials are refused."""


def is_auth_failure(exc: BaseException) -> bool:
    return isinstance(exc, DeviceAuthError | _AuthProtocolError)


def load_psk(device: CoapDevice) -> bytes:
    """The device's PSK. A key file must not be readable by group or others."""
    creds = device.credentials
    path = join_path(join_path("devices", device.id), "psk_key_file")
    if creds.psk_key is not None:
        return creds.psk_key.encode("utf-8")
    assert creds.psk_key_file is not None
    p = secretfiles.resolve(creds.psk_key_file)  # $CREDENTIALS_DIRECTORY (LoadCredential=)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key file {p}: {exc.strerror}", path) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"key file {p} is readable by others: chmod 600 it", path)
    key = data.rstrip(b"\r\n")
    if not key:
        raise ConfigError(f"key file {p} is empty", path)
    return key


def load_oscore(device: CoapDevice) -> Any:
    """The device's OSCORE security context (aiocoap's directory layout, locked while used)."""
    path = join_path(join_path("devices", device.id), "oscore")
    missing = aiocoap_defaults.oscore_missing_modules()
    if missing:
        raise ConfigError(
            f"OSCORE needs the Python packages {', '.join(missing)} "
            "(install gatewayd[oscore])", path,
        )  # fmt: skip
    from aiocoap.oscore import FilesystemSecurityContext

    directory = device.credentials.oscore
    assert directory is not None
    if not os.path.isdir(directory):
        raise ConfigError(f"OSCORE context directory {directory} does not exist", path)
    problem = secretfiles.oscore_problem(directory)
    if problem is not None:
        raise ConfigError(problem, path)
    try:
        return FilesystemSecurityContext(directory)
    except Exception as exc:  # LoadError, a held lock (Timeout), unreadable files
        raise ConfigError(f"cannot load OSCORE context {directory}: {exc}", path) from None


def release_oscore(context: Any) -> None:
    # aiocoap has no public release for a filesystem context: see drivers.coap.aiocoap_compat.
    aiocoap_compat.release_oscore(context)


def credentials_patterns(uri: str) -> list[str]:
    """The URI patterns under which aiocoap must find a device's credentials: it matches the
    request URI as written, so `coaps://h` and `coaps://h:5684` are both registered."""
    parts = urlsplit(uri)
    default = {"coap": 5683, "coaps": 5684}[parts.scheme]
    host = parts.netloc if parts.port is None else parts.netloc[: parts.netloc.rfind(":")]
    if parts.port is None or parts.port == default:
        return [f"{parts.scheme}://{host}/*", f"{parts.scheme}://{host}:{default}/*"]
    return [f"{parts.scheme}://{parts.netloc}/*"]


class Link:
    """A device's aiocoap client context, created on first use and dropped after failures
    (a fresh context also means a fresh DTLS session when the device restarted)."""

    def __init__(self, device: CoapDevice, logger: logging.Logger) -> None:
        self.device = device
        self.log = logger
        self._ctx: Any = None
        self._creating: asyncio.Lock = asyncio.Lock()
        self._psk: bytes | None = None
        self._oscore: Any = None
        creds = device.credentials
        if creds.kind == "dtls-psk":
            missing = aiocoap_defaults.dtls_missing_modules()
            if missing:
                raise ConfigError(
                    f"coaps:// needs the Python package {', '.join(missing)} "
                    "(install gatewayd[dtls])", join_path(join_path("devices", device.id), "uri"),
                )  # fmt: skip
            self._psk = load_psk(device)
        elif creds.kind == "oscore":
            self._oscore = load_oscore(device)

    def _transports(self) -> list[str]:
        kind = self.device.credentials.kind
        if kind == "dtls-psk":
            return ["tinydtls"]
        if kind == "oscore":
            return ["oscore", "udp6"]
        return ["udp6"]

    async def context(self) -> Any:
        async with self._creating:
            if self._ctx is None:
                try:
                    ctx = await aiocoap.Context.create_client_context(
                        transports=self._transports(), loggername=f"coap.client.{self.device.id}"
                    )
                except OSError as exc:
                    raise DeviceUnavailableError(
                        self.device.id, f"cannot open a socket: {exc}"
                    ) from exc
                creds = self.device.credentials
                entry: Any = None
                if creds.kind == "dtls-psk":
                    assert creds.psk_identity is not None and self._psk is not None
                    entry = aiocoap.credentials.DTLS(
                        psk=self._psk, client_identity=creds.psk_identity.encode("utf-8")
                    )
                elif creds.kind == "oscore":
                    entry = self._oscore
                if entry is not None:
                    for pattern in credentials_patterns(self.device.uri):
                        ctx.client_credentials[pattern] = entry
                self._ctx = ctx
            return self._ctx

    async def reset(self) -> None:
        """Drop the context (sockets, DTLS sessions, exchanges); the next use makes a new one."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            await asyncio.sleep(0)  # let aiocoap run the done-callbacks of cancelled requests
            try:
                await ctx.shutdown()
            except Exception:  # a half-dead context must not take the driver down with it
                self.log.debug("coap device %s: context shutdown", self.device.id, exc_info=True)

    async def close(self) -> None:
        await self.reset()
        release_oscore(self._oscore)
        self._oscore = None

    def _message(self, method: str, url: str, payload: bytes, cf: int | None, obs: bool) -> Any:
        msg = aiocoap.Message(code=_METHODS[method], uri=url, payload=payload)
        if cf is not None:
            msg.opt.content_format = cf
        if obs:
            msg.opt.observe = 0
        return msg

    def _failure(self, exc: BaseException, url: str, timeout: float) -> DriverError:
        dev = self.device.id
        if isinstance(exc, asyncio.TimeoutError | aiocoap.error.TimeoutError):
            return DeviceTimeoutError(dev, f"{url}: no answer within {timeout:g} s")
        if isinstance(exc, aiocoap.error.ResolutionError):
            return DeviceUnavailableError(dev, f"{url}: cannot resolve host: {exc}")
        if isinstance(exc, aiocoap.credentials.CredentialsMissingError):
            return DeviceUnavailableError(dev, f"{url}: no credentials for this URI: {exc}")
        name = type(exc).__name__
        if name in ("FatalDTLSError", "CloseNotifyReceived"):
            return DeviceAuthError(dev, f"{url}: DTLS session failed ({name})")
        if isinstance(exc, OSError):
            return DeviceUnavailableError(dev, f"{url}: {exc.strerror or exc}")
        if isinstance(exc, aiocoap.error.NetworkError):
            # aiocoap's text is only the class name; the OSError behind it says what happened
            # ("Connection refused": the host is there, nothing listens on that port).
            cause = exc.__cause__
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else name
            return DeviceUnavailableError(dev, f"{url}: {why}")
        return DeviceUnavailableError(dev, f"{url}: {name}: {exc}")

    async def request(
        self,
        method: str,
        url: str,
        *,
        payload: bytes = b"",
        content_format: int | None = None,
        within: float | None = None,
    ) -> Response:
        """One request; a 4.xx/5.xx answer is returned (the caller decides), failures raise."""
        t = within if within is not None else self.device.timeout
        ctx = await self.context()
        try:
            req = ctx.request(self._message(method, url, payload, content_format, False))
        except Exception as exc:  # a malformed URI, a missing transport
            raise self._failure(exc, url, t) from exc
        message = await self._response(req, url, t)
        return to_response(message, url)

    async def _response(self, req: Any, url: str, t: float) -> Any:
        # Not `asyncio.timeout` around `await req.response`: that cancels aiocoap's future
        # itself, and aiocoap learns of it only in a done-callback one loop turn later; a
        # context shutdown in between makes aiocoap set a result on the cancelled future
        # (InvalidStateError). Waiting without cancelling, then cancelling and yielding once,
        # lets aiocoap drop the exchange (and its retransmissions) first.
        try:
            done, _ = await asyncio.wait({req.response}, timeout=t)
        except asyncio.CancelledError:
            req.response.cancel()
            raise
        if not done:
            req.response.cancel()
            await asyncio.sleep(0)
            raise self._failure(TimeoutError(), url, t)
        try:
            return req.response.result()
        except Exception as exc:
            raise self._failure(exc, url, t) from exc

    async def observe(self, url: str, *, within: float | None = None) -> Observation:
        """Register an observation; returns it with its first response (any code)."""
        t = within if within is not None else self.device.timeout
        ctx = await self.context()
        try:
            req = ctx.request(self._message("GET", url, b"", None, True))
        except Exception as exc:
            raise self._failure(exc, url, t) from exc
        message = await self._response(req, url, t)
        return Observation(self, req, to_response(message, url), url)


class Observation:
    """A registered observation: its first response and an iterator of notifications."""

    def __init__(self, link: Link, request: Any, first: Response, url: str) -> None:
        self._link = link
        self._request = request
        self.first = first
        self.url = url
        self._iter: Any = None
        self._pending: asyncio.Future[Any] | None = None

    @property
    def active(self) -> bool:
        """The server accepted the registration (it answered 2.xx with an Observe option)."""
        return self.first.ok and self.first.observe is not None

    async def next(self, deadline: float) -> Response | None:
        """The next notification, or None when none came within `deadline` seconds (the
        observation is then presumed lost). Raises DriverError when the server ended it."""
        if self._iter is None:
            self._iter = self._request.observation.__aiter__()
        if self._pending is None:
            # Not wait_for: cancelling aiocoap's iterator step would break the iterator.
            self._pending = asyncio.ensure_future(self._iter.__anext__())
        done, _ = await asyncio.wait({self._pending}, timeout=deadline)
        if not done:
            return None
        fut, self._pending = self._pending, None
        try:
            message = fut.result()
        except StopAsyncIteration:
            raise DeviceProtocolError(
                self._link.device.id, f"{self.url}: the server ended the observation"
            ) from None
        except Exception as exc:
            raise self._link._failure(exc, self.url, deadline) from exc
        return to_response(message, self.url)

    def cancel(self) -> None:
        """Forget the observation locally; aiocoap answers its next notification with a RST,
        which deregisters us on the server (RFC 7641 section 3.6)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        obs = self._request.observation
        if obs is not None and not obs.cancelled:
            obs.cancel()
        if not self._request.response.done():
            self._request.response.cancel()

    async def notifications(self, deadline: float) -> AsyncIterator[Response]:
        while True:
            resp = await self.next(deadline)
            if resp is None:
                return
            yield resp
