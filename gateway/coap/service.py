"""`CoapService`: the CoAP front door as a supervised service (started when `[coap]` exists).

It builds the resource tree, binds one UDP endpoint per configured address (plus DTLS-PSK
when some device has a PSK, and OSCORE when some device has a context), each with the
bounded `LeanMessageManager` (`gateway.coap.lean`; aiocoap's internals it needs are in
`gateway.coap.aiocoap_compat`), and feeds committed events to the Observe machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
from collections.abc import Mapping
from typing import Any

from gateway import events as ev
from gateway.aio import cancel_and_wait
from gateway.coap.config import CoapConfig
from gateway.service import Health, Service, ServiceContext

log = logging.getLogger("gateway.coap")


def _bind_host(addr: str) -> str:
    # aiocoap's UDP transport uses one AF_INET6 socket: IPv4 goes as a v4-mapped address.
    return f"::ffff:{addr}" if ":" not in addr else addr


class CoapServer:
    """The server without the supervisor: config + store in, bound contexts out.

    Used by `CoapService`, by tests that run it on its own, and by `bench/coap.py`."""

    def __init__(
        self,
        config: CoapConfig,
        store: Any,
        *,
        known: set[str] | None = None,
        logger: logging.Logger = log,
        devices: Mapping[str, Any] | None = None,
    ) -> None:
        """`known`: names of configured devices; `devices`: the configured `DeviceSpec`s
        (their names join `known`, their points' min/max bound posted values)."""
        from gateway.coap.rd import Directory, RdEntries, RdLookupResource, RdResource
        from gateway.coap.resources import (
            Backend,
            DeviceResource,
            Gate,
            TelemetryResource,
            WellKnownCore,
        )

        self.config = config
        self.store = store
        self.log = logger
        self._known = set(known or ())
        self.gate = Gate(config, log=logger)
        self.set_devices(devices or {})
        self.backend = Backend(store)
        self.telemetry = TelemetryResource(self.gate, self.backend)
        self.devices = DeviceResource(self.gate, self.backend, self.telemetry)
        self.directory = Directory(self.gate, self.backend, logger)

        from gateway.coap import aiocoap_compat

        site = aiocoap_compat.site_class()()
        site.add_resource((".well-known", "core"), WellKnownCore(site, self.gate, self.devices))
        site.add_resource(("telemetry",), self.telemetry)
        site.add_resource(("d",), self.devices)
        site.add_resource(("rd",), RdResource(self.directory))
        site.add_resource(("rd",), RdEntries(self.directory))
        site.add_resource(("rd-lookup", "ep"), RdLookupResource(self.directory, "ep"))
        site.add_resource(("rd-lookup", "res"), RdLookupResource(self.directory, "res"))
        self.site = site
        self.context: Any = None
        self.managers: list[Any] = []
        self._expiry: asyncio.Task[None] | None = None
        self.addresses: list[tuple[str, int, str]] = []  # (host, port, "udp"|"dtls")
        self.limiter: Any = None
        from gateway.coap.door import Door

        #: The datagram layer's checks and counts, shared by every UDP endpoint.
        self.door = Door(config.max_payload, logger)
        self.fast: list[Any] = []  # the fast ingest path of each UDP endpoint

    def set_devices(self, devices: Mapping[str, Any]) -> None:
        """The configured devices (`DeviceSpec`s; again after a reload): names no
        unauthenticated peer or RD endpoint may take, and the min/max of their points."""
        configured = self._known | set(devices)
        self.gate.configured = configured
        self.gate.known = configured | set(self.config.credentials)
        limits = {
            dev_id: {p.name: (p.min, p.max) for p in spec.points if (p.min, p.max) != (None, None)}
            for dev_id, spec in devices.items()
        }
        self.gate.limits = {d: pts for d, pts in limits.items() if pts}
        for dev_id in self.gate.known:  # configured now: no longer under the unknown caps
            self.gate.forget(dev_id)
        directory = getattr(self, "directory", None)  # (None while __init__ runs)
        if directory is not None:
            directory.forget_configured()

    def _credentials(self) -> Any:
        from aiocoap.credentials import DTLS, CredentialsMap

        creds = CredentialsMap()
        for device, c in self.config.credentials.items():
            if c.psk is not None and c.psk_identity is not None:
                # The entry's name is what aiocoap reports as the authenticated claim.
                creds[device] = DTLS(psk=c.psk, client_identity=c.psk_identity)
            if c.oscore_context is not None:
                from aiocoap.oscore import FilesystemSecurityContext

                ctx = FilesystemSecurityContext(c.oscore_context)
                ctx.authenticated_claims = [device]
                creds[f"oscore:{device}"] = ctx
        return creds

    async def start(self) -> None:
        from aiocoap.tokenmanager import TokenManager

        from gateway.coap import aiocoap_compat
        from gateway.coap.door import DoorUDP6, OncePerMinute
        from gateway.coap.fast import FastIngest
        from gateway.coap.lean import RateLimiter, message_manager_class

        await self.directory.load()
        for device, point in await self.store.read(_unknown_points):
            if not self.gate.is_known(device):
                self.gate.unknown.add(device)
                self.gate.unknown_points.setdefault(device, set()).add(point)
        creds = self._credentials()
        site: Any = self.site
        if any(c.oscore_context for c in self.config.credentials.values()):
            from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

            site = OscoreSiteWrapper(self.site, creds)
        loop = asyncio.get_running_loop()
        # aiocoap logs per datagram what any peer can make it say (a response nobody asked
        # for, a new request before the last was ACKed): one line per kind a minute.
        aiocoap_log = logging.getLogger("gateway.coap.aiocoap")
        if not any(isinstance(f, OncePerMinute) for f in aiocoap_log.filters):
            aiocoap_log.addFilter(OncePerMinute())
        ctx = aiocoap_compat.context_class()(
            loop=loop, serversite=site, loggername="gateway.coap.aiocoap", server_credentials=creds
        )
        self.context = ctx

        self.limiter = RateLimiter(self.config.rate_per_source, self.config.burst)
        udp = aiocoap_compat.udp_transport_class()  # DoorUDP6, or aiocoap's own

        async def add(constructor: Any, verify_address: bool = True) -> Any:
            tman = TokenManager(ctx)
            mman = message_manager_class()(
                tman, self.config.dedup_max, limiter=self.limiter, verify_address=verify_address
            )
            transport = await constructor(mman)
            mman.message_interface = transport
            tman.token_interface = mman
            ctx.request_interfaces.append(tman)
            self.managers.append(mman)
            return transport, mman

        try:
            for host in self.config.bind:
                transport, mman = await add(
                    lambda mman, host=host: udp.create_server_transport_endpoint(
                        mman,
                        log=ctx.log,
                        loop=loop,
                        bind=(_bind_host(host), self.config.port),
                        multicast=[],
                    )
                )
                if isinstance(transport, DoorUDP6):
                    transport.install(self.door)
                    # Telemetry POSTs skip aiocoap's per-message machinery, same rules.
                    fast = FastIngest(self.door, mman, self.telemetry, self.backend, self.log)
                    transport.fast = fast.udp(transport)
                    self.fast.append(fast)
                port = _local_port(transport, self.config.port)
                self.addresses.append((host, port, "udp"))
            if any(c.psk is not None for c in self.config.credentials.values()):
                dtls_class = aiocoap_compat.dtls_transport_class(self.log)
                for host in self.config.bind:
                    dtls, mman = await add(
                        lambda mman, host=host: dtls_class.create_server(
                            # aiocoap adds 1 (5683 -> 5684) to the port it is given.
                            (host, self.config.dtls_port - 1),
                            mman,
                            log=ctx.log,
                            loop=loop,
                            server_credentials=creds,
                        ),
                        verify_address=False,  # the DTLS handshake's cookie proved it
                    )
                    if dtls_class.__name__ == "DoorDTLS":
                        dtls.door = self.door
                        fast = FastIngest(self.door, mman, self.telemetry, self.backend, self.log)
                        dtls.fast = fast.dtls()
                        self.fast.append(fast)
                    self.addresses.append((host, self.config.dtls_port, "dtls"))
        except BaseException:
            await self.stop()
            raise
        self.store.add_listener(self.devices.on_commit)
        self.store.add_listener(self._on_commit)
        self._expiry = asyncio.create_task(self.directory.expire_forever(), name="coap:rd-expiry")
        self.log.info(
            "CoAP listening on %s", ", ".join(f"{k}://[{h}]:{p}" for h, p, k in self.addresses)
        )

    async def stop(self) -> None:
        if self._expiry is not None:
            await cancel_and_wait(self._expiry)
            self._expiry = None
        with contextlib.suppress(Exception):
            self.store.remove_listener(self.devices.on_commit)
        with contextlib.suppress(Exception):
            self.store.remove_listener(self._on_commit)
        if self.context is not None:
            ctx, self.context = self.context, None
            async with asyncio.timeout(5.0):  # not wait_for: it can swallow a cancellation
                await ctx.shutdown()
        self.managers.clear()
        self.fast.clear()
        self.door.log.flush()

    def _on_commit(self, events: Any) -> None:
        """A forgotten device leaves the caps' books (and the directory) at once."""
        for e in events:
            if e.type == ev.DEVICE_FORGOTTEN:
                device = ev.stream_device(e.stream)
                if device is None:
                    continue
                self.gate.forget(device)
                reg = self.directory.by_ep.get(device)
                if reg is not None:
                    self.directory._drop(reg)

    def figures(self) -> dict[str, Any]:
        return {
            "accepted": self.telemetry.accepted,
            "fast_path": sum(f.handled for f in self.fast),
            "observations": self.devices.observation_count,
            "registrations": len(self.directory.by_ep),
            "dedup_entries": sum(len(m.dedup) for m in self.managers),
            "dedup_early_evictions": sum(m.dedup.early_evictions for m in self.managers),
            "duplicates": sum(m.duplicates for m in self.managers),
            # Refused at the door (token bucket per sender), answers cut to 3x their request
            # (RFC 7252 section 11.3), and refusals past the caps on names (gate, RD).
            "rate_limited": self.limiter.refused if self.limiter is not None else 0,
            "responses_cut": sum(m.cut for m in self.managers),
            "unknown_devices": len(self.gate.unknown),
            "unknown_refused": self.gate.unknown_refused,
            "rd_refused": self.directory.refused,
            # Datagrams that broke RFC 7252's message format, by kind (gateway.coap.door).
            "rejected_datagrams": sum(self.door.rejected.values()),
            "rejected": dict(self.door.rejected),
        }


def _unknown_points(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(device, point) of devices known only from their readings (no row of their own)."""
    rows = conn.execute(
        "SELECT device, point FROM latest WHERE device NOT IN (SELECT id FROM devices)"
    ).fetchall()
    return [(str(d), str(p)) for d, p in rows]


def _local_port(transport: Any, default: int) -> int:
    """The port actually bound (differs from the config when it says 0)."""
    with contextlib.suppress(Exception):
        sock = transport.transport.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            return int(sock.getsockname()[1])
    return default


class CoapService(Service):
    name = "coap"

    def __init__(self) -> None:
        self.server: CoapServer | None = None

    async def start(self, ctx: ServiceContext) -> None:
        config = ctx.config.section("coap", CoapConfig)
        assert config is not None  # (started only with a [coap] section)
        self.server = CoapServer(config, ctx.store, logger=ctx.logger, devices=ctx.config.devices)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()

    async def reload(self, config: Any) -> None:
        # Devices added by a reload are protected at once ([coap] itself needs a restart).
        if self.server is not None:
            self.server.set_devices(config.devices)

    def health(self) -> Health:
        if self.server is None:
            return Health.degraded("not running")
        figures = self.server.figures()
        detail = ", ".join(f"{k}://[{h}]:{p}" for h, p, k in self.server.addresses)
        refused = [
            f"{figures[key]} {what}"
            for key, what in (
                ("rate_limited", "rate-limited"),
                ("unknown_refused", "refused past max_unknown_devices"),
                ("rd_refused", "refused past rd_max_registrations"),
                ("rejected_datagrams", "datagrams rejected (RFC 7252 message format)"),
            )
            if figures[key]
        ]
        return Health.ok("; ".join([detail, *refused]), **figures)

    def set_commands(self, device: str, commands: list[Any]) -> None:
        """For the control service: the commands waiting for `device` (observable)."""
        if self.server is not None:
            self.server.devices.set_commands(device, commands)
