"""Events: the one way state changes. Types, streams and the shapes of their data.

Streams: `device:<id>` (readings, availability, registration), `command:<id>`,
`alert:<id>`, `gateway` (store and daemon life). Data is CBOR; keys are short strings.
`Event` and `NewEvent` are NamedTuples: immutable, and several times cheaper to create than
frozen dataclasses on the append path (one of each per event).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

# Event types. A consumer that does not know a type ignores it.
READINGS: Final = "readings"  # data: {"r": [{"n": point, "v": value, "u"?: unit, "t"?: ts}]}
DEVICE_AVAILABLE: Final = "device.available"  # data: {"reason"?: str}
DEVICE_UNAVAILABLE: Final = "device.unavailable"  # data: {"reason": str}
DEVICE_REGISTERED: Final = "device.registered"  # data: {"source": "rd"|"ble"|..., ...}
DEVICE_UNREGISTERED: Final = "device.unregistered"  # data: {"reason": str}
#: An unconfigured device removed by the operator (`gatewayctl devices forget`): its row,
#: latest values and RD registration go. data: {"reason": str}
DEVICE_FORGOTTEN: Final = "device.forgotten"
DEVICE_DISCOVERED: Final = "device.discovered"  # data: {"driver", "address", "kind", "values"}
ALERT_RAISED: Final = "alert.raised"
ALERT_CLEARED: Final = "alert.cleared"
# A command's lifecycle, in its stream `command:<id>` (services/control):
# requested -> accepted | rejected -> sent -> succeeded | failed | expired.
COMMAND_REQUESTED: Final = "command.requested"  # data: {"device", "point", "value", "source"}
COMMAND_ACCEPTED: Final = "command.accepted"  # data: {"deadline"}
COMMAND_REJECTED: Final = "command.rejected"  # data: {"reason", "error"}
COMMAND_SENT: Final = "command.sent"  # data: {}
COMMAND_SUCCEEDED: Final = "command.succeeded"  # data: {"written", "value"?: read back}
COMMAND_FAILED: Final = "command.failed"  # data: {"reason" (e.g. "unknown_outcome"), "error"}
COMMAND_EXPIRED: Final = "command.expired"  # data: {"deadline"}
COMMAND_COMPLETED: Final = "command.completed"
#: Streams of commands: the cloud gets their events on its response topic.
COMMAND_STREAM_PREFIX: Final = "command:"
STORE_DROPPED: Final = "store.dropped"  # data: {"count": n, "up_to_seq": seq}
GATEWAY_STARTED: Final = "gateway.started"
GATEWAY_STOPPED: Final = "gateway.stopped"
CONFIG_RELOADED: Final = "config.reloaded"
OPERATOR_NOTE: Final = "operator.note"  # data: {"text": str, "author"?: str}
#: A state-changing control verb was run, on the operator stream. data: {"verb", "args",
#: "uid", "gid", "pid" (SO_PEERCRED of the caller), "ok", "error"?}
CONTROL_VERB: Final = "control.verb"

GATEWAY_STREAM: Final = "gateway"
OPERATOR_STREAM: Final = "operator"


def device_stream(device_id: str) -> str:
    return f"device:{device_id}"


def stream_device(stream: str) -> str | None:
    return stream[7:] if stream.startswith("device:") else None


class NewEvent(NamedTuple):
    """An event to append. `expected_version` (optimistic concurrency): the stream's current
    version must equal it, else the append fails with ConcurrencyError; None = any.
    `outbox=False` keeps an event local (not forwarded to the cloud)."""

    stream: str
    type: str
    data: Mapping[str, Any]
    expected_version: int | None = None
    outbox: bool = True


class Event(NamedTuple):
    """A committed event.

    `wall_time` is the system clock at append; `mono_time` the monotonic clock of boot
    `boot_id`. `clock_synced` is False when the system clock was not known to be synced
    (no RTC, no NTP yet): such wall times can be corrected later from mono_time + boot_id.
    """

    seq: int
    stream: str
    version: int
    type: str
    wall_time: float
    mono_time: float
    boot_id: str
    clock_synced: bool
    data: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "wall_time": self.wall_time,
            "mono_time": self.mono_time,
            "boot_id": self.boot_id,
            "clock_synced": self.clock_synced,
            "data": dict(self.data),
        }


def reading_record(
    point: str, value: Any, unit: str | None = None, ts: float | None = None
) -> dict[str, Any]:
    rec: dict[str, Any] = {"n": point, "v": value}
    if unit is not None:
        rec["u"] = unit
    if ts is not None:
        rec["t"] = ts
    return rec


def readings_event(device_id: str, records: Sequence[Mapping[str, Any]]) -> NewEvent:
    """A `readings` event for one device. Records as made by `reading_record`."""
    return NewEvent(device_stream(device_id), READINGS, {"r": list(records)})


def iter_readings(data: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    r = data.get("r")
    return r if isinstance(r, list) else ()
