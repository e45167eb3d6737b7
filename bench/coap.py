"""CoAP front door under load: the gateway vs a bare aiocoap server vs libcoap, same run.

    .venv/bin/python bench/coap.py [--requests N] [--levels 1,16,64]

The load comes from bench/coapload.c, compiled here with the system's cc into a temporary
directory and run as its own process (C, one UDP socket, never the bottleneck): CON POSTs of
a 5-record SenML CBOR pack to /telemetry, CONCURRENCY in flight, retransmitted after 2 s
like a device would. Servers, each in its own process, a fresh one per row, interleaved:

  (a) libcoap 4.3's `coap-server-notls -d 10` (C; POST creates/updates a resource: 2.04);
  (b) a bare aiocoap server whose resource only answers 2.04 and stores nothing
      (stock `Context.create_server_context`, udp6 only);
  (c) the gateway: `CoapServer` + `EventStore` (group commit, synchronous=full), started the
      way gatewayd starts it, every 2.04 sent after the commit. On this machine's disk a
      commit takes well under 2 ms, so the store commits in the event loop's thread;
  (d) `gateway-thread`: the same with every COMMIT in the store's writer thread, which is
      what the store does where an fsync is slow (an SD card): the cost of that hand-off.

Per row: requests/s, p50/p99/p99.9 latency, the server's RSS before and after, and the
server's CPU per request (utime + stime of the server process only, /proc/PID/stat, over
the measured requests): the headline figure, since it does not move when the machine is
busy. Targets (issue 16): gateway CPU per request <= 0.5x bare aiocoap's; gateway p99.9
<= 20 ms at c=16; gateway RSS after 100k requests <= 48 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def build_loadgen(tmp: str) -> str:
    """bench/coapload.c compiled with the system's cc into `tmp` (never committed)."""
    exe = str(Path(tmp) / "coapload")
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [cc, "-O2", "-o", exe, str(ROOT / "bench" / "coapload.c")], check=True, timeout=120
    )
    return exe


def load(exe: str, port: int, path: str, requests: int, concurrency: int) -> dict[str, str]:
    """One run of the C load generator in its own process; its key=value line."""
    proc = subprocess.run(
        [exe, "127.0.0.1", str(port), path, str(requests), str(concurrency),
         pack_payload().hex(), "112"],
        capture_output=True, check=True, timeout=3600, text=True,
    )  # fmt: skip
    return dict(kv.split("=", 1) for kv in proc.stdout.split())


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


