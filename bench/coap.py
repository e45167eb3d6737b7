"""CoAP front door under load: the gateway (real store) vs a bare aiocoap server, same run.

    .venv/bin/python bench/coap.py [--requests N] [--levels 1,16,64]

A raw-UDP load generator (asyncio datagram sockets, one per in-flight request slot, CON
requests retransmitted after 2 s like a device would) POSTs a 5-record SenML CBOR pack to

  (a) the gateway: `CoapServer` + `EventStore` (group commit, synchronous=full) in its own
      process, started the way gatewayd starts it;
  (b) a bare aiocoap 0.4.17 server in its own process whose resource only answers 2.04
      (stock `Context.create_server_context`, udp6 only).

For each concurrency level (a fresh server process per row) it prints requests/s,
p50/p99/p99.9/max latency, the server's RSS before and after the level, and at the end the
longest GC pauses; the c=1 level sends N/20 requests (it is latency-bound), the others N.
Targets (issue 3): gateway >= 0.9x bare requests/s at c=16; gateway RSS after 100k
requests <= 64 MB; gateway p99.9 <= 20 ms at c=16.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RETRANSMIT = 2.0  # RFC 7252 ACK_TIMEOUT
MAX_TRIES = 4


def pack_payload() -> bytes:
    import cbor2

    return bytes(
        cbor2.dumps(
            [
                {-2: "bench-1/", -4: "Cel", 0: "t1", 2: 21.5},
                {0: "t2", 2: 22.5},
                {0: "t3", 2: 23.5},
                {0: "t4", 2: 24.5},
                {0: "hum", 1: "%RH", 2: 40.0},
            ]
        )
    )


def coap_post(mid: int, token: bytes, path: str, payload: bytes) -> bytes:
    """A CON POST with Uri-Path, Content-Format 112 and a payload, encoded by hand."""
    out = bytearray([0x40 | len(token), 0x02, mid >> 8, mid & 0xFF])
    out += token
    seg = path.encode()
    out += bytes([0xB0 | len(seg)]) + seg  # option 11 (Uri-Path), delta 11
    out += bytes([0x11, 112])  # option 12 (Content-Format), delta 1, length 1
    out += b"\xff" + payload
    return bytes(out)


class Slot(asyncio.DatagramProtocol):
    """One in-flight request. Matches a piggybacked response by message ID, and a separate
    response (after an empty ACK, when the server took longer than EMPTY_ACK_DELAY) by
    token, which it acknowledges as a device would."""

    def __init__(self) -> None:
        self.waiting: asyncio.Future[bytes] | None = None
        self.mid = -1
        self.token = b""
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) < 4 or self.waiting is None or self.waiting.done():
            return
        mtype, tkl, code = (data[0] >> 4) & 3, data[0] & 0xF, data[1]
        mid = data[2] << 8 | data[3]
        if code == 0:
            return  # empty ACK: the response will come separately
        if (mid == self.mid and mtype == 2) or data[4 : 4 + tkl] == self.token:
            if mtype == 0 and self.transport is not None:  # separate CON response: ACK it
                self.transport.sendto(bytes([0x60, 0, data[2], data[3]]))
            self.waiting.set_result(data)


async def load(
    host: str, port: int, requests: int, concurrency: int
) -> tuple[list[float], int, float]:
    loop = asyncio.get_running_loop()
    payload = pack_payload()
    latencies: list[float] = []
    failures = 0
    codes: collections.Counter[str] = collections.Counter()
    remaining = requests
    start_all = time.perf_counter()

    async def worker(n: int) -> None:
        nonlocal remaining, failures
        transport, slot = await loop.create_datagram_endpoint(
            Slot, remote_addr=(host, port), family=socket.AF_INET
        )
        mid = random.randrange(65536)
        try:
            while remaining > 0:
                remaining -= 1
                mid = (mid + 1) & 0xFFFF
                slot.mid = mid
                slot.token = n.to_bytes(2, "big") + (mid & 0xFF).to_bytes(1, "big")
                msg = coap_post(mid, slot.token, "telemetry", payload)
                t0 = time.perf_counter()
                for _ in range(MAX_TRIES):
                    slot.waiting = loop.create_future()
                    transport.sendto(msg)
                    try:
                        reply = await asyncio.wait_for(slot.waiting, RETRANSMIT)
                    except TimeoutError:
                        continue
                    if reply[1] == 0x44:  # 2.04 Changed
                        latencies.append(time.perf_counter() - t0)
                    else:
                        failures += 1
                        codes[f"{reply[1] >> 5}.{reply[1] & 31:02d}"] += 1
                    break
                else:
                    failures += 1
                    codes["timeout"] += 1
        finally:
            transport.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    if codes:
        print(f"  (c={concurrency}: not 2.04: {dict(codes)})", flush=True)
    return latencies, failures, time.perf_counter() - start_all


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the two servers (each in its own process) ------------------------------------------


class GcPauses:
    """Longest garbage-collector pause per generation (a full collection of a big heap is
    what stalls every request at once)."""

    def __init__(self) -> None:
        self.longest = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.longest[g] = max(self.longest[g], time.perf_counter() - self._t0)

    def report(self) -> str:
        return (
            f"gen2 collections {self.count[2]}, longest gen2 pause "
            f"{self.longest[2] * 1000:.1f} ms, longest gen0/1 "
            f"{max(self.longest[:2]) * 1000:.1f} ms"
        )


async def until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def serve_gateway(port: int, db: str, stock: bool = False) -> None:
    import gateway.coap  # noqa: F401 - registers the coap schema before the store opens
    from gateway.coap.config import CoapConfig
    from gateway.coap.service import CoapServer
    from gateway.daemon import freeze_startup_objects, tune_process
    from gateway.store import EventStore

    if stock:
        # For comparison only: aiocoap's own duplicate detection instead of DedupCache.
        from aiocoap.messagemanager import MessageManager

        from gateway.coap.lean import LeanMessageManager

        LeanMessageManager._deduplicate_message = MessageManager._deduplicate_message
        LeanMessageManager._store_response_for_duplicates = (
            MessageManager._store_response_for_duplicates
        )
    pauses = GcPauses()

    store = await EventStore.open(db)
    config = CoapConfig(
        bind=("127.0.0.1",),
        port=port,
        allow_unauthenticated=True,
        accept_unknown_devices=True,
        rate_per_source=0.0,  # the load generator is one source: measure the server, not the bucket
    )
    server = CoapServer(config, store)
    tune_process()  # what gatewayd does for its whole process
    await server.start()
    freeze_startup_objects()
    print("READY", flush=True)
    try:
        await until_terminated()
    finally:
        print(pauses.report(), flush=True)
        await server.stop()
        await store.close()


async def serve_bare(port: int) -> None:
    import aiocoap
    from aiocoap import resource

    class Changed(resource.Resource):  # type: ignore[misc]
        async def render_post(self, request: aiocoap.Message) -> aiocoap.Message:
            return aiocoap.Message(code=aiocoap.CHANGED)

    pauses = GcPauses()
    site = resource.Site()
    site.add_resource(("telemetry",), Changed())
    await aiocoap.Context.create_server_context(
        site, bind=("::ffff:127.0.0.1", port), transports=["udp6"]
    )
    print("READY", flush=True)
    await until_terminated()
    print(pauses.report(), flush=True)


def start_server(kind: str, port: int, db: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port), "--db", db],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"READY" not in line:
        proc.kill()
        raise SystemExit(f"{kind} server did not start")
    return proc


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument(
        "--with-stock",
        action="store_true",
        help="also run the gateway with aiocoap's own duplicate detection",
    )
    ap.add_argument("--serve", choices=["gateway", "gateway-stock", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve in ("gateway", "gateway-stock"):
        asyncio.run(serve_gateway(args.port, args.db, stock=args.serve == "gateway-stock"))
        return 0
    if args.serve == "bare":
        asyncio.run(serve_bare(args.port))
        return 0

    levels = [int(x) for x in args.levels.split(",")]
    results: dict[tuple[str, int], tuple[float, list[float], int]] = {}
    gc_line: dict[tuple[str, int], str] = {}
    print(
        f"CoAP POST /telemetry, 5-record SenML CBOR pack; {args.requests} requests per level "
        f"(c=1: {max(1, args.requests // 20)}), fresh server per row; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'server':13} {'c':>3} {'req':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99.9':>7} {'max':>7} {'fail':>5} {'RSS MB before->after':>22}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        kinds = ["bare", "gateway"] + (["gateway-stock"] if args.with_stock else [])
        for c in levels:
            n = max(1, args.requests // 20) if c == 1 else args.requests
            for kind in kinds:
                # A fresh server per level: every row starts from the same state.
                port = free_udp_port()
                proc = start_server(kind, port, str(Path(tmp) / f"{kind}-{c}.db"))
                try:
                    # Warm-up (imports, first allocations, sqlite pages) before measuring.
                    _lat, warm_fails, _ = asyncio.run(load("127.0.0.1", port, 500, 4))
                    if warm_fails:
                        raise SystemExit(f"{kind}: {warm_fails} of 500 warm-up requests failed")
                    before = rss_mb(proc.pid)
                    lat, fails, elapsed = asyncio.run(load("127.0.0.1", port, n, c))
                    after = rss_mb(proc.pid)
                    rate = len(lat) / elapsed
                    results[(kind, c)] = (rate, lat, fails)
                    print(
                        f"{kind:13} {c:>3} {n:>7} {rate:>8.0f} {pct(lat, 50):>7.2f} "
                        f"{pct(lat, 99):>7.2f} {pct(lat, 99.9):>7.2f} "
                        f"{(max(lat) * 1000 if lat else float('nan')):>7.1f} {fails:>5} "
                        f"{before:>10.1f} -> {after:<8.1f}",
                        flush=True,
                    )
                finally:
                    proc.terminate()
                    try:
                        out, _ = proc.communicate(timeout=30)
                        gc_line[(kind, c)] = out.decode().strip()
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    print()
    for (kind, c), line in gc_line.items():
        print(f"{kind:13} c={c:<3} GC: {line}")
    for c in levels:
        if ("bare", c) in results and ("gateway", c) in results:
            g, b = results[("gateway", c)][0], results[("bare", c)][0]
            print(f"c={c:<3} gateway/bare requests/s: {g:.0f}/{b:.0f} = {g / b:.2f}x")
    if ("gateway", 16) in results:
        lat = results[("gateway", 16)][1]
        print(
            f"targets at c=16: ratio >= 0.90, p99.9 <= 20 ms (gateway p99.9 "
            f"{pct(lat, 99.9):.2f} ms, median {statistics.median(lat) * 1000:.2f} ms); "
            "RSS after 100k <= 64 MB (see the gateway c=16 row)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
