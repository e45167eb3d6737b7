"""The MQTT link: connect to the first healthy endpoint (failover order), with exponential
backoff and full jitter between rounds and a circuit breaker per endpoint; publish at QoS 1
and hand back the broker's PUBACK reason code; take cloud commands from the command topic.

aiomqtt does the connection; two things it hides are taken from paho underneath it: the
PUBACK reason code (aiomqtt drops it, and it is how a broker refuses one message) and the
manual acknowledgement of incoming commands (a command is acked only after its event has
committed: acknowledged means durable). How they are reached is `gateway.sync.mqtt_compat`'s
business (the one place that touches either library's internals).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from gateway import events as ev
from gateway import names, secretfiles
from gateway.aio import wait_event
from gateway.breaker import Backoff as Backoff  # re-exported: the relay paces with it
from gateway.errors import ConfigError
from gateway.sync import mqtt_compat
from gateway.sync.codec import joined_payload
from gateway.sync.config import CONFIG_STREAM, EndpointConfig, SyncConfig
from gateway.sync.mqtt_errors import ConnectFailure, explain


class Ack(NamedTuple):
    """The receiver's answer to one batch: MQTT reason code (< 0x80 = accepted) and its name."""

    code: int
    reason: str

    @property
    def ok(self) -> bool:
        return self.code < 0x80


ACCEPTED = Ack(0, "Success")

# PUBACK codes that say "not now" rather than "never": retried after a reconnect.
TRANSIENT_CODES = frozenset({0x91, 0x97})  # packet identifier in use, quota exceeded


class LinkDownError(Exception):
    """The link went away while batches were in flight (they are sent again later)."""


class UnpublishableError(Exception):
    """A batch this sink can never take, for a reason of our own (a topic that would hold
    a wildcard or a control character, an argument the client library refuses): sending
    it again cannot help, so the relay dead-letters its events with this reason."""


class Channel(Protocol):
    """One connected session to a sink. `send` returns the receiver's Ack for one batch,
    or raises LinkDownError; `closed` resolves when the session ends."""

    label: str
    item_format: str  # how the relay encodes each event for this sink: "cbor" | "json"
    item_sep: bytes  # what goes between two encoded events in a batch
    closed: asyncio.Future[None]

    def send(
        self, lane: str, stream: str, type_: str, n: int, joined: bytes
    ) -> asyncio.Future[Ack]:
        """Send `n` encoded events joined by `item_sep` as one batch. Raises
        UnpublishableError (at once) for a batch that can never be sent."""
        ...

    def fits(self, lane: str, stream: str, type_: str, size: int) -> bool:
        """Whether a batch of `size` payload bytes is within the receiver's limit (may
        raise UnpublishableError, as `send`)."""
        ...

    async def close(self) -> None: ...


class Sink(Protocol):
    """Something the relay delivers to: `connect` returns a Channel (retrying as it sees fit)."""

    async def connect(self) -> Channel: ...

    def kick(self) -> None: ...

    def figures(self) -> dict[str, Any]: ...


# -- the MQTT channel ------------------------------------------------------------------------
DownlinkHandler = Callable[[bytes], Awaitable[bytes | None]]
#: A document from the config topic and the endpoint it came through (gateway.sync.remote_config).
ConfigHandler = Callable[[bytes, str], Awaitable[None]]


def _ack_resolver(acks: dict[int, asyncio.Future[Ack]]) -> mqtt_compat.PubackHandler:
    def resolve(mid: int, reason_code: Any) -> None:
        fut = acks.pop(mid, None)
        if fut is not None and not fut.done():
            code = int(getattr(reason_code, "value", 0) or 0)
            fut.set_result(Ack(code, str(reason_code) if code else "Success"))

    return resolve


