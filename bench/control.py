"""Control service benchmark: command latency (request -> `command.succeeded` committed) through
the control service vs a direct `Driver.write` (and write + read-back, what the service does)
on the same pymodbus slave, in the same run, interleaved.

The service path runs in-process with the real store (synchronous = full, on the temporary
directory's file system), bus, supervisor and the collection service's driver: rules, four
lifecycle events committed, the write, the read-back (and its reading). Target: median
overhead <= 2 ms per command over write + read-back; printed as a ratio too.

Usage: .venv/bin/python bench/control.py [--commands 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import config as cfg  # noqa: E402
from gateway import parts  # noqa: E402
from gateway.bus import Bus  # noqa: E402
from gateway.control import ControlServer  # noqa: E402
from gateway.daemon import build_services  # noqa: E402
from gateway.store import EventStore  # noqa: E402
from gateway.supervisor import Supervisor  # noqa: E402

SERVER = ROOT / "tests" / "drivers_modbus" / "modbus_server.py"

CONFIG = """
[gateway]
id = "bench"
state_dir = "{tmp}"
runtime_dir = "{tmp}"

[store]
synchronous = "full"
check_interval = 3600

[devices.plc]
driver = "modbus"
host = "127.0.0.1"
port = {port}
unit = 1
interval = 3600

[devices.plc.points.setpoint]
address = 0
type = "int16"
scale = 0.1
min = 0.0
max = 1000.0
writable = true
"""


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def bench(tmp: Path, port: int, n: int) -> None:
    c = cfg.loads(CONFIG.format(tmp=tmp, port=port))
    parts.register_tables(c.sections)  # the parts' tables, before the store opens
    store = await EventStore.open(c.db_path, c.store, gateway_id="bench")
    bus = Bus(store)
    control = ControlServer(tmp / "bench.sock")
    sup = Supervisor(build_services(c), config=c, store=store, bus=bus, control=control)
    await sup.start()
    try:
        svc = sup.service("control")
        coll = sup.service("collection")
        drv = coll.driver_for("plc")  # type: ignore[attr-defined]
        assert drv is not None
        point = c.devices["plc"].point("setpoint")
        assert point is not None
        submit = svc.submit  # type: ignore[attr-defined]

        async def direct(i: int) -> None:
            await drv.write("plc", point, i % 1000)

        async def direct_rb(i: int) -> None:
            await drv.write("plc", point, i % 1000)
            await drv.read("plc", [point])

        async def service(i: int) -> None:
            row = await submit("plc", "setpoint", (i % 1000) / 10, source="bench", wait=True)
            assert row["status"] == "succeeded", row

        times: dict[str, list[float]] = {"direct": [], "direct+readback": [], "service": []}
        fns = {"direct": direct, "direct+readback": direct_rb, "service": service}
        for i in range(20):  # warm up: connection, caches
            for fn in fns.values():
                await fn(i)
        for i in range(n):
            names = list(fns) if i % 2 == 0 else list(fns)[::-1]
            for name in names:
                t0 = time.perf_counter()
                await fns[name](i)
                times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        await sup.stop(10)
        bus.close()
        await store.close()

    for name, xs in times.items():
        print(f"{name:>16}: p50 {statistics.median(xs):.3f} ms, p99 {pct(xs, 0.99):.3f} ms "
              f"({len(xs)} commands)")  # fmt: skip
    s, b, w = (statistics.median(times[k]) for k in ("service", "direct+readback", "direct"))
    print(f"median overhead of the service over write + read-back: {s - b:.3f} ms per command "
          f"[target <= 2 ms]; ratio {s / b:.2f}x (vs a bare write: {s / w:.2f}x)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commands", type=int, default=300)
    args = ap.parse_args()
    from tests.support.peers import free_port, wait_until

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        spec = {"tcp": port, "units": {"1": {"hr": [0] * 10}}, "ready": str(ready)}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        log = open(Path(tmp) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, str(SERVER), str(Path(tmp) / "spec.json")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(ready.exists, "pymodbus server")
            asyncio.run(bench(Path(tmp), port, args.commands))
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
