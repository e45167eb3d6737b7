"""TLS with a client certificate and a password against a real Mosquitto; a wrong
certificate or password is a clear error and a retry with backoff, never a crash."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import free_port, require_binary
from tests.sync.conftest import Mosquitto, Subscriber, make_pki, shared_dir
from tests.sync.helpers import (
    aio,
    check_order,
    mqtt_config,
    open_store,
    outbox_depth,
    running_relay,
    until,
)

pytestmark = pytest.mark.peer("mosquitto")


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, Path]]:
    pki_dir = shared_dir("sync-pki-")
    try:
        yield make_pki(pki_dir)
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)


@pytest.fixture
def tls_broker(pki: dict[str, Path]) -> Iterator[tuple[Mosquitto, dict[str, Path], int]]:
    broker = Mosquitto()
    passwd = broker.file("passwd", "")
    subprocess.run(
        [require_binary("mosquitto_passwd"), "-b", str(passwd), "gw", "s3cret"],
        check=True, capture_output=True, timeout=10,
    )  # fmt: skip
    passwd.chmod(0o644)
    tls_port = free_port()
    # TLS listener: client certificate AND password required. A plain one for the subscriber.
    broker.extra = f"""per_listener_settings true
listener {tls_port} 127.0.0.1
cafile {pki["ca"]}
certfile {pki["server"]}
keyfile {pki["server_key"]}
require_certificate true
allow_anonymous false
password_file {passwd}
listener {broker.port} 127.0.0.1
allow_anonymous true
"""
    try:
        broker.start()
        yield broker, pki, tls_port
    finally:
        broker.remove()


def endpoint(port: int, pki: dict[str, Path], **kw: str) -> dict[str, str]:
    ep = {
        "url": f"mqtts://127.0.0.1:{port}",
        "ca_file": str(pki["ca"]),
        "cert_file": str(pki["client"]),
        "key_file": str(pki["client_key"]),
        "username": "gw",
        "password": "s3cret",
    }
    ep.update(kw)
    return ep


@aio
async def test_tls_with_client_certificate_delivers(
    tls_broker: tuple[Mosquitto, dict[str, Path], int], tmp_path: Path
) -> None:
    broker, pki, tls_port = tls_broker
    sub = Subscriber(broker.port, tmp_path)
    try:
        async with open_store(tmp_path / "gw.db") as store:
            for i in range(20):
                await store.append("device:a", "readings", {"r": [{"n": "t", "v": i}]})
            cfg = mqtt_config(0, endpoints=[endpoint(tls_port, pki)])
            async with running_relay(store, cfg) as relay:
                await until(lambda: _empty(store), "outbox drained over TLS")
                assert relay.figures()["state"] == "connected"
            await until(lambda: len(sub.events()) >= 20, "subscriber saw the events")
        assert len(check_order(sub.events())["device:a"]) == 20
    finally:
        sub.stop()


async def _empty(store: object) -> bool:
    from gateway.store import EventStore

    assert isinstance(store, EventStore)
    return await outbox_depth(store) == 0


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        ({"password": "wrong"}, "refused the login"),
        ({"cert_file": "rogue.pem", "key_file": "rogue.key"}, "certificate"),
        ({"ca_file": "rogue.pem"}, "broker's certificate was not accepted"),
    ],
    ids=["wrong-password", "wrong-client-certificate", "untrusted-server"],
)
@aio
async def test_wrong_credentials_are_a_clear_error_and_a_backoff_retry(
    tls_broker: tuple[Mosquitto, dict[str, Path], int],
    tmp_path: Path,
    bad: dict[str, str],
    expect: str,
) -> None:
    _broker, pki, tls_port = tls_broker
    bad = {k: str(pki["rogue" if v == "rogue.pem" else "rogue_key"]) if v.startswith("rogue")
           else v for k, v in bad.items()}  # fmt: skip
    async with open_store(tmp_path / "gw.db") as store:
        await store.append("device:a", "readings", {"r": [{"n": "t", "v": 1}]})
        cfg = mqtt_config(0, endpoints=[endpoint(tls_port, pki, **bad)], breaker={"cooldown": 0.2})
        async with running_relay(store, cfg) as relay:
            link = relay.sink
            await until(lambda: link.figures()["connect_failures"] >= 3, "repeated attempts")
            fig = link.figures()
            assert expect in (fig["last_error"] or ""), fig["last_error"]
            assert relay.state == "connecting"  # still trying: no crash, no give-up
        assert await outbox_depth(store) == 1
