"""Benchmark: durable appends/s through `EventStore.append` against raw sqlite3, same run.

For 1, 16 and 256 concurrent producers (asyncio tasks, one device stream each, every task
awaiting its append before the next), count the appends acknowledged in a fixed time. The
baseline is plain sqlite3 writing the same rows into the same schema (imported from
gateway.store.schema): each event row, its outbox row and the upsert of its readings into
`latest`, committed in batches of 1000 under the same `synchronous` and WAL. Both encode the
CBOR payload inside the timed loop. The raw baseline does less than the store (no stream
version bookkeeping, no per-caller futures, no Event objects for the bus), so the ratio is a
conservative one. Two baselines: `raw same rows` writes exactly the rows the store writes
(per event: its row, its outbox row, one `latest` upsert per reading); `raw merged` also
folds a 1000-event batch's upserts per (device, point) (256 devices: 512 upserts instead of
2000), which the store, whose batches hold one event per producer, cannot do at 256
producers: fewer rows than the store writes, so a stricter comparison.

    .venv/bin/python bench/store.py [--seconds 8] [--producers 1,16,256] [--synchronous full]

Database files go to a temporary folder under var/ (not /tmp, which may be a RAM disk where
fsync costs nothing) and are removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402

from gateway import events as ev  # noqa: E402
from gateway.config import StoreConfig  # noqa: E402
from gateway.store import EventStore  # noqa: E402
from gateway.store.projections import encode_value  # noqa: E402
from gateway.store.schema import migrate  # noqa: E402
from gateway.sync.codec import Encoder  # noqa: E402

RAW_BATCH = 1000


def event_data(i: int) -> dict[str, Any]:
    """A typical readings event: two points with units."""
    return {
        "r": [
            ev.reading_record("temp", 20.0 + (i % 100) / 10, "Cel"),
            ev.reading_record("hum", 40.0 + (i % 50) / 5, "%RH"),
        ]
    }


def filesystem_of(path: Path) -> str:
    """Type and mount point of the filesystem holding `path` (fsync cost depends on it)."""
    target = str(path.resolve())
    mnt, fstype = "?", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                point, kind = line.split()[1:3]
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and (mnt == "?" or len(point) >= len(mnt)):
                    mnt, fstype = point, kind
    except OSError:
        pass
    return f"{fstype} at {mnt}"


def sync_codec(sync: bool) -> Encoder | None:
    """With --sync: outbox rows carry the encoded envelope, as in a gatewayd with [sync]."""
    return Encoder("cbor", "bench") if sync else None


async def bench_store(
    path: Path, producers: int, seconds: float, synchronous: str, sync: bool = False
) -> dict[str, float]:
    store = await EventStore.open(
        path,
        StoreConfig(synchronous=synchronous),
        gateway_id="bench",
        outbox_codec=sync_codec(sync),
    )
    stop = False
    counts = [0] * producers

    async def producer(k: int) -> None:
        stream = ev.device_stream(f"bench-{k}")
        i = 0
        while not stop:
            await store.append(stream, ev.READINGS, event_data(i))
            i += 1
        counts[k] = i

    try:
        batches0, appended0 = store.batches, store.appended
        start = time.perf_counter()
        tasks = [asyncio.create_task(producer(k)) for k in range(producers)]
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(
            *tasks
        )  # appends in flight finish (and count) before we stop the clock
        elapsed = time.perf_counter() - start
        batches = store.batches - batches0
        appended = store.appended - appended0
    finally:
        await store.close()
    total = sum(counts)
    assert total == appended, (total, appended)
    return {"rate": total / elapsed, "events": total, "commits": batches, "elapsed": elapsed}


def bench_raw(
    path: Path, devices: int, seconds: float, synchronous: str, *, merge: bool = True,
    sync: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Raw sqlite3. `merge`: upsert each (device, point) once per batch, its last value (what
    the store's projection does within a transaction); else one upsert per reading."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        migrate(conn)
        boot = "bench-boot"
        codec = sync_codec(sync)
        versions = [0] * devices
        seq = 0
        commits = 0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            rows: list[tuple[Any, ...]] = []
            outbox: list[tuple[Any, ...]] = []
            latest: dict[tuple[str, str], tuple[Any, str | None, float, int, float]] = {}
            every: list[tuple[str, str, Any, str | None, float, int, float]] = []
            for _ in range(RAW_BATCH):
                seq += 1
                d = seq % devices
                versions[d] += 1
                device = f"bench-{d}"
                stream = ev.device_stream(device)
                data = event_data(versions[d])
                now, mono = time.time(), time.monotonic()
                rows.append(
                    (seq, stream, versions[d], ev.READINGS, now, mono, boot, 1, cbor2.dumps(data))
                )
                outbox.append((seq, stream, versions[d], d + 1 if codec else None))
                for rec in data["r"]:
                    # The same row the store writes: value as stored, reading time, seq, seen.
                    value = (encode_value(rec["v"]), rec.get("u"), now, seq, now)
                    if merge:
                        latest[(device, rec["n"])] = value
                    else:
                        every.append((device, rec["n"], *value))
            bodies = codec.bodies(rows) if codec else [None] * len(rows)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            conn.executemany(  # (with --sync, the stream's id too, as the store writes it)
                "INSERT INTO outbox (seq, stream, attempts, version, sid, body) "
                "VALUES (?, ?, 0, ?, ?, ?)",
                [(*o, b) for o, b in zip(outbox, bodies, strict=True)],
            )
            conn.executemany(
                "INSERT INTO latest (device, point, value, unit, ts, seq, seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(device, point) DO UPDATE SET value = excluded.value,"
                " unit = excluded.unit, ts = excluded.ts, seq = excluded.seq, seen = excluded.seen",
                [(d, p, *rest) for (d, p), rest in latest.items()] if merge else every,
            )
            conn.execute("COMMIT")
            commits += 1
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    return {"rate": seq / elapsed, "events": seq, "commits": commits, "elapsed": elapsed}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: float(r["rate"]))[len(runs) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="store run per round")
    ap.add_argument("--raw-seconds", type=float, default=3.0, help="raw sqlite3 run per round")
    ap.add_argument(
        "--rounds", type=int, default=3,
        help="store and raw runs alternate this many times; medians are printed "
        "(a busy machine then slows both alike)",
    )  # fmt: skip
    ap.add_argument("--producers", default="1,16,256")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full")
    ap.add_argument("--dir", type=Path, default=ROOT / "var")
    ap.add_argument(
        "--sync", action="store_true",
        help="as with [sync] configured: outbox rows carry the encoded envelope (both sides)",
    )  # fmt: skip
    args = ap.parse_args()
    counts = [int(x) for x in args.producers.split(",")]

    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.dir))
    print(
        f"bench/store.py: durable appends/s, synchronous={args.synchronous.upper()}, WAL, "
        f"{os.cpu_count()} CPUs, database on {filesystem_of(work)}\n"
        f"store: EventStore.append from N concurrent producers, {args.seconds:g} s each; "
        f"raw: sqlite3 batches of {RAW_BATCH} (event + outbox + latest upsert), "
        f"{args.raw_seconds:g} s each; 2 readings per event, one device stream per producer"
        + ("; [sync] on: outbox rows carry the CBOR envelope" if args.sync else "")
    )
    header = (
        f"{'producers':>9}  {'store ev/s':>10}  {'commits':>7}  {'ev/commit':>9}"
        f"  {'raw same rows':>13}  {'ratio':>6}  {'raw merged':>10}  {'ratio':>6}"
    )
    print(header)
    try:
        for n in counts:
            raws, raw1s, sts = [], [], []
            for r in range(args.rounds):
                raws.append(
                    bench_raw(
                        work / f"raw-{n}-{r}.db", n, args.raw_seconds, args.synchronous,
                        sync=args.sync,
                    )
                )  # fmt: skip
                sts.append(
                    asyncio.run(
                        bench_store(
                            work / f"store-{n}-{r}.db", n, args.seconds, args.synchronous,
                            args.sync,
                        )
                    )
                )  # fmt: skip
                raw1s.append(
                    bench_raw(
                        work / f"raw1-{n}-{r}.db",
                        n,
                        args.raw_seconds,
                        args.synchronous,
                        merge=False,
                        sync=args.sync,
                    )
                )
            raw, raw1, st = _median(raws), _median(raw1s), _median(sts)
            print(
                f"{n:>9}  {st['rate']:>10,.0f}  {st['commits']:>7,.0f}"
                f"  {st['events'] / max(st['commits'], 1):>9.1f}"
                f"  {raw1['rate']:>13,.0f}  {st['rate'] / raw1['rate']:>5.2f}x"
                f"  {raw['rate']:>10,.0f}  {st['rate'] / raw['rate']:>5.2f}x",
                flush=True,
            )
        print(
            f"medians of {args.rounds} alternating rounds. "
            "ratio = store ev/s / raw ev/s (ev/s: events/s). raw same rows: the rows the store "
            "writes, one `latest` upsert per reading; raw merged: upserts folded per (device, "
            "point) per 1000-event batch (fewer rows)."
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
