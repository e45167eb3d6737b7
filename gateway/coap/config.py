"""The `[coap]` section: where the CoAP front door listens, its limits, and device credentials.

```toml
[coap]
bind = ["127.0.0.1", "::1"]      # addresses (IPv4 and IPv6); default: all of both
port = 5683
dtls_port = 5684                 # DTLS-PSK listener (only when some device has a PSK)
max_payload = 1024               # bytes; larger requests get 4.13 with Size1
allow_unauthenticated = false    # serve requests without a security context
accept_unknown_devices = false   # take telemetry from devices not in config nor RD
max_unknown_devices = 1000       # past it, telemetry from a new unknown name gets 5.03
max_unknown_points = 64          # point names per unknown device; past it 5.03
rd_max_registrations = 1000      # past it, a new RD endpoint gets 5.03 (Max-Age)
rate_per_source = 100.0          # requests/s per sender address (0: no limit) ...
burst = 200                      # ... and at once; past it requests are dropped, counted
credentials_file = "coap-credentials.toml"  # optional, must be 0600; same shape as below
[coap.devices.boiler-1]
psk_identity = "boiler-1"
psk = "secret"                   # or psk_hex = "73656372..."
oscore_context = "/etc/gateway/oscore/boiler-1"  # aiocoap security context directory
```
Keys never appear in `repr()` (and so never in logs).
"""

from __future__ import annotations

import ipaddress
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway import secretfiles
from gateway.config import Issues, Section, secret_hex, validate_name


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    device: str
    psk_identity: bytes | None = None
    psk: bytes | None = field(default=None, repr=False)
    oscore_context: str | None = None

    @property
    def has_any(self) -> bool:
        return self.psk is not None or self.oscore_context is not None


@dataclass(frozen=True, slots=True)
class CoapConfig:
    bind: tuple[str, ...] = ("::",)
    port: int = 5683
    dtls_port: int = 5684
    max_payload: int = 1024
    allow_unauthenticated: bool = False
    accept_unknown_devices: bool = False
    #: Resource Directory: lifetime when a registration gives none, and the largest accepted.
    rd_default_lifetime: int = 90000
    rd_max_lifetime: int = 7 * 86400
    rd_max_registrations: int = 1000
    #: Devices neither configured nor registered that telemetry may create (accept_unknown).
    max_unknown_devices: int = 1000
    max_unknown_points: int = 64
    #: Token bucket per sender address on the whole front door (rate 0: no limit).
    rate_per_source: float = 100.0
    burst: int = 200
    #: Bound of the message-ID deduplication cache (entries); see gateway.coap.lean.
    dedup_max: int = 32768
    #: Largest number of concurrently observed resources (across all observers).
    max_observations: int = 256
    credentials: Mapping[str, DeviceCredentials] = field(default_factory=dict)

    def credentials_for(self, device: str) -> DeviceCredentials | None:
        return self.credentials.get(device)


def _credentials(name: str, sec: Section) -> DeviceCredentials:
    validate_name(sec, "", name, "device")
    ident = sec.str("psk_identity", None)
    psk_text = sec.str("psk", None, secret=True)
    psk_hex = sec.str("psk_hex", None, secret=True)
    oscore = sec.str("oscore_context", None)
    sec.done()
    psk: bytes | None = None
    if psk_text is not None and psk_hex is not None:
        sec.error("psk_hex", "give either psk or psk_hex, not both")
    elif psk_text is not None:
        psk = psk_text.encode("utf-8")
    elif psk_hex is not None:
        psk, problem = secret_hex(psk_hex)
        if psk is None:
            sec.error("psk_hex", problem)  # the key itself is never echoed
    if psk is not None and ident is None:
        ident = name  # the device id is the natural PSK identity
    if ident is not None and psk is None:
        sec.error("psk", "psk_identity is set but there is no psk (or psk_hex)")
    if oscore is not None and not Path(oscore).is_dir():
        sec.error("oscore_context", f"{oscore!r} is not a directory (an aiocoap OSCORE context)")
    elif oscore is not None and (bad := secretfiles.oscore_problem(oscore)) is not None:
        sec.error("oscore_context", bad)
    return DeviceCredentials(
        device=name,
        psk_identity=ident.encode("utf-8") if ident is not None else None,
        psk=psk,
        oscore_context=oscore,
    )


