"""A CoAP device's configuration, checked and compiled once: base URI, credentials, points.

Pure: no I/O and no aiocoap import, so `gatewayctl config check` stays cheap. The driver
turns a `DeviceSpec` into a `CoapDevice` with `compile_device`, which raises ConfigError
naming every problem with its TOML path.

    [devices.thermo-1]
    driver = "coap"
    uri = "coaps://192.0.2.7"          # base of every point's path (coap:// or coaps://)
    psk_identity = "thermo-1"          # DTLS-PSK (coaps://): identity and key ...
    psk_key_file = "/etc/gateway/keys/thermo-1.psk"   # ... or psk_key = "..." inline
    # oscore = "/var/lib/gateway/oscore/thermo-1"     # OSCORE (coap://): context directory
    [devices.thermo-1.points.temp]
    path = "/sensors/temp"
    mode = "observe"                   # or "poll" (GET on the collection schedule)
    format = "senml"                   # senml | cbor | json | text | auto
    record = "temp"                    # SenML record name (or key of a CBOR/JSON map)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from drivers.base import device_options, point_options, raise_issues
from gateway.config import DeviceSpec, Section, has_userinfo, redact_url
from gateway.errors import ConfigIssue
from gateway.retry import BreakerSettings, RetrySettings, read_breaker, read_retry

MODES: Final = ("poll", "observe")
FORMATS: Final = ("auto", "senml", "cbor", "json", "text")
WRITE_METHODS: Final = ("put", "post")
WRITE_FORMATS: Final = ("text", "cbor", "json", "senml", "senml+json")

#: A device's breaker opens after 3 link failures in a row and rests like its retry: from
#: 1 s, doubling up to 60 s, never less than half the step (a dead device is not retried
#: almost at once by bad luck); an authentication failure rests the cap at once.
RETRY: Final = RetrySettings(initial=1.0, cap=60.0, jitter="half")
BREAKER: Final = BreakerSettings(threshold=3)
RETRY_OLD_KEYS: Final = {"initial": "backoff_initial", "cap": "backoff_max"}
BREAKER_OLD_KEYS: Final = {"threshold": "breaker_threshold"}


@dataclass(frozen=True, slots=True)
class Credentials:
    """How to protect a device's exchanges. Key material is loaded by the driver at start."""

    psk_identity: str | None = None
    psk_key: str | None = None  # inline key (UTF-8 bytes are the PSK, as `coap-client -k`)
    psk_key_file: str | None = None
    oscore: str | None = None  # OSCORE security context directory (aiocoap layout)

    @property
    def kind(self) -> str:
        if self.oscore:
            return "oscore"
        if self.psk_identity:
            return "dtls-psk"
        return "none"

    def __repr__(self) -> str:  # keys never appear in logs or tracebacks
        return f"Credentials(kind={self.kind!r}, psk_identity={self.psk_identity!r})"


@dataclass(frozen=True, slots=True)
class CoapPoint:
    name: str
    path: str  # absolute path below the device's base URI, with an optional "?query"
    mode: str  # "poll" | "observe"
    format: str  # one of FORMATS
    record: str | None  # SenML record name or map key; None = the point's name or single value
    write_method: str  # "put" | "post"
    write_format: str  # one of WRITE_FORMATS


@dataclass(frozen=True, slots=True)
class CoapDevice:
    id: str
    uri: str  # base URI without a trailing slash: "coap://host:port"
    timeout: float
    credentials: Credentials
    points: Mapping[str, CoapPoint]
    # Observe: re-register when no notification came for Max-Age + this margin (RFC 7641 3.3.1).
    observe_margin: float
    # Re-registrations back off by `retry`; the breaker opens after `breaker.threshold`
    # consecutive link failures and rests like `retry` (see RETRY).
    retry: RetrySettings = RETRY
    breaker: BreakerSettings = BREAKER
    #: What the config check found worth a look (deprecated keys), not errors.
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False, repr=False)

    @property
    def secure(self) -> bool:
        return self.uri.startswith("coaps://")

    def url(self, point: CoapPoint) -> str:
        return self.uri + point.path

    def observed(self) -> list[CoapPoint]:
        return [p for p in self.points.values() if p.mode == "observe"]


