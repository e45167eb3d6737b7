"""Connection failures of the MQTT link (paho, aiomqtt, ssl) turned into one line an
operator can act on, and whether retrying soon can help."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from gateway.sync.config import EndpointConfig


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    message: str
    hard: bool  # credentials/certificates: will not fix itself


def explain(ep: EndpointConfig, exc: BaseException) -> ConnectFailure:
    """Turn what paho/aiomqtt/ssl raised into one line an operator can act on."""
    from aiomqtt.exceptions import MqttConnectError

    where = ep.label
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for c in chain:
        if isinstance(c, ssl.SSLCertVerificationError):
            return ConnectFailure(
                f"{where}: TLS: the broker's certificate was not accepted ({c.verify_message}); "
                "check ca_file and the broker's certificate (its name must match the host)",
                True,
            )
        if isinstance(c, ssl.SSLError):
            return ConnectFailure(
                f"{where}: TLS handshake failed ({c.reason or c}); check cert_file/key_file "
                "and that the broker trusts the client certificate",
                True,
            )
    if isinstance(exc, MqttConnectError):
        rc: Any = exc.rc
        code = int(getattr(rc, "value", rc) or 0)
        name = str(rc) if not isinstance(rc, int) else str(exc)
        if code in (4, 5, 0x86, 0x87, 0x8C):
            return ConnectFailure(
                f"{where}: the broker refused the login ({name}, code {code}): "
                "check username and password (or password_file) and the broker's ACL",
                True,
            )
        if code == 0x85 or code == 2:
            return ConnectFailure(f"{where}: client id refused ({name}, code {code})", True)
        return ConnectFailure(f"{where}: connection refused by the broker ({name}, code {code})",
                              False)  # fmt: skip
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if "alert" in low and ep.cert_file:
        return ConnectFailure(
            f"{where}: TLS: the broker rejected our client certificate ({text}); check "
            "cert_file/key_file and that the broker's CA signed them",
            True,
        )
    if "ssl" in low or "tls" in low or "certificate" in low:
        return ConnectFailure(f"{where}: TLS handshake failed ({text})", True)
    if ep.cert_file and any(w in low for w in ("reset", "eof", "closed", "lost")):
        # With TLS 1.3 a broker that rejects our certificate may just drop the connection
        # after the handshake: the client then sees a reset, not an alert.
        return ConnectFailure(
            f"{where}: the broker closed the connection right after TLS ({text}); if it "
            "requires client certificates, check cert_file/key_file and that its CA signed them",
            False,
        )
    return ConnectFailure(f"{where}: cannot connect ({text})", False)
