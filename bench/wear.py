"""Benchmark: bytes written to storage per event (SD-card wear) on the shipped config.

For each `[store]` setting below, runs gatewayd on the shipped `config.toml` (its three
virtual devices, about 1.7 events/s at their real rates; directories moved to a temporary
folder under var/ on the real disk, since a RAM-backed /tmp writes nothing to storage) for
`--seconds`, then stops it with SIGTERM. The load is sped up: every device interval and the
commit interval are divided by `--speedup` (so each commit holds the same events as at the
real rate, and 60 s stand for 10 minutes, checkpoints included).

Bytes written are the kernel's count for the daemon's process (`write_bytes` of
/proc/PID/io at READY=1, then `ru_oublock` x 512 at exit: everything from the first event
to the final checkpoint at stop), divided by the events appended in that time. Beside it:
the events' own bytes (CBOR payloads), and the ratio of the first row to each setting,
measured in the same run: `--before REV` puts an older revision's daemon (its own code and
defaults) first; `each` is this code committing every append on its own with 4 KiB pages.

    .venv/bin/python bench/wear.py [--seconds 60] [--speedup 10] [--settings each,default]
        [--before REV]   # also the daemon of git revision REV (e.g. b995f88), same run
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: gateway.config's default, written out so that a speed-up can scale it too.
DEFAULT_COMMIT_INTERVAL = 3.0

#: name -> extra `[store]` keys. The first is the baseline every ratio refers to.
SETTINGS: dict[str, str] = {
    "each": "commit_interval = 0\npage_size = 4096",
    "default": "",
    "c0": "commit_interval = 0",
    "c1": "commit_interval = 1",
    "c2": "commit_interval = 2",
    "c3-p4096": "commit_interval = 3\npage_size = 4096",
    "c3-p512": "commit_interval = 3\npage_size = 512",
    "c5": "commit_interval = 5",
}


def write_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/PID/io")


def config_for(work: Path, extra: str, speedup: float, old: bool = False) -> Path:
    """The shipped config in `work`, with `extra` [store] keys, every device interval and
    the commit interval divided by `speedup` (the same events per commit, sooner)."""
    text = (ROOT / "config.toml").read_text()
    text = re.sub(
        r"^interval = ([0-9.]+)",
        lambda m: f"interval = {float(m.group(1)) / speedup:g}",
        text,
        flags=re.M,
    )
    if "commit_interval" not in extra and not old:  # an old revision has no such key
        extra = f"commit_interval = {DEFAULT_COMMIT_INTERVAL}\n{extra}".strip()
    extra = re.sub(
        r"commit_interval = ([0-9.]+)",
        lambda m: f"commit_interval = {float(m.group(1)) / speedup:g}",
        extra,
    )
    text = text.replace('state_dir = "var/lib"', f'state_dir = "{work}/lib"')
    text = text.replace('runtime_dir = "var/run"', f'runtime_dir = "{work}/run"')
    if extra:
        text = text.replace("[store]\n", f"[store]\n{extra}\n", 1)
    path = work / "config.toml"
    path.write_text(text)
    return path


def last_seq(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
    finally:
        conn.close()


def own_bytes(db: Path, after: int) -> tuple[int, int]:
    """(events after seq `after`, their payload bytes)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n, size = conn.execute(
            "SELECT count(*), coalesce(sum(length(data) + length(stream) + length(type)), 0) "
            "FROM events WHERE seq > ?",
            (after,),
        ).fetchone()
        return int(n), int(size)
    finally:
        conn.close()


def run(
    work: Path, extra: str, seconds: float, speedup: float, tree: Path | None = None
) -> tuple[int, int, int]:
    """(events, bytes written by the daemon, events' own bytes). `tree`: run the daemon of
    that source tree (an older revision) instead of this one."""
    config = config_for(work, extra, speedup, old=tree is not None)
    sock_path = work / "notify.sock"
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
        open(work / "gatewayd.log", "w") as log_file,
    ):
        sock.bind(str(sock_path))
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        env.pop("STATE_DIRECTORY", None)
        env.pop("RUNTIME_DIRECTORY", None)
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.daemon", "--config", str(config)],
            env=env, stdout=subprocess.DEVNULL, stderr=log_file, cwd=tree or ROOT,
        )  # fmt: skip
        try:
            sock.settimeout(1)
            while True:  # READY=1, or the daemon's exit (its log says why)
                try:
                    if b"READY=1" in sock.recv(4096):
                        break
                except TimeoutError:
                    if proc.poll() is not None:
                        log = (work / "gatewayd.log").read_text()
                        raise SystemExit(f"gatewayd exited: {log}") from None
            at_ready = write_bytes(proc.pid)
            db = work / "lib" / "gateway.db"
            first = last_seq(db)
            time.sleep(seconds)  # the load is the devices' own schedule: wall time is the point
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        log = (work / "gatewayd.log").read_text()[-3000:]
        raise SystemExit(f"gatewayd exited with status {status}; its log ends:\n{log}")
    events, size = own_bytes(db, first)
    return events, usage.ru_oublock * 512 - at_ready, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument(
        "--speedup", type=float, default=10.0,
        help="device and commit intervals divided by this (10: 60 s stand for 10 minutes)",
    )  # fmt: skip
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    ap.add_argument(
        "--before", metavar="REV",
        help="also run git revision REV (e.g. the last release) first, with its own defaults",
    )  # fmt: skip
    args = ap.parse_args()
    names = [n for n in args.settings.split(",") if n]
    old: Path | None = None
    if args.before:
        old = Path(tempfile.mkdtemp(prefix="bench-wear-rev-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old),
                        args.before], check=True)  # fmt: skip
        SETTINGS[args.before] = ""
        names.insert(0, args.before)
    base = ROOT / "var"
    base.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-wear-", dir=base))
    print(
        f"shipped config sped up {args.speedup:g}x (intervals divided), {args.seconds:g} s "
        f"per setting = {args.seconds * args.speedup / 60:g} min of real load; files in {tmp}"
    )
    print(f"{'setting':<12} {'[store] keys':<40} {'events':>7} {'written':>10} "
          f"{'B/event':>8} {'own B/ev':>9} {'vs ' + names[0]:>12}")  # fmt: skip
    first: float | None = None
    try:
        for name in names:
            work = tmp / name
            work.mkdir()
            tree = old if name == args.before else None
            events, written, size = run(work, SETTINGS[name], args.seconds, args.speedup, tree)
            per = written / max(events, 1)
            first = per if first is None else first
            keys = SETTINGS[name].replace("\n", ", ") or "(defaults)"
            if tree is not None:
                keys = f"(revision {args.before}: its defaults)"
            print(f"{name:<12} {keys:<40} {events:>7} "
                  f"{written / 1024:>8.0f} K {per:>8.0f} {size / max(events, 1):>9.0f} "
                  f"{first / per if per else float('inf'):>11.1f}x")  # fmt: skip
    finally:
        shutil.rmtree(tmp)
        if old is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False)  # fmt: skip


if __name__ == "__main__":
    main()
