"""Every use of paho-mqtt's and aiomqtt's private names, in one place (pyproject caps both).

The link needs three things aiomqtt hides, and one thing paho does slowly:
- the paho client under aiomqtt's (`Client._client`: manual acks, a publish that returns its
  packet id at once); there is no stock path without it, so a client without one is refused
  with a clear error;
- the PUBACK reason code and the broker's Maximum Packet Size: taken by overriding aiomqtt's
  `_on_publish`/`_on_connect` (patched path) or, when those differ, by chaining paho's public
  `on_publish`/`on_connect`/`on_disconnect` callbacks (stock path);
- a plain success PUBACK taken without paho's decoding (`fast_puback`, paho's private
  `_handle_pubackcomp`/`_do_on_publish`; stock path: paho's own handling);
- PUBLISH properties packed once (paho packs them on every publish; stock path: paho does).

`check()` runs at the link's start: what does not have the expected shape takes the stock
path, said once in the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.compat import wrong_signatures

log = logging.getLogger("gateway.sync")

# The private names relied on, with their parameters as in paho-mqtt 2.1/2.2, aiomqtt 2.x.
PAHO_METHODS = {
    "_handle_pubackcomp": ("self", "cmd"),
    "_do_on_publish": ("self", "mid", "reason_code", "properties"),
}
PAHO_ATTRS = ("_in_packet", "_out_messages", "_out_message_mutex")  # per instance
AIOMQTT_METHODS = {
    "_on_connect": ("self", "client", "userdata", "flags", "reason_code", "properties"),
    "_on_publish": ("self", "client", "userdata", "mid", "reason_code", "properties"),
}


#: Called with a PUBACK's packet id and paho's ReasonCode.
PubackHandler = Callable[[int, Any], None]


@dataclass(frozen=True, slots=True)
class Internals:
    """Which patched paths this process takes (False: the library's stock path)."""

    client_hooks: bool  # aiomqtt's _on_connect/_on_publish overridden
    fast_puback: bool  # paho's PUBACK handler short-cut for plain successes
    packed_properties: bool  # PUBLISH properties packed once


_checked: Internals | None = None


def check(logger: logging.Logger = log) -> Internals:
    """Verify the internals relied on (once per process; `reset()` forgets the answer) and
    log one line naming what falls back to the stock path."""
    global _checked
    if _checked is not None:
        return _checked
    import aiomqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties

    wrong_aiomqtt = wrong_signatures(aiomqtt.Client, AIOMQTT_METHODS, qualified=False)
    wrong_paho = wrong_signatures(mqtt.Client, PAHO_METHODS, qualified=False)
    packs = wrong_signatures(Properties, {"pack": ("self",)}, qualified=False)
    _checked = Internals(not wrong_aiomqtt, not wrong_paho, not packs)
    wrong = [f"aiomqtt.Client.{n}" for n in wrong_aiomqtt]
    wrong += [f"paho Client.{n}" for n in wrong_paho] + [f"paho Properties.{n}" for n in packs]
    if wrong:
        logger.warning(
            "sync: MQTT library internals differ (%s; paho-mqtt %s, aiomqtt %s): using the "
            "stock path for them",
            ", ".join(wrong), getattr(mqtt, "__version__", "?"), _version("aiomqtt"),
        )  # fmt: skip
    return _checked


def reset() -> None:
    """Forget the checked answer (tests that simulate other internals)."""
    global _checked
    _checked = None


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# -- the client ----------------------------------------------------------------------------
def _note_connect(client: Any, properties: Any) -> None:
    # MQTT 5: the broker says how big a packet it takes; bigger ones get us kicked.
    size = getattr(properties, "MaximumPacketSize", None) if properties else None
    client.max_packet = int(size) if isinstance(size, int) else None


def _note_publish(client: Any, mid: int, reason_code: Any) -> None:
    client.on_puback(mid, reason_code)


def _hooked_class() -> type[Any]:
    import aiomqtt

    class _Client(aiomqtt.Client):
        """aiomqtt's client, keeping the PUBACK reason code and the broker's packet limit."""

        def _on_connect(
            self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
        ) -> None:
            _note_connect(self, properties)
            super()._on_connect(client, userdata, flags, reason_code, properties)

        def _on_publish(
            self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
        ) -> None:
            _note_publish(self, mid, reason_code)
            super()._on_publish(client, userdata, mid, reason_code, properties)

    return _Client


def _chain(client: Any, paho: Any) -> None:
    """The stock path: aiomqtt's own callbacks stay, ours run before them (paho's public
    callback properties), and the session's end is a future of our own."""
    on_connect, on_publish, on_disconnect = paho.on_connect, paho.on_publish, paho.on_disconnect
    ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connected(c: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        _note_connect(client, properties)
        on_connect(c, userdata, flags, rc, properties)

    def published(c: Any, userdata: Any, mid: int, rc: Any, properties: Any) -> None:
        _note_publish(client, mid, rc)
        on_publish(c, userdata, mid, rc, properties)

    def disconnected(c: Any, userdata: Any, flags: Any, rc: Any, properties: Any = None) -> None:
        if not ended.done():
            ended.set_result(None)
        on_disconnect(c, userdata, flags, rc, properties)

    paho.on_connect, paho.on_publish, paho.on_disconnect = connected, published, disconnected
    client.session_end = ended


def make_client(on_puback: PubackHandler, **kwargs: Any) -> Any:
    """An aiomqtt client (aiomqtt's keyword arguments) that calls `on_puback(mid, reason
    code)` for every PUBACK, with `max_packet` (the broker's, once connected), `paho` (the
    paho client under it) and `session_end` (a future that resolves when the session ends),
    by the patched or the stock path."""
    import paho.mqtt.client as mqtt

    found = check()
    if found.client_hooks:
        client = _hooked_class()(**kwargs)
    else:
        import aiomqtt

        client = aiomqtt.Client(**kwargs)
    paho = getattr(client, "_client", None)
    if not isinstance(paho, mqtt.Client):  # no stock path without it: pyproject caps aiomqtt
        raise RuntimeError(
            f"aiomqtt {_version('aiomqtt')} keeps no paho client in Client._client: "
            "this gatewayd needs an aiomqtt within its pyproject bounds"
        )
    client.paho = paho
    client.on_puback = on_puback
    client.max_packet = None
    if found.client_hooks and isinstance(getattr(client, "_disconnected", None), asyncio.Future):
        client.session_end = client._disconnected
    else:
        _chain(client, paho)
    if found.fast_puback:
        fast_puback(paho)
    return client


def fast_puback(paho: Any) -> bool:
    """Let paho take a plain success PUBACK without decoding it. For every PUBACK paho
    builds two Properties and two ReasonCode objects and formats a debug line: about a
    quarter of the event loop's time per batch in a drain. A PUBACK that is a packet id and
    at most a success reason code (< 0x80) with no properties is handed to paho's own
    completion (`_do_on_publish`: the same bookkeeping and callbacks) with a shared
    ReasonCode; any other PUBACK (a refusal, properties) and every PUBCOMP take paho's own
    path. Installed only on a paho that has the private names it uses (paho 2.x); returns
    whether it was."""
    wrong = wrong_signatures(type(paho), PAHO_METHODS, qualified=False)
    if wrong or not all(hasattr(paho, n) for n in PAHO_ATTRS):
        return False
    if not isinstance(getattr(paho, "_in_packet", None), dict):
        return False
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    codes: dict[int, Any] = {}  # reason code -> paho's ReasonCode, made once
    no_props = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
    slow = paho._handle_pubackcomp
    mutex = paho._out_message_mutex
    done = paho._do_on_publish

    def handle(cmd: str) -> Any:
        packet = paho._in_packet["packet"]  # (a new dict for every packet read)
        n = len(packet)
        # Packet id [+ reason code < 0x80 [+ empty properties]]: e.g. Mosquitto's 0x10 "No
        # matching subscribers" is a success with nobody subscribed.
        if cmd != "PUBACK" or not 2 <= n <= 4 or (n > 2 and packet[2] >= 0x80) or (
            n == 4 and packet[3] != 0
        ):  # fmt: skip
            return slow(cmd)
        code = packet[2] if n > 2 else 0
        reason = codes.get(code)
        if reason is None:
            try:
                reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
            except Exception:  # a code paho does not know: its own path says so
                return slow(cmd)
            codes[code] = reason
        mid = (packet[0] << 8) | packet[1]
        with mutex:
            if mid in paho._out_messages:
                return done(mid, reason, no_props)
        return 0  # MQTT_ERR_SUCCESS: a PUBACK for nothing we wait for, as paho does

    paho._handle_pubackcomp = handle
    return True


def publish_properties(fmt: str) -> Any:
    """The MQTT 5 PUBLISH properties of every batch (Content-Type, and for JSON the
    payload format indicator), packed once when paho's `Properties.pack` is as expected:
    paho packs the properties it is given on every publish, which cost a quarter of a
    publish's CPU time."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def fill(props: Any) -> Any:
        if fmt == "json":
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
        else:
            props.ContentType = "application/cbor"
        return props

    if not check().packed_properties:
        return fill(Properties(PacketTypes.PUBLISH))  # type: ignore[no-untyped-call]

    class _Packed(Properties):
        def pack(self) -> bytes:
            return packed

    props = fill(_Packed(PacketTypes.PUBLISH))  # type: ignore[no-untyped-call]
    packed: bytes = Properties.pack(props)  # type: ignore[no-untyped-call]
    return props
