"""`gatewayctl export`: readings from the event log as CSV or NDJSON, for any time range.

The log is read in pages of `PAGE` events by sequence number, each page its own short read
transaction on a read-only connection: memory stays flat for any range, and the daemon's
checkpoints are never held up by a long export (WAL readers pin the WAL while they read).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import cbor2

from gateway.cli.common import fail, with_db
from gateway.cli.core import parse_duration
from gateway.errors import EXIT_OK, EXIT_USAGE
from gateway.store import queries

#: Events per read transaction.
PAGE = 2000
COLUMNS = ("time", "device", "point", "value", "unit", "seq")
#: One exported reading: (time, device, point, value, unit, seq).
Row = tuple[float, str, str, Any, str | None, int]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="readings from the log as CSV or NDJSON (any range, while the daemon runs)",
        description=(
            "Stream readings from the event log. DEVICE selects a device, DEVICE/POINT one "
            "point; none means every device. --since/--until take a duration back from now "
            "(30s, 15m, 2h, 7d) or an ISO 8601 time (without an offset: local time)."
        ),
    )
    p.add_argument("select", nargs="*", metavar="DEVICE[/POINT]")
    p.add_argument("--since", help="start (a duration ago, or an ISO 8601 time); default: all")
    p.add_argument("--until", help="end, exclusive (a duration ago, or an ISO 8601 time)")
    p.add_argument("--format", choices=("csv", "ndjson"), default="csv")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p.set_defaults(func=cmd_export)


def parse_time(text: str, now: float) -> float:
    """A duration back from `now` (`90s`, `15m`, `2h`, `7d`) or an ISO 8601 time."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"not a duration or an ISO 8601 time: {text!r} (e.g. 2h, 7d, 2026-12-01T08:00)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # a technician's wall clock
    return dt.timestamp()


def parse_selection(items: Sequence[str]) -> dict[str, set[str] | None]:
    """DEVICE -> None (all points) or the set of points asked for."""
    out: dict[str, set[str] | None] = {}
    for item in items:
        device, sep, point = item.partition("/")
        if not device or (sep and not point) or "/" in point:
            raise ValueError(f"{item!r}: expected DEVICE or DEVICE/POINT")
        if not sep:
            out[device] = None
        elif device not in out or out[device] is not None:
            points = out.setdefault(device, set())
            assert points is not None
            points.add(point)
    return out


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rows(
    conn: sqlite3.Connection,
    selection: dict[str, set[str] | None],
    since: float | None,
    until: float | None,
) -> Iterator[Row]:
    """Readings in log order, page by page."""
    # Bisection over seq bounds the range; the filter on wall_time stays, since a clock
    # step can put an event's wall time out of order with its sequence number.
    lo = 0 if since is None else queries.seq_at(conn, since) - 1
    hi = None if until is None else queries.seq_at(conn, until) - 1
    sql = "SELECT seq, stream, wall_time, data FROM events WHERE seq > ? AND type = 'readings'"
    params: list[Any] = []
    if selection:
        sql += f" AND stream IN ({','.join('?' * len(selection))})"
        params += [f"device:{d}" for d in selection]
    if hi is not None:
        sql += " AND seq <= ?"
        params.append(hi)
    sql += " ORDER BY seq LIMIT ?"
    while True:
        page = conn.execute(sql, [lo, *params, PAGE]).fetchall()
        if not page:
            return
        for seq, stream, wall, blob in page:
            if (since is not None and wall < since) or (until is not None and wall >= until):
                continue
            device = stream[7:]  # "device:"
            wanted = selection.get(device) if selection else None
            for rec in cbor2.loads(blob).get("r", ()):
                if not isinstance(rec, dict):
                    continue
                point = rec.get("n")
                if not isinstance(point, str) or (wanted is not None and point not in wanted):
                    continue
                t = rec.get("t")
                ts = float(t) if isinstance(t, int | float) and math.isfinite(t) else wall
                yield ts, device, point, rec.get("v"), rec.get("u"), seq
        lo = page[-1][0]


def _cell(v: Any) -> Any:
    """A value as CSV/JSON can carry it: bytes as hex, NaN and infinities by name."""
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def write(out: TextIO, fmt: str, items: Iterator[Row]) -> int:
    n = 0
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(COLUMNS)
        for ts, device, point, value, unit, seq in items:
            w.writerow((iso(ts), device, point, _cell(value), unit or "", seq))
            n += 1
    else:
        dumps = json.dumps
        for ts, device, point, value, unit, seq in items:
            rec = {"time": iso(ts), "ts": ts, "device": device, "point": point,
                   "value": _cell(value), "unit": unit, "seq": seq}  # fmt: skip
            out.write(dumps(rec, allow_nan=False))
            out.write("\n")
            n += 1
    return n


def cmd_export(args: argparse.Namespace) -> int:
    now = time.time()
    try:
        selection = parse_selection(args.select)
        since = None if args.since is None else parse_time(args.since, now)
        until = None if args.until is None else parse_time(args.until, now)
    except ValueError as exc:
        return fail(f"export: {exc}", EXIT_USAGE)
    if since is not None and until is not None and until <= since:
        return fail("export: --until is not after --since", EXIT_USAGE)

    def run(conn: sqlite3.Connection) -> int:
        items = rows(conn, selection, since, until)
        if args.output is None:
            return write(sys.stdout, args.format, items)
        with open(args.output, "x", encoding="utf-8", newline="") as f:
            return write(f, args.format, items)

    try:
        n = with_db(args, run)
    except FileExistsError:
        return fail(f"export: {args.output} already exists (not overwritten)", EXIT_USAGE)
    if args.output is not None:
        print(f"{n} readings written to {args.output}", file=sys.stderr)
    return EXIT_OK