def _check_uri(sec: Section, key: str, value: object) -> str:
    if not isinstance(value, str):
        return ""  # missing or mistyped: already reported by the Section
    shown = redact_url(value)  # never echo a user:password@ part
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        sec.error(key, f"is not a valid URI ({exc}): {shown!r}")
        return value
    if parts.scheme not in ("coap", "coaps"):
        sec.error(key, f"must be a coap:// or coaps:// URI, got {shown!r}")
        return value
    if has_userinfo(value):
        sec.error(
            key, "must not hold credentials (user:password@): CoAP does not use them; "
            "give psk_identity and psk_key_file (coaps://) or oscore instead",
        )  # fmt: skip
    if not parts.hostname:
        sec.error(key, f"has no host: {shown!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        sec.error(key, f"has an invalid port: {shown!r}")
    if parts.query or parts.fragment:
        sec.error(key, "must not have a query or fragment (give them in each point's path)")
    return value.rstrip("/")


def compile_device(spec: DeviceSpec) -> CoapDevice:
    """Check a coap device's options and points; raise ConfigError with every issue."""
    sec, issues = device_options(spec)
    uri = _check_uri(sec, "uri", sec.str("uri"))
    psk_identity = sec.str("psk_identity", None)
    psk_key = sec.str("psk_key", None, secret=True)
    psk_key_file = sec.str("psk_key_file", None)
    oscore = sec.str("oscore", None)
    observe_margin = sec.float("observe_margin", 5.0, min=0, max=3600)
    breaker = read_breaker(sec, BREAKER, old=BREAKER_OLD_KEYS)
    retry = read_retry(sec, RETRY, old=RETRY_OLD_KEYS)

    secure = uri.startswith("coaps://")
    if psk_key is not None and psk_key_file is not None:
        sec.error("psk_key", "give psk_key or psk_key_file, not both")
    has_key = psk_key is not None or psk_key_file is not None
    if psk_identity is not None and not has_key:
        sec.error("psk_identity", "needs psk_key or psk_key_file")
    if has_key and psk_identity is None:
        sec.error("psk_identity", "missing: a PSK needs its identity")
    if secure and psk_identity is None:
        sec.error("uri", "coaps:// needs DTLS-PSK credentials (psk_identity and psk_key_file)")
    if psk_identity is not None and not secure and uri.startswith("coap://"):
        sec.error("uri", "DTLS-PSK credentials need a coaps:// URI")
    if oscore is not None:
        if secure:
            sec.error("oscore", "OSCORE runs over coap://, not coaps:// (choose one protection)")
        if psk_identity is not None:
            sec.error("oscore", "give DTLS-PSK or OSCORE credentials, not both")
    credentials = Credentials(psk_identity, psk_key, psk_key_file, oscore)

    points: dict[str, CoapPoint] = {}
    for point in spec.points:
        p = point_options(spec, point, issues)
        path = p.str("path")
        if isinstance(path, str) and not path.startswith("/"):
            p.error("path", f"must start with '/', got {path!r}")
        mode = p.str("mode", "poll", choices=MODES)
        fmt = p.str("format", "auto", choices=FORMATS)
        record = p.str("record", None)
        write_method = p.str("write_method", "put", choices=WRITE_METHODS)
        default_wf = {"senml": "senml", "cbor": "cbor", "json": "json"}.get(fmt, "text")
        write_format = p.str("write_format", default_wf, choices=WRITE_FORMATS)
        if not point.writable and (p.has("write_method") or p.has("write_format")):
            p.error("writable", "write_method/write_format given but the point is not writable")
        p.done()
        points[point.name] = CoapPoint(
            name=point.name, path=path, mode=mode, format=fmt, record=record,
            write_method=write_method, write_format=write_format,
        )  # fmt: skip
    sec.done()
    raise_issues(issues)
    return CoapDevice(
        id=spec.id, uri=uri, timeout=spec.timeout, credentials=credentials, points=points,
        observe_margin=observe_margin, retry=retry, breaker=breaker,
        warnings=tuple(issues.warnings),
    )  # fmt: skip
