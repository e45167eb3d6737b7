"""An aiocoap device for the CoAP driver's tests; run as its own process.

Usage: python coap_server.py SPEC.json
SPEC: {"port": p, "ready": path, "max_age": s, "oscore": context-dir or null}

Resources (like a small firmware would serve):
- /sensors: observable SenML CBOR pack `bn = "dev-1/"`, records temp (Cel) and hum (%RH),
  with Max-Age from SPEC; PUT a SenML pack or a text number to /sensors/temp to change temp
  (observers are notified).
- /setpoint: observable text value; PUT (text) changes it.
- /count: CBOR map {"count": n}; each GET adds one.
With "oscore", requests must be OSCORE-protected (else 4.01), as a device with credentials.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import cbor2


class Device:
    def __init__(self, max_age: int, protected: bool) -> None:
        self.temp = 21.5
        self.hum = 40
        self.setpoint = "18"
        self.count = 0
        self.max_age = max_age
        self.protected = protected


def refuse(dev: Device, request: aiocoap.Message) -> aiocoap.Message | None:
    if dev.protected and not request.remote.authenticated_claims:
        return aiocoap.Message(code=aiocoap.UNAUTHORIZED, payload=b"OSCORE required")
    return None


class Sensors(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped here
    def __init__(self, dev: Device) -> None:
        super().__init__()
        self.dev = dev

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if (no := refuse(self.dev, request)) is not None:
            return no
        pack = [
            {-2: "dev-1/", 0: "temp", 1: "Cel", 2: self.dev.temp},
            {0: "hum", 1: "%RH", 2: self.dev.hum},
        ]
        msg = aiocoap.Message(payload=cbor2.dumps(pack), content_format=112)
        msg.opt.max_age = self.dev.max_age
        return msg


class SensorTemp(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped here
    def __init__(self, dev: Device, sensors: Sensors) -> None:
        super().__init__()
        self.dev = dev
        self.sensors = sensors

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        if (no := refuse(self.dev, request)) is not None:
            return no
        if request.opt.content_format == 112:
            pack = cbor2.loads(request.payload)
            self.dev.temp = float(pack[0][2])
        else:
            self.dev.temp = float(request.payload.decode())
        self.sensors.updated_state()
        return aiocoap.Message(code=aiocoap.CHANGED)


class Setpoint(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped here
    def __init__(self, dev: Device) -> None:
        super().__init__()
        self.dev = dev

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if (no := refuse(self.dev, request)) is not None:
            return no
        msg = aiocoap.Message(payload=self.dev.setpoint.encode(), content_format=0)
        msg.opt.max_age = self.dev.max_age
        return msg

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        if (no := refuse(self.dev, request)) is not None:
            return no
        self.dev.setpoint = request.payload.decode()
        self.updated_state()
        return aiocoap.Message(code=aiocoap.CHANGED)


class Count(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped here
    def __init__(self, dev: Device) -> None:
        super().__init__()
        self.dev = dev

    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        if (no := refuse(self.dev, request)) is not None:
            return no
        self.dev.count += 1
        return aiocoap.Message(payload=cbor2.dumps({"count": self.dev.count}), content_format=60)


async def main(spec: dict[str, Any]) -> None:
    dev = Device(int(spec.get("max_age", 60)), bool(spec.get("oscore")))
    site: Any = resource.Site()
    sensors = Sensors(dev)
    site.add_resource(["sensors"], sensors)
    site.add_resource(["sensors", "temp"], SensorTemp(dev, sensors))
    site.add_resource(["setpoint"], Setpoint(dev))
    site.add_resource(["count"], Count(dev))
    transports = ["udp6"]
    if spec.get("oscore"):
        from aiocoap.credentials import CredentialsMap
        from aiocoap.oscore_sitewrapper import OscoreSiteWrapper

        creds = CredentialsMap()
        # load_from_dict also sets the context's authenticated_claims (what `refuse` checks).
        creds.load_from_dict({":gateway": {"oscore": {"basedir": spec["oscore"]}}})
        site = OscoreSiteWrapper(site, creds)
        transports = ["oscore", "udp6"]
    ctx = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", spec["port"]), transports=transports
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ready = Path(spec["ready"])
    await asyncio.to_thread(ready.write_text, "ready")
    await stop.wait()
    await ctx.shutdown()


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text())))
