"""Benchmark: gatewayd start-up (spawn to READY=1) and RSS on the shipped config.

Baseline, measured in the same run: a bare `python -c "import asyncio, sqlite3"` process
(spawn to exit, and its RSS when asyncio and sqlite3 are loaded): what any Python daemon of
ours costs before it does anything.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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


def run_baseline() -> tuple[float, int]:
    code = (
        "import asyncio, sqlite3, sys\n"
        "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]); sys.stdout.flush()"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, int(out.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of running before RSS")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-", dir=ROOT / "var"))
    try:
        d = [run_daemon(work, args.settle) for _ in range(args.runs)]
        b = [run_baseline() for _ in range(args.runs)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ready = statistics.median(x[0] for x in d)
    rss_r = statistics.median(x[1] for x in d) / 1024
    rss_s = statistics.median(x[2] for x in d) / 1024
    base_t = statistics.median(x[0] for x in b)
    base_rss = statistics.median(x[1] for x in b) / 1024
    print(f"bench/daemon.py: gatewayd on the shipped config.toml, median of {args.runs} runs")
    print(f"{'':28}{'gatewayd':>10}{'bare python':>13}{'ratio':>8}")
    print(f"{'start to READY=1 / exit (s)':28}{ready:>10.3f}{base_t:>13.3f}{ready / base_t:>7.2f}x")
    print(f"{'RSS at READY (MiB)':28}{rss_r:>10.1f}{base_rss:>13.1f}{rss_r / base_rss:>7.2f}x")
    print(f"{'RSS after ' + format(args.settle, 'g') + ' s (MiB)':28}{rss_s:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
