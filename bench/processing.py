"""Benchmark: readings/s through collection -> processing in a real gatewayd, against the same
daemon and devices without processing, measured in the same run.

Both runs: 10 virtual devices x 2 points (20 points, each with a deadband), polled as fast
as the daemon can (interval 1 ms), store `synchronous = "normal"` (so the CPU, not fsync,
is the limit). The processing run adds, for every point, a 1 s tumbling window and an
anomaly detector, plus 5 derived points and 10 alert rules with a local command channel.
A run counts the readings committed during `--seconds` (for processing: the readings the
processing service had handled by the end) and the daemon's CPU time from /proc/PID/stat.

    .venv/bin/python bench/processing.py [--seconds 10] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 10

HEADER = """
[gateway]
id = "gw-bench"
state_dir = "{work}/lib"
runtime_dir = "{work}/run"
log_level = "warning"
watchdog = false

[store]
synchronous = "normal"
check_interval = 3600
"""


def devices() -> str:
    out = []
    for i in range(DEVICES):
        out.append(f"""
[devices.d{i}]
driver = "virtual"
interval = 0.001
jitter = 0
[devices.d{i}.points.a]
signal = "random_walk"
base = 50.0
step = 1.0
deadband = 0.01
[devices.d{i}.points.b]
signal = "sine"
base = 20.0
amplitude = 5.0
period = 7.0
noise = 0.3
deadband = 0.01
""")
    return "".join(out)


def processing() -> str:
    out = []
    for i in range(DEVICES):
        for p in ("a", "b"):
            out.append(
                f'[processing.d{i}.{p}]\nwindow = "1s"\n'
                "anomaly = { alpha = 0.05, threshold = 4.0, warmup = 30 }\n"
            )
    for i in range(5):
        out.append(
            f'[derived.site.k{i}]\nexpr = "(x - y) * 1.5 / max(abs(z), 1)"\n'
            f'inputs = {{ x = "d{i}/a", y = "d{i}/b", z = "d{i + 5}/b" }}\nunit = "u"\n'
        )
    for i in range(10):
        out.append(
            f'[alerts.r{i}]\npoint = "d{i}/a"\nraise_above = {60 + i}\n'
            f'clear_below = {55 + i}\nmin_duration = "0.5s"\n'
        )
    out.append(f'[notify.log]\ncommand = ["{shutil.which("true") or "/bin/true"}"]\n')
    return "\n".join(out)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call(sock: Path, verb: str) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock))
        s.sendall(json.dumps({"verb": verb, "args": {}}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)["result"]


def readings_upto(db: Path, lo: int, hi: int) -> int:
    """Reading records in events with lo < seq <= hi."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n = 0
        for (blob,) in conn.execute(
            "SELECT data FROM events WHERE seq > ? AND seq <= ? AND type = 'readings' "
            "AND stream LIKE 'device:d%'",
            (lo, hi),
        ):
            n += len(cbor2.loads(blob).get("r", ()))
        return n
    finally:
        conn.close()


def run(work: Path, with_processing: bool, seconds: float) -> tuple[float, float, int]:
    """(readings/s, daemon CPU microseconds per reading, processing lag in events at end)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = work / "config.toml"
    cfg.write_text(HEADER.format(work=work) + devices() + (processing() if with_processing else ""))
    sock_path = work / "notify.sock"
    ctl = work / "run" / "gatewayd.sock"
    db = work / "lib" / "gateway.db"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.daemon", "--config", str(cfg)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            time.sleep(1.0)  # past start-up: steady state
            seq0 = _mark(ctl, with_processing)
            cpu0 = cpu_seconds(proc.pid)
            time.sleep(seconds)
            seq1 = _mark(ctl, with_processing)
            cpu1 = cpu_seconds(proc.pid)
            last = call(ctl, "status")["store"]["last_seq"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    n = readings_upto(db, seq0, seq1)
    return n / seconds, (cpu1 - cpu0) / max(n, 1) * 1e6, last - seq1


def _mark(ctl: Path, with_processing: bool) -> int:
    """The seq up to which readings count: committed, or handled by processing."""
    status = call(ctl, "status")
    if with_processing:
        return int(status["services"]["processing"]["processed_seq"])
    return int(status["store"]["last_seq"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    base: list[tuple[float, float, int]] = []
    proc: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="bench-processing-") as tmp:
        for i in range(args.runs):  # interleaved, so drift hits both alike
            base.append(run(Path(tmp) / f"base{i}", False, args.seconds))
            proc.append(run(Path(tmp) / f"proc{i}", True, args.seconds))
    b = statistics.median(r[0] for r in base)
    p = statistics.median(r[0] for r in proc)
    bc = statistics.median(r[1] for r in base)
    pc = statistics.median(r[1] for r in proc)
    print(f"without processing: {b:9.0f} readings/s  {bc:6.1f} us CPU per reading")
    print(f"with processing:    {p:9.0f} readings/s  {pc:6.1f} us CPU per reading"
          f"  (lag at end: {max(r[2] for r in proc)} events)")  # fmt: skip
    print(f"ratio: {p / b:.2f}x (target >= 0.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
