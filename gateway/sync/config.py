"""The `[sync]` section: where the outbox goes (MQTT endpoints in failover order, or a file
sink), in which format, and how hard the relay pushes (batches, backoff, breaker, backfill).

```toml
[sync]
format = "cbor"                 # cbor | json (the MQTT payload)
batch_size = 100                # events per message
inflight = 16                   # messages awaiting PUBACK at once
[[sync.endpoints]]              # failover order: the first one is preferred
url = "mqtts://broker.example.com:8883"
ca_file = "/etc/gateway/ca.pem"
cert_file = "/etc/gateway/gw.pem"
key_file = "/etc/gateway/gw.key"
username = "gw-1"
password_file = "/etc/gateway/mqtt.pass"
[sync.topics]
telemetry = "gateways/{gateway}/events/{stream}"
config = "gateways/{gateway}/config"   # with remote_config = true: see gateway.sync.remote_config
```
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from gateway import secretfiles
from gateway.config import Section, has_userinfo, redact_url
from gateway.retry import BreakerSettings, RetrySettings, read_breaker, read_retry

TOPIC_FIELDS = ("gateway", "stream", "type")


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    host: str
    port: int
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a repr or a log line
    password_file: str | None = None
    path: str = ""  # TOML path, for messages

    @property
    def label(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


DEFAULT_TELEMETRY = "gateways/{gateway}/events/{stream}"
DEFAULT_BACKFILL = "gateways/{gateway}/backfill/{stream}"
DEFAULT_COMMANDS = "gateways/{gateway}/commands"
DEFAULT_RESPONSES = "gateways/{gateway}/responses"
DEFAULT_CONFIG = "gateways/{gateway}/config"
#: The stream of config changes (`gateway.sync.remote_config`): its events go out through the
#: outbox like any other, on the response topic rather than the telemetry one.
CONFIG_STREAM = "config"


@dataclass(frozen=True, slots=True)
class TopicsConfig:
    telemetry: str = DEFAULT_TELEMETRY
    backfill: str = DEFAULT_BACKFILL
    commands: str = DEFAULT_COMMANDS
    responses: str = DEFAULT_RESPONSES
    config: str = DEFAULT_CONFIG  # a whole config document (TOML), with remote_config on


@dataclass(frozen=True, slots=True)
class FileSinkConfig:
    directory: str
    format: str = "ndjson"  # ndjson | cbor-seq
    rotate_bytes: int = 16 * 1024 * 1024


#: Connection rounds back off from 1 s, doubling up to 300 s (full jitter); an endpoint's
#: breaker opens after 5 failures in a row and rests 60 s.
RETRY = RetrySettings(initial=1.0, cap=300.0)
BREAKER = BreakerSettings(threshold=5, cooldown=60.0)
RETRY_OLD_KEYS = {"initial": "backoff_base", "cap": "backoff_cap"}
BREAKER_OLD_KEYS = {"threshold": "breaker_threshold", "cooldown": "breaker_cooldown"}


@dataclass(frozen=True, slots=True)
class SyncConfig:
    endpoints: tuple[EndpointConfig, ...] = ()
    #: Event types kept in the local log only, never written to the outbox (e.g. raw
    #: `readings` where the cloud takes `aggregate` events of processing windows instead).
    local_types: tuple[str, ...] = ()
    file: FileSinkConfig | None = None
    mqtt_version: str = "5"  # "5" | "3.1.1"
    keepalive: int = 60
    client_id: str | None = None  # default: "gatewayd-<gateway id>"
    session_expiry: int = 7 * 86400  # MQTT 5: how long the broker keeps our session
    connect_timeout: float = 10.0
    ack_timeout: float = 30.0  # no PUBACK for this long: the link is treated as dead
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    format: str = "cbor"  # cbor | json
    batch_size: int = 100
    inflight: int = 16
    retry: RetrySettings = RETRY  # between connection rounds, and the relay's pauses
    breaker: BreakerSettings = BREAKER  # per endpoint
    backfill_threshold: int = 10_000  # backlog depth at (re)connect that turns on live-first
    backfill_rate: float = 500.0  # events/s for the backlog while live-first is on
    commands: bool = True  # subscribe to the command topic
    max_payload: int | None = None  # bytes; for brokers that do not announce a maximum
    remote_config: bool = False  # take config documents from the config topic
    remote_config_probation: float = 60.0  # seconds for a remote config to come up healthy


def _check_template(sec: Section, key: str, value: str, allowed: tuple[str, ...]) -> None:
    import string

    try:
        names = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        sec.error(key, f"not a valid topic template: {exc}")
        return
    for name in names:
        if name not in allowed:
            sec.error(
                key,
                f"unknown placeholder {{{name}}}; allowed: "
                + ", ".join("{" + a + "}" for a in allowed),
            )
    if "+" in value or "#" in value:
        sec.error(key, "a topic to publish on must not contain the wildcards '+' or '#'")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(sec: Section) -> EndpointConfig | None:
    url = sec.str("url", None)
    host = sec.str("host", None)
    port = sec.int("port", None, min=1, max=65535)
    tls = sec.bool("tls", None)
    if url is not None:
        if host is not None or port is not None:
            sec.error("url", "give either url or host/port, not both")
        shown = redact_url(url)  # a user:password@ part is never echoed
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as exc:
            sec.error("url", f"not a valid URL ({exc}): {shown!r}")
            return None
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            sec.error("url", f"scheme must be mqtt:// or mqtts://, got {shown!r}")
            return None
        if has_userinfo(url):
            # They were silently ignored before: the connection went out without them.
            sec.error(
                "url", "must not hold credentials (user:password@): remove them and set "
                f"{sec.at('username')} and {sec.at('password_file')} (or password)",
            )  # fmt: skip
        if not parts.hostname:
            sec.error("url", f"no host in {shown!r}")
            return None
        url_tls = parts.scheme in ("mqtts", "ssl")
        if tls is not None and tls != url_tls:
            sec.error("tls", f"contradicts the url scheme {parts.scheme!r}")
        tls = url_tls
        host = parts.hostname
        try:
            port = parts.port
        except ValueError:
            sec.error("url", f"bad port in {shown!r}")
            return None
    elif host is None:
        sec.error("", "an endpoint needs url (mqtt://host:port or mqtts://...) or host")
        return None
    tls = bool(tls)
    if port is None:
        port = 8883 if tls else 1883
    ca_file = sec.str("ca_file", None)
    cert_file = sec.str("cert_file", None)
    key_file = secretfiles.check(sec, "key_file")
    if (ca_file or cert_file or key_file) and not tls:
        sec.error("tls", "certificate files are given but TLS is off (use mqtts:// or tls = true)")
    if key_file and not cert_file:
        sec.error("key_file", "key_file needs cert_file")
    username = sec.str("username", None, secret=True)
    password = sec.str("password", None, nonempty=False, secret=True)
    password_file = secretfiles.check(sec, "password_file")
    if password is not None and password_file is not None:
        sec.error("password_file", "give either password or password_file, not both")
    if (password is not None or password_file is not None) and username is None:
        sec.error("username", "a password needs a username")
    if (password is not None or password_file is not None) and not tls and not _loopback(host):
        sec.warn(
            "password", f"is sent in clear text over mqtt:// to {host}: use mqtts:// (TLS), "
            "or a broker on this machine",
        )  # fmt: skip
    sec.done()
    return EndpointConfig(
        host=host, port=port, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        username=username, password=password, password_file=password_file, path=sec.path,
    )  # fmt: skip


_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


def _local_types(sec: Section) -> tuple[str, ...]:
    raw: Any = sec.list("local_types", [])
    out: list[str] = []
    if not isinstance(raw, list):
        return ()
    for i, t in enumerate(raw):
        if not isinstance(t, str) or not _EVENT_TYPE.match(t):
            sec.issues.add(
                f"{sec.at('local_types')}[{i}]",
                f"must be an event type such as 'readings' or 'alert.raised', got {t!r}",
            )
        else:
            out.append(t)
    return tuple(out)


def parse(sec: Section) -> SyncConfig:
    """Read `[sync]`; every issue goes to the section's Issues with its TOML path."""
    endpoints: list[EndpointConfig] = []
    raw_eps: Any = sec.list("endpoints", [])
    if isinstance(raw_eps, list):
        for i, item in enumerate(raw_eps):
            path = f"{sec.at('endpoints')}[{i}]"
            if not isinstance(item, dict):
                sec.issues.add(path, "must be a table ([[sync.endpoints]])")
                continue
            ep = _endpoint(Section(item, path, sec.issues))
            if ep is not None:
                endpoints.append(ep)

    file_cfg: FileSinkConfig | None = None
    if sec.has("file"):
        f = sec.table("file")
        file_cfg = FileSinkConfig(
            directory=f.str("directory"),
            format=f.str("format", "ndjson", choices=["ndjson", "cbor-seq"]),
            rotate_bytes=int(f.float("rotate_mb", 16.0, gt=0) * 1024 * 1024),
        )
        f.done()
    if not endpoints and file_cfg is None:
        sec.error("endpoints", "give at least one [[sync.endpoints]] or a [sync.file] sink")
    if endpoints and file_cfg is not None:
        sec.error("file", "give either [[sync.endpoints]] or [sync.file], not both")

    t = sec.table("topics")
    topics = TopicsConfig(
        telemetry=t.str("telemetry", DEFAULT_TELEMETRY),
        backfill=t.str("backfill", DEFAULT_BACKFILL),
        commands=t.str("commands", DEFAULT_COMMANDS),
        responses=t.str("responses", DEFAULT_RESPONSES),
        config=t.str("config", DEFAULT_CONFIG),
    )
    for key in ("telemetry", "backfill"):
        _check_template(t, key, getattr(topics, key), TOPIC_FIELDS)
    for key in ("commands", "responses", "config"):
        _check_template(t, key, getattr(topics, key), ("gateway",))
    if topics.config in (topics.commands, topics.responses):
        t.error("config", "must differ from the commands and responses topics")
    t.done()

    retry = read_retry(sec, RETRY, old=RETRY_OLD_KEYS)
    breaker = read_breaker(sec, BREAKER, old=BREAKER_OLD_KEYS)
    b = sec.table("backfill")
    backfill_threshold = b.int("threshold", 10_000, min=0)
    backfill_rate = b.float("rate", 500.0, gt=0)
    b.done()
    cfg = SyncConfig(
        endpoints=tuple(endpoints),
        file=file_cfg,
        mqtt_version=sec.str("mqtt_version", "5", choices=["5", "3.1.1"]),
        keepalive=sec.int("keepalive", 60, min=5, max=65535),
        client_id=sec.str("client_id", None),
        session_expiry=sec.int("session_expiry", 7 * 86400, min=0, max=2**32 - 1),
        connect_timeout=sec.float("connect_timeout", 10.0, gt=0, max=600),
        ack_timeout=sec.float("ack_timeout", 30.0, gt=0, max=3600),
        topics=topics,
        format=sec.str("format", "cbor", choices=["cbor", "json"]),
        batch_size=sec.int("batch_size", 100, min=1, max=10_000),
        inflight=sec.int("inflight", 16, min=1, max=1000),
        retry=retry,
        breaker=breaker,
        backfill_threshold=backfill_threshold,
        backfill_rate=backfill_rate,
        commands=sec.bool("commands", True),
        max_payload=sec.int("max_payload", None, min=256),
        remote_config=sec.bool("remote_config", False),
        local_types=_local_types(sec),
        remote_config_probation=sec.float("remote_config_probation", 60.0, gt=0, max=3600),
    )
    if cfg.remote_config and file_cfg is not None:
        sec.error("remote_config", "needs [[sync.endpoints]]: config documents come over MQTT")
    sec.done()
    return cfg
