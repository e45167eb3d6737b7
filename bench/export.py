"""Benchmark: `gatewayctl export` of N readings against a raw sqlite3 + cbor2 loop, same run.

Builds a database of `--readings` readings (two per event, 50 devices) with the store's own
schema, then runs, each as its own process and one after the other:

- baseline: one `SELECT ... ORDER BY seq` over the readings events, each decoded with cbor2
  and written with csv.writer, time as ISO 8601 (the least work that produces the same CSV);
- ours: `gatewayctl export --format csv`, and `--format ndjson`.

Both write to standard output, which is /dev/null.

For each it prints CPU seconds (user + system of the child, from os.wait4), readings per CPU
second, and the peak RSS (ru_maxrss): the export reads in pages, so its peak RSS must not
grow with the range — the run at N/10 readings is printed beside the one at N to show it.

    .venv/bin/python bench/export.py [--readings 1000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from gateway import events as ev  # noqa: E402
from gateway.store.schema import migrate  # noqa: E402

BASELINE = r"""
import csv, sqlite3, sys, cbor2
from datetime import UTC, datetime
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
w = csv.writer(sys.stdout, lineterminator="\n")
w.writerow(("time", "device", "point", "value", "unit", "seq"))
for seq, stream, wall, blob in conn.execute(
    "SELECT seq, stream, wall_time, data FROM events WHERE type = 'readings' ORDER BY seq"
):
    for r in cbor2.loads(blob)["r"]:
        t = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
        w.writerow((t, stream[7:], r["n"], r["v"], r.get("u") or "", seq))
"""


def build(path: Path, readings: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    migrate(conn)
    conn.execute("BEGIN")
    t0 = 1.7e9
    rows = []
    for i in range(readings // 2):
        data = cbor2.dumps({"r": [
            ev.reading_record("temp", 20.0 + (i % 100) / 10, "Cel"),
            ev.reading_record("hum", 40.0 + (i % 50) / 5, "%RH"),
        ]})  # fmt: skip
        rows.append((f"device:dev-{i % 50}", i // 50 + 1, "readings", t0 + i, t0 + i, "b", 1, data))
        if len(rows) == 10000:
            conn.executemany(
                "INSERT INTO events (stream, version, type, wall_time, mono_time, boot_id,"
                " synced, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            rows.clear()
    if rows:
        conn.executemany(
            "INSERT INTO events (stream, version, type, wall_time, mono_time, boot_id,"
            " synced, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def run(argv: list[str]) -> tuple[float, int]:
    """(CPU seconds, peak RSS in KiB) of one child process."""
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen(argv, stdout=null)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{argv} failed with status {status}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    args = ap.parse_args()
    tmp = Path(
        tempfile.mkdtemp(
            prefix="bench-export-", dir=ROOT / "var" if (ROOT / "var").is_dir() else None
        )
    )
    try:
        print(f"{'readings':>10} {'what':<25} {'CPU s':>8} {'readings/CPU s':>15} {'peak RSS':>10}")
        for n in (args.readings // 10, args.readings):
            state = tmp / f"state-{n}"
            state.mkdir()
            build(state / "gateway.db", n)
            config = tmp / f"config-{n}.toml"
            config.write_text(
                f'[gateway]\nid = "bench"\nstate_dir = "{state}"\nruntime_dir = "{tmp}/run"\n'
            )
            base_cpu, base_rss = run([sys.executable, "-c", BASELINE, str(state / "gateway.db")])
            print(f"{n:>10} {'raw sqlite3+cbor2 csv':<25} {base_cpu:>8.2f} "
                  f"{n / base_cpu:>15,.0f} {base_rss / 1024:>8.1f} MiB")  # fmt: skip
            for fmt in ("csv", "ndjson"):
                cpu, rss = run([sys.executable, "-m", "gateway.cli.main", "--config", str(config),
                                "export", "--format", fmt])  # fmt: skip
                print(f"{n:>10} {'gatewayctl export ' + fmt:<25} {cpu:>8.2f} "
                      f"{n / cpu:>15,.0f} {rss / 1024:>8.1f} MiB   "
                      f"CPU ratio {cpu / base_cpu:.2f}x of raw")  # fmt: skip
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
