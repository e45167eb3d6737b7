"""The gateway's one error hierarchy: each class knows its CoAP response code and CLI exit status.

The CoAP front door (`gateway.coap`) and the CLI map errors to responses in one place each,
reading `coap_code` and `exit_status` from the class; nothing else inspects error types.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# CLI exit statuses (documented in README.md, "Exit codes").
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4  # daemon or device not reachable
EXIT_STORE = 5


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    #: CoAP response code as "class.detail" (e.g. "4.00"); the CoAP layer turns it into a code.
    coap_code: str = "5.00"
    exit_status: int = EXIT_FAILURE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration, at a TOML path such as `devices.boiler-1.interval`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(GatewayError):
    """A configuration is invalid; carries every issue found, each with its TOML path."""

    coap_code = "4.00"
    exit_status = EXIT_CONFIG

    def __init__(self, issues: Iterable[ConfigIssue] | str, path: str = "") -> None:
        if isinstance(issues, str):
            issues = [ConfigIssue(path, issues)]
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid configuration")

    @property
    def path(self) -> str:
        return self.issues[0].path if self.issues else ""


class PayloadError(GatewayError):
    """A request's payload is malformed (bad CBOR/JSON/SenML, wrong types); names the problem."""

    coap_code = "4.00"
    exit_status = EXIT_USAGE


class UnsupportedFormatError(GatewayError):
    coap_code = "4.15"
    exit_status = EXIT_USAGE


class NotAcceptableError(GatewayError):
    """No representation in the content-format the request's Accept asks for (RFC 7252 5.10.4)."""

    coap_code = "4.06"
    exit_status = EXIT_USAGE


class PayloadTooLargeError(GatewayError):
    coap_code = "4.13"
    exit_status = EXIT_USAGE

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class DriverError(GatewayError):
    """A device could not be read or written."""

    coap_code = "5.02"
    exit_status = EXIT_UNAVAILABLE

    def __init__(self, device: str, message: str) -> None:
        super().__init__(f"{device}: {message}" if device else message)
        self.device = device


class DeviceUnavailableError(DriverError):
    coap_code = "5.03"


class ConnectError(DeviceUnavailableError):
    """No connection to the device (refused, not yet reconnected, circuit open): nothing
    reached it, so a write may be tried again without risk of doing it twice."""


class DeviceTimeoutError(DriverError):
    coap_code = "5.04"


class DeviceProtocolError(DriverError):
    """The device answered with an error of its protocol (a Modbus exception, a CoAP 4.xx...)."""

    coap_code = "5.02"
    exit_status = EXIT_FAILURE  # it answered: a failure, not "unreachable"

    def __init__(self, device: str, message: str, code: int | str | None = None) -> None:
        super().__init__(device, message)
        self.code = code


class PointNotFoundError(DriverError):
    coap_code = "4.04"
    exit_status = EXIT_USAGE


class NotFoundError(GatewayError):
    """A resource (device, point, registration, command) that does not exist."""

    coap_code = "4.04"
    exit_status = EXIT_USAGE


class UsageError(GatewayError):
    """A request that cannot be done as asked (a control verb's arguments, a refused id)."""

    coap_code = "4.00"
    exit_status = EXIT_USAGE


class AuthError(GatewayError):
    coap_code = "4.01"
    exit_status = EXIT_USAGE


class ForbiddenError(AuthError):
    coap_code = "4.03"


class WriteRefusedError(GatewayError):
    """A write refused by the point rules before any driver saw it (`services.points`).
    `reason` is the word a `command.rejected` event and a requester see."""

    reason: str = "refused"
    coap_code = "4.00"
    exit_status = EXIT_USAGE


class UnknownDeviceError(WriteRefusedError):
    reason = "unknown_device"
    coap_code = "4.04"


class UnknownPointError(WriteRefusedError):
    reason = "unknown_point"
    coap_code = "4.04"


class NotWritableError(WriteRefusedError):
    reason = "not_writable"
    coap_code = "4.05"


class WrongTypeError(WriteRefusedError):
    reason = "wrong_type"


class OutOfRangeError(WriteRefusedError):
    reason = "out_of_range"


class DeviceDisabledError(WriteRefusedError):
    reason = "device_disabled"
    coap_code = "4.03"


class RemoteWriteError(WriteRefusedError):
    """A cloud write to a point that neither `remote_write` nor `[control] allow_remote` opens."""

    reason = "remote_write_not_allowed"
    coap_code = "4.03"


class CommandExpiredError(WriteRefusedError):
    reason = "expired"


class QueueFullError(WriteRefusedError):
    reason = "queue_full"
    coap_code = "5.03"
    exit_status = EXIT_UNAVAILABLE


class StoreError(GatewayError):
    coap_code = "5.03"
    exit_status = EXIT_STORE


class StoreFullError(StoreError):
    """The store cannot take more: its disk quota is reached under the `reject_new` policy
    (`cause` "quota") or the file system is full (`cause` "disk"); retry after `retry_after` s."""

    def __init__(self, message: str, retry_after: int = 30, cause: str = "quota") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.cause = cause


class StoreIOError(StoreError):
    """SQLite could not read or write the file (I/O error, read-only, locked, cannot open)."""


class StoreCorruptError(StoreError):
    """The database file is damaged or is not a database."""


class StoreClosedError(StoreError):
    """The store is shutting down and takes no more appends."""

    def __init__(self, message: str = "store is shutting down", retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CapacityError(GatewayError):
    """A bounded table is full (unknown devices, RD registrations): retry after `retry_after`
    seconds, or ask the operator (`gatewayctl devices forget`)."""

    coap_code = "5.03"

    def __init__(self, message: str, retry_after: int = 60) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConcurrencyError(StoreError):
    """An append's expected stream version did not match: someone else appended first."""

    coap_code = "4.12"

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        super().__init__(
            f"stream {stream!r}: expected version {expected}, but it is at version {actual}"
        )
        self.stream = stream
        self.expected = expected
        self.actual = actual


class DaemonUnavailableError(GatewayError):
    """The CLI could not reach the daemon's control socket."""

    exit_status = EXIT_UNAVAILABLE


# The old names of the errors a driver raises (drivers outside this tree may import them);
# deprecated: use the `...Error` names.
DeviceUnavailable = DeviceUnavailableError
DeviceTimeout = DeviceTimeoutError
PointNotFound = PointNotFoundError
