"""Benchmark: gatewayd start-up (spawn to READY=1) and RSS on the shipped config.

The shipped config.toml serves the CoAP front door on loopback (section `[coap]`), so this
measures the daemon with it on. Targets (issue 15): READY <= 0.5 s, RSS at READY <= 30 MiB.

Baselines, measured in the same run (spawn until the process reports, and its RSS then):
- bare python: an interpreter that imports nothing;
- python + asyncio + sqlite3: what any Python daemon of ours costs before it does anything;
- aiocoap server: asyncio + sqlite3 + aiocoap's server context with one resource, bound to
  127.0.0.1 over UDP only: its difference to the line before is what the CoAP library
  alone costs.

    .venv/bin/python bench/daemon.py [--runs 5] [--settle 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TARGET_S = 0.5
RSS_TARGET_MIB = 30.0

_RSS = "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0], flush=True)"

BASELINES: dict[str, tuple[str, dict[str, str]]] = {
    "bare python": (_RSS, {}),
    "asyncio+sqlite3": ("import asyncio, sqlite3\n" + _RSS, {}),
    "aiocoap server": (
        "import asyncio, sqlite3, aiocoap, aiocoap.resource as r\n"
        "class Hello(r.Resource):\n"
        "    async def render_get(self, request):\n"
        "        return aiocoap.Message(payload=b'hi')\n"
        "async def main():\n"
        "    site = r.Site()\n"
        "    site.add_resource(('hello',), Hello())\n"
        "    ctx = await aiocoap.Context.create_server_context(site, bind=('127.0.0.1', 0))\n"
        f"    {_RSS}\n"
        "    await ctx.shutdown()\n"
        "asyncio.run(main())\n",
        # UDP only (as the daemon): aiocoap otherwise opens TCP and WebSocket listeners too.
        {"AIOCOAP_SERVER_TRANSPORT": "udp6"},
    ),
}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_daemon(work: Path, settle: float) -> tuple[float, int, int]:
    """(seconds from spawn to READY=1, RSS KiB at READY, RSS KiB after `settle` s)."""
    cfg = work / "config.toml"
    text = (ROOT / "config.toml").read_text()
    text = text.replace('state_dir = "var/lib"', f'state_dir = "{work}/lib"')
    text = text.replace('runtime_dir = "var/run"', f'runtime_dir = "{work}/run"')
    cfg.write_text(text)
    sock_path = work / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/gatewayd"), "--config", str(cfg)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            ready = time.perf_counter() - t0
            rss_ready = rss_kib(proc.pid)
            time.sleep(settle)  # let it poll its devices for a while: steady-state RSS
            rss_settled = rss_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    sock_path.unlink()
    shutil.rmtree(work / "lib", ignore_errors=True)
    return ready, rss_ready, rss_settled


def run_baseline(name: str) -> tuple[float, int]:
    """(seconds from spawn to the process reporting its RSS, that RSS in KiB)."""
    code, extra_env = BASELINES[name]
    t0 = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, **extra_env},
        stdout=subprocess.PIPE, text=True,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - t0
        proc.stdout.read()
    if proc.returncode != 0 or not line.strip():
        raise RuntimeError(f"baseline {name!r} failed (exit {proc.returncode})")
    return elapsed, int(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of running before RSS")
    args = ap.parse_args()
    coap = tomllib.loads((ROOT / "config.toml").read_text()).get("coap")
    (ROOT / "var").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir=ROOT / "var"))
    try:
        d: list[tuple[float, int, int]] = []
        b: dict[str, list[tuple[float, int]]] = {name: [] for name in BASELINES}
        for _ in range(args.runs):  # interleaved, so load from elsewhere hits every side
            d.append(run_daemon(work, args.settle))
            for name in BASELINES:
                b[name].append(run_baseline(name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ready = statistics.median(x[0] for x in d)
    rss_r = statistics.median(x[1] for x in d) / 1024
    rss_s = statistics.median(x[2] for x in d) / 1024
    base_t = {n: statistics.median(x[0] for x in v) for n, v in b.items()}
    base_rss = {n: statistics.median(x[1] for x in v) / 1024 for n, v in b.items()}
    where = f"CoAP on {coap.get('bind')} port {coap.get('port', 5683)}" if coap else "CoAP off"
    print(f"bench/daemon.py: gatewayd on the shipped config.toml ({where}), "
          f"median of {args.runs} runs")  # fmt: skip
    names = list(BASELINES)
    print(f"{'':28}{'gatewayd':>10}" + "".join(f"{n:>17}" for n in names))
    print(f"{'start to READY / report (s)':28}{ready:>10.3f}"
          + "".join(f"{base_t[n]:>17.3f}" for n in names))  # fmt: skip
    print(f"{'RSS at READY (MiB)':28}{rss_r:>10.1f}"
          + "".join(f"{base_rss[n]:>17.1f}" for n in names))  # fmt: skip
    print(f"{'RSS after ' + format(args.settle, 'g') + ' s (MiB)':28}{rss_s:>10.1f}")
    print(f"{'gatewayd / baseline, RSS':28}{'':>10}"
          + "".join(f"{rss_r / base_rss[n]:>16.2f}x" for n in names))  # fmt: skip
    print(f"{'gatewayd / baseline, start':28}{'':>10}"
          + "".join(f"{ready / base_t[n]:>16.2f}x" for n in names))  # fmt: skip
    extra = rss_r - base_rss["asyncio+sqlite3"]
    coap_cost = base_rss["aiocoap server"] - base_rss["asyncio+sqlite3"]
    print(f"gatewayd over asyncio+sqlite3: {extra:.1f} MiB; an aiocoap server alone adds "
          f"{coap_cost:.1f} MiB to asyncio+sqlite3")  # fmt: skip
    ok_t = "ok" if ready <= READY_TARGET_S else "OVER"
    ok_m = "ok" if rss_r <= RSS_TARGET_MIB else "OVER"
    print(f"targets: READY <= {READY_TARGET_S} s: {ok_t}; RSS at READY <= {RSS_TARGET_MIB:g} MiB: "
          f"{ok_m}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