def _load_credentials_file(
    sec: Section, key: str, path: Path, issues: Issues
) -> dict[str, DeviceCredentials]:
    where = sec.at(key)
    try:
        st = path.stat()
    except OSError as exc:
        issues.add(where, f"{path}: cannot read: {exc.strerror}")
        return {}
    if stat.S_IMODE(st.st_mode) & 0o077:
        issues.add(
            where,
            f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} let others read the keys; "
            "run chmod 600",
        )
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        issues.add(where, f"{path}: cannot read: {exc}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        issues.add(where, f"{path}: not valid TOML: {exc}")
        return {}
    root = Section(data, str(path), issues)
    devices = root.tables("devices")
    root.done()
    return {name: _credentials(name, s) for name, s in devices.items()}


def parse(sec: Section) -> CoapConfig:
    bind = sec.list("bind", ["::"], of=str)
    for i, addr in enumerate(bind if isinstance(bind, list) else []):
        if isinstance(addr, str):
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                sec.issues.add(f"{sec.at('bind')}[{i}]", f"{addr!r} is not an IP address")
    if isinstance(bind, list) and not bind:
        sec.error("bind", "must list at least one address")
    port = sec.int("port", 5683, min=0, max=65535)
    dtls_port = sec.int(
        "dtls_port", port + 1 if isinstance(port, int) and port else 5684, min=0, max=65535
    )
    max_payload = sec.int("max_payload", 1024, min=16, max=65536)
    allow_unauth = sec.bool("allow_unauthenticated", False)
    accept_unknown = sec.bool("accept_unknown_devices", False)
    rd_default = sec.int("rd_default_lifetime", 90000, min=60, max=2**32 - 1)
    rd_max = sec.int("rd_max_lifetime", 7 * 86400, min=60, max=2**32 - 1)
    rd_count = sec.int("rd_max_registrations", 1000, min=1, max=100_000)
    max_unknown = sec.int("max_unknown_devices", 1000, min=0, max=1_000_000)
    max_points = sec.int("max_unknown_points", 64, min=1, max=100_000)
    rate = sec.float("rate_per_source", 100.0, min=0.0, max=1_000_000.0)
    burst = sec.int("burst", 200, min=1, max=1_000_000)
    dedup_max = sec.int("dedup_max", 32768, min=64, max=1_000_000)
    max_obs = sec.int("max_observations", 256, min=1, max=100_000)
    creds: dict[str, DeviceCredentials] = {}
    for name, dsec in sec.tables("devices").items():
        creds[name] = _credentials(name, dsec)
    cred_file = sec.str("credentials_file", None)
    if cred_file is not None:
        # Relative: $CREDENTIALS_DIRECTORY (LoadCredential=), then $CONFIGURATION_DIRECTORY.
        path = secretfiles.resolve(cred_file)
        for name, c in _load_credentials_file(sec, "credentials_file", path, sec.issues).items():
            if name in creds:
                sec.error("credentials_file", f"device {name!r} has credentials in both places")
            creds[name] = c
    if any(c.psk is not None for c in creds.values()) and isinstance(bind, list):
        for addr in bind:
            if isinstance(addr, str) and addr in ("::", "0.0.0.0"):
                # aiocoap's DTLS server must know its own address to answer from it.
                sec.error(
                    "bind",
                    f"DTLS-PSK needs specific addresses, not {addr!r}: list the "
                    'addresses to serve, e.g. ["192.0.2.10", "::1"]',
                )
    idents: dict[bytes, str] = {}
    for name, c in creds.items():
        if c.psk_identity is not None:
            if c.psk_identity in idents:
                sec.issues.add(
                    sec.at("devices") + "." + name,
                    f"psk_identity is also used by device {idents[c.psk_identity]!r}",
                )
            idents[c.psk_identity] = name
    sec.done()
    return CoapConfig(
        bind=tuple(bind) if isinstance(bind, list) else ("::",),
        port=port,
        dtls_port=dtls_port,
        max_payload=max_payload,
        allow_unauthenticated=allow_unauth,
        accept_unknown_devices=accept_unknown,
        rd_default_lifetime=rd_default,
        rd_max_lifetime=rd_max,
        rd_max_registrations=rd_count,
        max_unknown_devices=max_unknown,
        max_unknown_points=max_points,
        rate_per_source=rate,
        burst=burst,
        dedup_max=dedup_max,
        max_observations=max_obs,
        credentials=creds,
    )