async def serve_gateway(port: int, db: str, stock: bool = False, thread: bool = False) -> None:
    import gateway.store.commit
    from gateway.coap import projection
    from gateway.coap.config import CoapConfig
    from gateway.coap.service import CoapServer
    from gateway.daemon import freeze_startup_objects, tune_process
    from gateway.store import EventStore

    if stock:
        # For comparison only: aiocoap's own duplicate detection instead of DedupCache
        # (the stock path of gateway.coap.aiocoap_compat).
        from gateway.coap import aiocoap_compat

        aiocoap_compat.use(aiocoap_compat.Internals(dedup=False, render=True, routing=True))
    if thread:  # as where commits are slow: every COMMIT in the writer thread
        gateway.store.commit.INLINE_COMMIT_LIMIT = 0.0
    pauses = GcPauses()

    projection.register()  # the coap schema, before the store opens
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
    if kind == "libcoap":
        exe = shutil.which("coap-server-notls")
        if exe is None:
            raise SystemExit("libcoap's coap-server-notls is missing (apt: libcoap3-bin)")
        return subprocess.Popen(
            [exe, "-A", "127.0.0.1", "-p", str(port), "-d", "10"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument(
        "--with-stock",
        action="store_true",
        help="also run the gateway with aiocoap's own duplicate detection",
    )
    ap.add_argument(
        "--serve",
        choices=["gateway", "gateway-thread", "gateway-stock", "bare"],
        help=argparse.SUPPRESS,
    )
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve in ("gateway", "gateway-thread", "gateway-stock"):
        asyncio.run(
            serve_gateway(
                args.port,
                args.db,
                stock=args.serve == "gateway-stock",
                thread=args.serve == "gateway-thread",
            )
        )
        return 0
    if args.serve == "bare":
        asyncio.run(serve_bare(args.port))
        return 0

    levels = [int(x) for x in args.levels.split(",")]
    kinds = ["libcoap", "bare", "gateway", "gateway-thread"]
    kinds += ["gateway-stock"] if args.with_stock else []
    cpu: dict[tuple[str, int], float] = {}
    rows: dict[tuple[str, int], dict[str, str]] = {}
    gc_line: dict[tuple[str, int], str] = {}
    print(
        f"CoAP CON POST /telemetry, 5-record SenML CBOR pack ({len(pack_payload())} bytes), "
        f"C load generator in its own process; {args.requests} requests per row "
        f"(c=1: {max(1, args.requests // 20)}; libcoap 10x), fresh server per row; "
        f"{os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'server':13} {'c':>3} {'req':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99.9':>7} {'max':>7} {'fail':>5} {'CPU us/req':>10} {'RSS MB before->after':>22}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_loadgen(tmp)
        for c in levels:
            for kind in kinds:
                n = max(1, args.requests // 20) if c == 1 else args.requests
                if kind == "libcoap":
                    n *= 10  # its CPU per request is a few us: enough ticks of /proc/PID/stat
                # A fresh server per row: every row starts from the same state.
                port = free_udp_port()
                proc = start_server(kind, port, str(Path(tmp) / f"{kind}-{c}.db"))
                try:
                    # Warm-up (imports, first allocations, sqlite pages) before measuring;
                    # for libcoap it is also the readiness check (retransmissions).
                    warm = load(exe, port, "telemetry", 500, 4)
                    if int(warm["ok"]) < 499:  # libcoap's first answer is 2.01 Created
                        raise SystemExit(f"{kind}: warm-up failed: {warm}")
                    before, cpu0 = rss_mb(proc.pid), cpu_seconds(proc.pid)
                    row = load(exe, port, "telemetry", n, c)
                    after, cpu1 = rss_mb(proc.pid), cpu_seconds(proc.pid)
                    rows[(kind, c)] = row
                    answered = int(row["ok"]) + int(row["fail"])
                    cpu[(kind, c)] = (cpu1 - cpu0) / max(1, answered) * 1e6
                    rate = int(row["ok"]) / float(row["elapsed"])
                    print(
                        f"{kind:13} {c:>3} {n:>7} {rate:>8.0f} {float(row['p50']):>7.2f} "
                        f"{float(row['p99']):>7.2f} {float(row['p999']):>7.2f} "
                        f"{float(row['max']):>7.1f} {row['fail']:>5} {cpu[(kind, c)]:>10.1f} "
                        f"{before:>10.1f} -> {after:<8.1f}",
                        flush=True,
                    )
                    if int(row["fail"]):
                        print(f"  ({kind} c={c}: answers {row['codes']})", flush=True)
                finally:
                    proc.terminate()
                    try:
                        out, _ = proc.communicate(timeout=30)
                        if out:
                            gc_line[(kind, c)] = out.decode().strip()
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    print()
    for (kind, c), line in gc_line.items():
        print(f"{kind:13} c={c:<3} GC: {line}")
    for c in levels:
        if ("bare", c) in cpu and ("gateway", c) in cpu:
            g, b = cpu[("gateway", c)], cpu[("bare", c)]
            lc = cpu.get(("libcoap", c))
            gr = int(rows[("gateway", c)]["ok"]) / float(rows[("gateway", c)]["elapsed"])
            br = int(rows[("bare", c)]["ok"]) / float(rows[("bare", c)]["elapsed"])
            libcoap = f"; gateway/libcoap {g / lc:.1f}x" if lc else ""
            t = cpu.get(("gateway-thread", c))
            thread = f"; gateway-thread/bare {t:.0f}/{b:.0f} us = {t / b:.2f}x" if t else ""
            print(
                f"c={c:<3} server CPU per request: gateway/bare {g:.0f}/{b:.0f} us = "
                f"{g / b:.2f}x{libcoap}; requests/s gateway/bare {gr / br:.2f}x{thread}"
            )
    if ("gateway", 16) in rows:
        print(
            f"targets: CPU/request <= 0.50x bare; p99.9 at c=16 <= 20 ms (gateway: "
            f"{float(rows[('gateway', 16)]['p999']):.2f} ms); RSS after 100k <= 48 MB "
            "(the gateway rows' 'after')"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