class MqttChannel:
    """One connected MQTT session."""

    def __init__(
        self,
        client: Any,
        ep: EndpointConfig,
        cfg: SyncConfig,
        gateway_id: str,
        logger: logging.Logger,
        acks: dict[int, asyncio.Future[Ack]],
    ) -> None:
        """`client` from `mqtt_compat.make_client`; `acks` the futures its PUBACKs resolve."""
        self._client = client
        self._paho = client.paho
        self.ep = ep
        self.label = ep.label
        self.item_format = cfg.format
        self.item_sep = b"," if cfg.format == "json" else b""
        # The largest payload the broker takes (its Maximum Packet Size less the PUBLISH
        # header and topic, kept conservative), or our own `max_payload`; None: no limit.
        limits = [x for x in (cfg.max_payload, client.max_packet) if x]
        self.max_payload: int | None = min(limits) if limits else None
        self._cfg = cfg
        self._gw = gateway_id
        self._log = logger
        self._acks = acks
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._tasks: list[asyncio.Task[None]] = []
        self._props: Any = None
        self.config_downlink: ConfigHandler | None = None
        if cfg.mqtt_version == "5":
            self._props = mqtt_compat.publish_properties(cfg.format)
        client.session_end.add_done_callback(self._on_disconnected)

    def _on_disconnected(self, fut: asyncio.Future[None]) -> None:
        exc = fut.exception() if not fut.cancelled() else None
        self._fail_all(LinkDownError(f"{self.label}: connection lost ({exc or 'closed'})"))

    def _fail_all(self, exc: BaseException) -> None:
        acks = list(self._acks.values())
        self._acks.clear()
        for fut in acks:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: the relay may already have given up on it
        if not self.closed.done():
            self.closed.set_result(None)

    def fits(self, lane: str, stream: str, type_: str, size: int) -> bool:
        if self.max_payload is None:
            return True
        overhead = len(self.topic(lane, stream, type_).encode()) + 64  # header, properties
        return size + overhead <= self.max_payload

    def topic(self, lane: str, stream: str, type_: str) -> str:
        t = self._cfg.topics.backfill if lane == "backfill" else self._cfg.topics.telemetry
        if stream.startswith(ev.COMMAND_STREAM_PREFIX):
            t = self._cfg.topics.responses  # a command's lifecycle: where its requester listens
        # Names are checked where they enter (gateway.names); this is the last line: a
        # topic we publish on never holds a wildcard, NUL or a control character.
        for value in (stream, type_):
            problem = names.topic_segment_problem(value)
            if problem is not None:
                raise UnpublishableError(f"no valid topic: {problem}")
        if stream == CONFIG_STREAM:  # config changes are reported on the response topic
            t = self._cfg.topics.responses
        return t.format(gateway=self._gw, stream=stream, type=type_)

    def send(
        self, lane: str, stream: str, type_: str, n: int, joined: bytes
    ) -> asyncio.Future[Ack]:
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        if self.closed.done():
            fut.set_exception(LinkDownError(f"{self.label}: not connected"))
            return fut
        payload = joined_payload(self.item_format, n, joined)
        topic = self.topic(lane, stream, type_)
        try:
            info = self._paho.publish(topic, payload, 1, False, self._props)
        except (ValueError, TypeError) as exc:  # paho refuses its arguments: never sendable
            raise UnpublishableError(f"{self.label}: {exc}") from exc
        if info.rc != 0:
            fut.set_exception(LinkDownError(f"{self.label}: publish failed (paho rc {info.rc})"))
            return fut
        self._acks[info.mid] = fut
        return fut

    def start_downlink(self, handler: DownlinkHandler) -> None:
        self._tasks.append(
            asyncio.create_task(self._downlink(handler), name=f"sync-downlink-{self.label}")
        )

    async def subscribe_commands(self) -> None:
        topic = self._cfg.topics.commands.format(gateway=self._gw)
        if self._cfg.commands:
            await self._client.subscribe(topic, qos=1, timeout=self._cfg.connect_timeout)
        if self._cfg.remote_config and self.config_downlink is not None:
            topic = self._cfg.topics.config.format(gateway=self._gw)
            await self._client.subscribe(topic, qos=1, timeout=self._cfg.connect_timeout)

    async def _downlink(self, handler: DownlinkHandler) -> None:
        import aiomqtt

        responses = self._cfg.topics.responses.format(gateway=self._gw)
        config = self._cfg.topics.config.format(gateway=self._gw)
        try:
            async for msg in self._client.messages:
                payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
                try:
                    if self.config_downlink is not None and msg.topic.value == config:
                        await self.config_downlink(bytes(payload), self.label)
                        answer = None
                    else:
                        answer = await handler(bytes(payload))
                except Exception:
                    # Not acked: the broker sends it again on the next session.
                    self._log.exception("command handling failed; the broker will redeliver")
                    continue
                if answer is not None:
                    self._paho.publish(responses, answer, 1, False, None)
                if msg.qos > 0:
                    self._paho.ack(msg.mid, msg.qos)
        except aiomqtt.MqttError:
            return  # link down: the channel's `closed` tells the relay

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._fail_all(LinkDownError(f"{self.label}: closed"))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):  # not wait_for: it can swallow a cancellation
                await self._client.__aexit__(None, None, None)


