"""`gatewayctl export`: readings from the log as CSV/NDJSON, while the daemon runs and after."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import cbor2

from gateway import config as cfg
from tests.support.daemon import VIRTUAL_CONFIG, Daemon, run_cli, start_daemon, write_config
from tests.support.peers import wait_until


def readings_in(db: Path) -> list[tuple[int, str, str, Any]]:
    """(seq, device, point, value) decoded straight from the events table."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out = []
        for seq, stream, blob in conn.execute(
            "SELECT seq, stream, data FROM events WHERE type = 'readings' ORDER BY seq"
        ):
            for r in cbor2.loads(blob)["r"]:
                out.append((seq, stream.removeprefix("device:"), r["n"], r["v"]))
        return out
    finally:
        conn.close()


def test_export_csv_and_ndjson_match_the_log(tmp_path: Path, daemon_factory: list[Daemon]) -> None:
    config = write_config(tmp_path)
    db = cfg.load(config).db_path
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(lambda: len(readings_in(db)) >= 60, "60 readings in the log")

    # While the daemon writes: every exported row is in the log as exported.
    r = run_cli(config, "export")
    assert r.returncode == 0, r.stderr
    live = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(live) >= 60
    logged = {(s, dev, p): v for s, dev, p, v in readings_in(db)}
    for row in live:
        assert float(row["value"]) == logged[(int(row["seq"]), row["device"], row["point"])]
    assert d.stop() == 0

    everything = readings_in(db)
    r = run_cli(config, "export", "--format", "ndjson")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["seq"], x["device"], x["point"], x["value"]) for x in recs] == everything
    assert all(x["time"].endswith("Z") and isinstance(x["ts"], float) for x in recs)

    r = run_cli(config, "export", "boiler-1/pressure", "meter-1")
    assert r.returncode == 0, r.stderr
    got = [(int(x["seq"]), x["device"], x["point"]) for x in csv.DictReader(io.StringIO(r.stdout))]
    want = [
        (s, dev, p) for s, dev, p, _ in everything if (dev, p) == ("boiler-1", "pressure")
        or dev == "meter-1"
    ]  # fmt: skip
    assert got == want and want

    # A range: --until in the past of every reading exports nothing but the header.
    r = run_cli(config, "export", "--until", "2000-01-01T00:00")
    assert r.returncode == 0 and r.stdout.splitlines() == ["time,device,point,value,unit,seq"]
    r = run_cli(
        config, "export", "--since", "1d", "--until", "2100-01-01T00:00+00:00", "--format", "ndjson"
    )
    assert r.returncode == 0 and len(r.stdout.splitlines()) == len(everything)

    out = tmp_path / "export.csv"
    r = run_cli(config, "export", "-o", str(out))
    assert r.returncode == 0 and f"{len(everything)} readings written" in r.stderr
    assert len(out.read_text().splitlines()) == len(everything) + 1
    r = run_cli(config, "export", "-o", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_export_rejects_bad_arguments_with_what_is_wrong(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    for args, message in [
        (["--since", "yesterday"], "not a duration or an ISO 8601 time: 'yesterday'"),
        (["--since", "1h", "--until", "2h"], "--until is not after --since"),
        (["boiler-1/"], "'boiler-1/': expected DEVICE or DEVICE/POINT"),
        (["--format", "xml"], "invalid choice: 'xml'"),
    ]:
        r = run_cli(config, "export", *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = run_cli(config, "export")  # nothing has run: no database yet
    assert r.returncode == 5 and "no database here" in r.stderr


WINDOWED = (
    VIRTUAL_CONFIG
    + """
[processing.meter-1.energy]
window = "1s"
counter = true
"""
)


def aggregates_in(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT seq, data FROM events WHERE type = 'aggregate' ORDER BY seq")
        return [{**cbor2.loads(blob), "seq": seq} for seq, blob in rows]
    finally:
        conn.close()


def test_export_aggregates_of_processing_windows(
    tmp_path: Path, daemon_factory: list[Daemon]
) -> None:
    config = write_config(tmp_path, WINDOWED)
    db = cfg.load(config).db_path
    d = start_daemon(config, tmp_path)
    daemon_factory.append(d)
    wait_until(lambda: len(aggregates_in(db)) >= 2, "two closed windows", attempts=600)
    assert d.stop() == 0
    logged = aggregates_in(db)
    r = run_cli(config, "export", "--aggregates", "--format", "ndjson")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["seq"], x["device"], x["point"], x["count"], x["sum"]) for x in recs] == [
        (a["seq"], "meter-1", "energy", a["count"], a["sum"]) for a in logged
    ]
    assert all(x["start"].endswith("Z") and x["window"] == 1 for x in recs)
    r = run_cli(config, "export", "--aggregates", "meter-1/energy")
    table = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [int(x["seq"]) for x in table] == [a["seq"] for a in logged]
    assert list(table[0]) == ["start", "end", "device", "point", "window", "count", "min",
                              "max", "mean", "last", "sum", "seq"]  # fmt: skip
    r = run_cli(config, "export", "--aggregates", "boiler-1")  # no windows there
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