# -- the link ---------------------------------------------------------------------------------
class MqttLink:
    """Connects to the configured endpoints; `connect()` returns once a session is up."""

    def __init__(
        self,
        cfg: SyncConfig,
        gateway_id: str,
        logger: logging.Logger,
        downlink: DownlinkHandler | None = None,
        rng: Callable[[], float] = random.random,
        config_downlink: ConfigHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.log = logger
        self.downlink = downlink
        self.config_downlink = config_downlink
        self.backoff = cfg.retry.backoff(rng)
        self.breakers = {ep.label: cfg.breaker.breaker() for ep in cfg.endpoints}
        self.endpoint: str | None = None
        self.last_error: str | None = None
        self.last_error_at = 0.0  # monotonic time of last_error
        self._error_ep: str | None = None  # the endpoint last_error is about
        self.failures = 0
        self.connects = 0
        self._kick = asyncio.Event()
        self._warned: set[str] = set()
        mqtt_compat.check(logger)  # which of the libraries' internals to use: said once

    def kick(self) -> None:
        """Retry now: forget backoff and open breakers, cut the current wait short."""
        self.backoff.reset()
        for b in self.breakers.values():
            b.reset()
        self._kick.set()

    def figures(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "endpoint": self.endpoint,
            "breakers": {k: b.state_at(now).value for k, b in self.breakers.items()},
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "connect_failures": self.failures,
            "connects": self.connects,
        }

    def _tls_context(self, ep: EndpointConfig) -> _TrackingContext:
        ctx = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
        if ep.ca_file:
            ctx.load_verify_locations(cafile=ep.ca_file)
        else:
            ctx.load_default_certs()
        if ep.cert_file:
            if ep.key_file:
                secretfiles.read(ep.key_file, f"{ep.path}.key_file")  # refused if world-readable
            ctx.load_cert_chain(ep.cert_file, ep.key_file)
        return ctx

    def _password(self, ep: EndpointConfig) -> str | None:
        if ep.password_file:
            data = secretfiles.read(ep.password_file, f"{ep.path}.password_file")
            try:
                return data.decode("utf-8").strip("\r\n")
            except UnicodeDecodeError:
                raise ConfigError("is not UTF-8 text", f"{ep.path}.password_file") from None
        return ep.password

    async def _try(self, ep: EndpointConfig) -> MqttChannel:
        try:
            tls = self._tls_context(ep) if ep.tls else None
            password = self._password(ep)
        except (OSError, ssl.SSLError, ConfigError) as exc:
            raise _HardError(f"{ep.label}: cannot load credentials ({exc})") from exc
        try:
            return await self._attempt(ep, tls, password)
        except BaseException:
            if tls is not None:
                tls.close_all()  # paho leaks the socket of a failed TLS handshake
            raise

    async def _attempt(
        self, ep: EndpointConfig, tls: _TrackingContext | None, password: str | None
    ) -> MqttChannel:
        import aiomqtt
        import paho.mqtt.client as mqtt

        v5 = self.cfg.mqtt_version == "5"
        props: Any = None
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.cfg.session_expiry
        client_id = self.cfg.client_id or f"gatewayd-{self.gateway_id}"
        acks: dict[int, asyncio.Future[Ack]] = {}
        client: Any = mqtt_compat.make_client(
            _ack_resolver(acks),
            hostname=ep.host, port=ep.port,
            username=ep.username, password=password, identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else False,
            # MQTT 5: resume the session (the broker keeps it `session_expiry` seconds);
            # 3.1.1 does the same through clean_session=False.
            clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            keepalive=self.cfg.keepalive,
            timeout=self.cfg.connect_timeout,
            max_inflight_messages=max(self.cfg.inflight, 20),
            properties=props,
            tls_context=tls,
            logger=self.log.getChild("paho"),
        )  # fmt: skip
        client.paho.manual_ack_set(True)
        # paho only logs a socket error seen while waiting for CONNACK (a TLS alert when the
        # broker rejects our certificate): catch it, so the attempt fails now and says why.
        catcher = _PahoErrors()
        paho_log = self.log.getChild("paho")
        paho_log.addFilter(catcher)
        try:
            entering = asyncio.ensure_future(client.__aenter__())
            await asyncio.wait(
                [entering, catcher.failed], timeout=self.cfg.connect_timeout + 1,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            if not entering.done():
                entering.cancel()
                with contextlib.suppress(BaseException):
                    await entering
                with contextlib.suppress(Exception):
                    client.paho.disconnect()
                raise ConnectionError(catcher.message or "no CONNACK in time")
            entering.result()
        finally:
            paho_log.removeFilter(catcher)
            if not catcher.failed.done():
                catcher.failed.cancel()
        ch = MqttChannel(client, ep, self.cfg, self.gateway_id, self.log, acks)
        try:
            ch.config_downlink = self.config_downlink
            if self.downlink is not None and (self.cfg.commands or self.cfg.remote_config):
                ch.start_downlink(self.downlink)
                await ch.subscribe_commands()
        except BaseException:
            await ch.close()
            raise
        return ch

    async def connect(self) -> MqttChannel:
        """Try the endpoints in order (skipping open breakers); between rounds wait a
        jittered backoff. Never raises for a failed attempt: it logs it and retries."""
        while True:
            self._kick.clear()
            for ep in self.cfg.endpoints:
                br = self.breakers[ep.label]
                if not br.allow(time.monotonic()):
                    continue
                try:
                    ch = await self._try(ep)
                except asyncio.CancelledError:
                    br.abandon()  # no outcome: a half-open trial must not keep its slot
                    raise
                except Exception as exc:
                    fail = (
                        ConnectFailure(str(exc), True) if isinstance(exc, _HardError)
                        else explain(ep, exc)
                    )  # fmt: skip
                    br.failure(time.monotonic(), fail.message, auth=fail.hard)
                    self.failures += 1
                    self.last_error, self._error_ep = fail.message, ep.label
                    self.last_error_at = time.monotonic()
                    # First failure of a kind at WARNING, repeats at DEBUG (flapping links).
                    if fail.message not in self._warned:
                        self._warned.add(fail.message)
                        self.log.warning("sync: %s", fail.message)
                    else:
                        self.log.debug("sync: %s", fail.message)
                    continue
                br.success()
                self.backoff.reset()
                if self._error_ep == ep.label:  # connected there: its failure is over
                    self.last_error = self._error_ep = None
                self.endpoint = ep.label
                self.connects += 1
                if self._warned:
                    self.log.info("sync: connected to %s", ep.label)
                self._warned.clear()
                return ch
            self.endpoint = None
            delay = self.backoff.next()
            now = time.monotonic()
            opens = [b.wait(now) for b in self.breakers.values() if not b.ready(now)]
            if len(opens) == len(self.breakers):  # every endpoint is resting
                delay = max(delay, min(opens))
            await wait_event(self._kick, delay)


class _TrackingContext(ssl.SSLContext):
    """An SSLContext that remembers the sockets it wrapped, so a failed attempt can close
    them (paho drops the socket of a failed handshake without closing it)."""

    sockets: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        if not hasattr(self, "sockets"):
            self.sockets = []
        self.sockets.append(sock)
        return sock

    def close_all(self) -> None:
        for sock in getattr(self, "sockets", []):
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets = []


class _PahoErrors(logging.Filter):
    """Keeps paho's error log lines of one connection attempt (and keeps them out of the
    log: the link reports one clear line of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.message = ""
        self._loop = asyncio.get_running_loop()
        self.failed: asyncio.Future[None] = self._loop.create_future()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.message = record.getMessage()
        # paho may log from the executor thread that runs its blocking connect().
        self._loop.call_soon_threadsafe(self._fail)
        return False

    def _fail(self) -> None:
        if not self.failed.done():
            self.failed.set_result(None)


class _HardError(Exception):
    """A failure that will not fix itself by retrying soon (bad credentials files)."""
