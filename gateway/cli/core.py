"""The core verbs: status, devices, readings, events, db, config."""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from gateway import config as cfg
from gateway import parts
from gateway.cli.common import (
    ask_daemon,
    daemon_or_file,
    emit_json,
    fail,
    fmt_age,
    fmt_bytes,
    fmt_time,
    fmt_value,
    load_config,
    sparkline,
    table,
    with_db,
)
from gateway.control import call
from gateway.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    ConfigError,
)
from gateway.errors import DaemonUnavailableError as Down
from gateway.store import maintenance, open_readonly, queries


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("status", help="services, devices, store and backlog at a glance")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "devices", help="devices with availability and last seen; `devices ID`: one device "
        "with its pending and recent commands; `devices forget ID...`: remove devices that "
        "are not configured (evented)",
    )  # fmt: skip
    p.add_argument("device", nargs="?", metavar="ID|forget")
    p.add_argument("ids", nargs="*", metavar="ID", help="with forget: the devices to remove")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("readings", help="latest values of a device, with a sparkline")
    p.add_argument("device")
    p.add_argument("point", nargs="?")
    p.add_argument("--since", default="1h", help="history window for sparklines (30s, 15m, 2h, 1d)")
    p.set_defaults(func=cmd_readings)

    p = sub.add_parser("events", help="the event log")
    esub = p.add_subparsers(dest="action", metavar="ACTION")
    esub.required = True
    t = esub.add_parser("tail", help="the last events (and follow with -f)")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    t.add_argument("-n", "--lines", type=int, default=20, help="how many to show first")
    t.add_argument("--stream", help="only this stream (a trailing * matches a prefix)")
    t.set_defaults(func=cmd_events_tail)

    p = sub.add_parser("db", help="database check, backup and projection rebuild")
    dsub = p.add_subparsers(dest="action", metavar="ACTION")
    dsub.required = True
    c = dsub.add_parser("check", help="integrity check (exit 5 when damaged)")
    c.add_argument("--quick", action="store_true", help="quick_check instead of integrity_check")
    c.set_defaults(func=cmd_db_check)
    b = dsub.add_parser("backup", help="a consistent copy, safe while the daemon runs")
    b.add_argument("file")
    b.set_defaults(func=cmd_db_backup)
    r = dsub.add_parser("rebuild", help="rebuild projections from the log")
    r.set_defaults(func=cmd_db_rebuild)

    p = sub.add_parser("reload", help="make the daemon re-read its config; says whether it took")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("note", help="write an operator's note into the event log")
    p.add_argument("text")
    p.add_argument("--author", default=os.environ.get("SUDO_USER") or os.environ.get("USER"))
    p.set_defaults(func=cmd_note)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="action", metavar="ACTION")
    csub.required = True
    k = csub.add_parser("check", help="validate a config file; every error with its TOML path")
    k.add_argument("file", nargs="?")
    k.set_defaults(func=cmd_config_check)
    h = csub.add_parser("history", help="config changes (remote and rollbacks), newest last")
    h.add_argument("-n", "--lines", type=int, default=50, help="how many to show")
    h.set_defaults(func=cmd_config_history)
    r = csub.add_parser("rollback", help="restore the previous config file and apply it")
    r.set_defaults(func=cmd_config_rollback)


# -- status -------------------------------------------------------------------------------
def status_from_file(conn: sqlite3.Connection) -> dict[str, Any]:
    st = queries.stats(conn)
    return {
        "daemon": "not running",
        "store": {"events": st["events"], "last_seq": st["last_seq"]},
        "outbox": {
            "depth": st["outbox_depth"], "bytes": st["outbox_bytes"],
            "oldest_undelivered": st["oldest_undelivered"], "dead_letters": st["dead_letters"],
        },
        "devices_known": len(queries.devices(conn)),
    }  # fmt: skip


def cmd_status(args: argparse.Namespace) -> int:
    data, live = daemon_or_file(args, "status", status_from_file)
    if args.json:
        emit_json({"live": live, **data})
        return EXIT_OK
    out = sys.stdout
    ob = data["outbox"]
    oldest = ob.get("oldest_undelivered")
    if not live:
        out.write("daemon not running (figures from the database file)\n")
    else:
        out.write(
            f"gatewayd {data['version']} '{data['gateway']}' pid {data['pid']}, "
            f"up {fmt_age(data['uptime'])}\n{data['status']}\n\n"
        )
        rows = []
        for name, h in data["services"].items():
            rows.append((name, h["state"], h.get("restarts", 0), h.get("detail", "")))
        out.write(table(rows, ("service", "state", "restarts", "detail")) + "\n\n")
        s = data["store"]
        if data.get("last_reload_error"):
            out.write(
                "last reload FAILED (the running config stays):\n  "
                + "\n  ".join(data["last_reload_error"].splitlines())
                + "\n\n"
            )
        out.write(
            f"store: {fmt_bytes(s['used_bytes'])} used of {fmt_bytes(s['quota_bytes'])} quota, "
            f"file {fmt_bytes(s['file_bytes'])}, last seq {s['last_seq']}, "
            f"dropped {s['dropped']}, rejected {s['rejected']}, "
            f"writes {fmt_bytes(s.get('written_per_day'))}/day\n"
        )
    out.write(
        f"outbox: {ob['depth']} undelivered ({fmt_bytes(ob['bytes'])}), oldest "
        f"{fmt_age(time.time() - oldest) if oldest else '-'}, dead letters {ob['dead_letters']}\n"
    )
    return EXIT_OK


# -- devices ------------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace) -> int:
    if args.device == "forget":
        if not args.ids:
            return fail("devices forget: name the devices to remove", EXIT_USAGE)
        return cmd_devices_forget(args)
    devs, live = daemon_or_file(args, "devices", queries.devices_view)
    if args.device is not None:
        return _device(args, [d for d in devs if d["id"] == args.device], live)
    if args.json:
        emit_json(devs)
        return EXIT_OK
    now = time.time()
    rows = []
    for d in devs:
        avail = {True: "up", False: "DOWN", None: "?"}[d["available"]]
        seen = fmt_age(now - d["last_seen"]) + " ago" if d["last_seen"] else "never"
        rows.append((d["id"], d["driver"] or "-", d["source"], avail, seen, d["points"],
                     d["reason"] or ""))  # fmt: skip
    print(table(rows, ("device", "driver", "source", "state", "last seen", "points", "reason")))
    if not live:
        print("(daemon not running: as last recorded)")
    return EXIT_OK


def _device(args: argparse.Namespace, found: list[dict[str, Any]], live: bool) -> int:
    """One device, with its pending and recent commands (the control service's: its verbs
    hand over their reader as `device_commands`)."""
    kw = {"device": args.device}
    cmds: list[dict[str, Any]] = []
    reader = getattr(args, "device_commands", None)
    if reader is not None:
        cmds, _ = daemon_or_file(args, "commands", lambda c: reader(c, args.device), **kw)
    if not found and not cmds:
        return fail(f"no device {args.device!r} (see `gatewayctl devices`)", EXIT_USAGE)
    if args.json:
        emit_json({"device": found[0] if found else None, "commands": cmds})
        return EXIT_OK
    for d in found:
        avail = {True: "up", False: "DOWN", None: "?"}[d["available"]]
        print(f"{d['id']}: {d['driver'] or '-'}, {avail}, {d['points']} points"
              + (f" ({d['reason']})" if d["reason"] else ""))  # fmt: skip
    pending = [c for c in cmds if c.get("status") in ("requested", "accepted", "sent")]
    print(f"commands: {len(pending)} pending, {len(cmds)} recent")
    if cmds:
        print(table([(c.get("id"), c.get("point"), fmt_value(c.get("value")), c.get("status"),
                      c.get("reason") or "", fmt_time(c.get("requested"))) for c in cmds],
                    ("id", "point", "value", "status", "reason", "requested")))  # fmt: skip
    if not live:
        print("(daemon not running: as last recorded)")
    return EXIT_OK


def cmd_devices_forget(args: argparse.Namespace) -> int:
    result = ask_daemon(args, "devices.forget", ids=list(args.ids))
    if args.json:
        emit_json(result)
        return EXIT_OK
    for dev_id in result["forgotten"]:
        print(f"forgotten: {dev_id}")
    return EXIT_OK


# -- readings -----------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 2h, 1d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def cmd_readings(args: argparse.Namespace) -> int:
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        return fail(f"--since: {exc}", EXIT_USAGE)
    start = time.time() - since

    def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = queries.latest(conn, args.device, args.point)
        for r in rows:
            r["history"] = queries.history(conn, args.device, r["point"], start)
        return rows

    rows = with_db(args, q)
    if not rows:
        what = f"{args.device}.{args.point}" if args.point else args.device
        return fail(f"no readings for {what} (check the name with `gatewayctl devices`)",
                    EXIT_USAGE)  # fmt: skip
    if args.json:
        emit_json(rows)
        return EXIT_OK
    out = []
    for r in rows:
        vals = [v for _, v in r["history"]]
        nums = [v for v in vals if isinstance(v, int | float) and not isinstance(v, bool)]
        rng = f"{min(nums):.4g}..{max(nums):.4g}" if nums else ""
        out.append((r["point"], fmt_value(r["value"]), r["unit"] or "", fmt_time(r["ts"]),
                    sparkline(nums), rng))  # fmt: skip
    print(table(out, ("point", "value", "unit", "time", f"last {args.since}", "range")))
    return EXIT_OK


# -- events -------------------------------------------------------------------------------
def _print_event(e: Any, as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(e.as_dict(), default=str, sort_keys=True), flush=True)
    else:
        recs = e.data.get("r") if e.type == "readings" else None
        if isinstance(recs, list):
            data = " ".join(
                f"{r.get('n')}={fmt_value(r.get('v'))}{r.get('u') or ''}"
                for r in recs
                if isinstance(r, dict)
            )
        else:
            data = " ".join(f"{k}={fmt_value(v)}" for k, v in e.data.items())
        print(f"{e.seq:>8} {fmt_time(e.wall_time)} {e.stream:<24} {e.type:<20} {data}", flush=True)


def cmd_events_tail(args: argparse.Namespace) -> int:
    if args.lines < 0:
        return fail("--lines must be >= 0", EXIT_USAGE)
    c = load_config(args)
    conn = open_readonly(c.db_path)
    try:
        last = 0
        for e in queries.last_events(conn, args.lines, args.stream):
            _print_event(e, args.json)
            last = e.seq
        if not last:
            last = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        while args.follow:
            time.sleep(0.5)  # a CLI following a file: polling the WAL is what `tail -f` does
            for e in queries.events(conn, last, 1000, args.stream):
                _print_event(e, args.json)
                last = e.seq
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()
    return EXIT_OK


# -- db -----------------------------------------------------------------------------------
def cmd_db_check(args: argparse.Namespace) -> int:
    try:
        result = with_db(args, lambda conn: maintenance.check(conn, full=not args.quick))
    except sqlite3.DatabaseError as exc:
        result = {"ok": False, "problems": [str(exc)]}
    if args.json:
        emit_json(result)
    elif result["ok"]:
        print(f"ok: {result['events']} events, last seq {result['last_seq']}, "
              f"{result['outbox_depth']} undelivered")  # fmt: skip
    else:
        print("DAMAGED:\n  " + "\n  ".join(result["problems"]))
    return EXIT_OK if result["ok"] else EXIT_STORE


def cmd_db_backup(args: argparse.Namespace) -> int:
    # The CLI copies through its own read-only connection: WAL gives it a consistent snapshot
    # while the daemon writes, and the daemon's sandbox could not write outside its state dir.
    target = Path(args.file).absolute()
    try:
        result = with_db(args, lambda conn: maintenance.backup(conn, target))
    except FileExistsError as exc:
        return fail(str(exc), EXIT_USAGE)
    if args.json:
        emit_json(result)
    else:
        print(f"backup written: {result['file']} ({fmt_bytes(result['bytes'])}, "
              f"up to seq {result['last_seq']}, check {result['check']})")  # fmt: skip
    return EXIT_OK


def cmd_db_rebuild(args: argparse.Namespace) -> int:
    c = load_config(args)
    try:
        result = call(c.socket_path, "db.rebuild", {}, timeout=600)
        where = "by the daemon"
    except Down:
        if not c.db_path.exists():
            return fail(f"{c.db_path}: no database", EXIT_STORE)
        parts.register_tables(c.sections)  # the daemon's projections, not only the core's
        result = {"replayed": maintenance.rebuild_offline(c.db_path)}
        where = "on the file (daemon not running)"
    if args.json:
        emit_json(result)
    else:
        print(f"projections rebuilt {where}: {result['replayed']} events replayed")
    return EXIT_OK


# -- reload -----------------------------------------------------------------------------
def cmd_reload(args: argparse.Namespace) -> int:
    c = load_config(args)
    result = call(c.socket_path, "reload", {}, timeout=120)
    status = EXIT_OK
    if not result["applied"]:
        status = EXIT_CONFIG if result.get("kind") == "config" else EXIT_FAILURE
    if args.json:
        emit_json(result)
    elif result["applied"]:
        print(f"reloaded: {result['devices']} devices")
    else:
        print("reload FAILED, the running config stays:\n  "
              + "\n  ".join(str(result["errors"]).splitlines()), file=sys.stderr)  # fmt: skip
    return status


# -- note -------------------------------------------------------------------------------
def cmd_note(args: argparse.Namespace) -> int:
    c = load_config(args)
    result = call(c.socket_path, "note", {"text": args.text, "author": args.author})
    if args.json:
        emit_json(result)
    else:
        print(f"noted as event {result['seq']}")
    return EXIT_OK


# -- config -------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    path = args.file or args.config or cfg.default_path()
    try:
        c = cfg.load(path)
    except ConfigError as exc:
        if args.json:
            errors = [{"path": i.path, "message": i.message} for i in exc.issues]
            emit_json({"ok": False, "file": path, "errors": errors})
        else:
            print(f"{path}: {len(exc.issues)} error(s)", file=sys.stderr)
            for issue in exc.issues:
                print(f"  {issue}", file=sys.stderr)
        return EXIT_CONFIG
    warnings = [{"path": i.path, "message": i.message} for i in c.warnings]
    if args.json:
        emit_json({"ok": True, "file": path, "devices": sorted(c.devices), "warnings": warnings})
    else:
        for w in c.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"{path}: ok ({len(c.devices)} devices; state in {c.state_dir}, "
              f"socket {c.socket_path})")  # fmt: skip
    return EXIT_OK


def cmd_config_history(args: argparse.Namespace) -> int:
    from gateway.sync.remote_config import history_rows

    rows = with_db(args, lambda conn: history_rows(conn, args.lines))
    if args.json:
        emit_json(rows)
        return EXIT_OK
    if not rows:
        print("no config changes recorded")
        return EXIT_OK
    out = []
    for r in rows:
        who = r.get("endpoint") or r.get("user") or r.get("source", "")
        detail = r.get("reason") or "; ".join(r.get("errors") or ()) or r.get("kept_as", "")
        out.append((r["seq"], fmt_time(r["time"]), r.get("outcome", "?"), r.get("source", ""),
                    who, (r.get("hash") or "")[:12], detail))  # fmt: skip
    print(table(out, ("seq", "time", "outcome", "source", "by", "sha256", "detail")))
    return EXIT_OK


def cmd_config_rollback(args: argparse.Namespace) -> int:
    c = load_config(args)
    user = os.environ.get("SUDO_USER") or os.environ.get("USER")
    result = call(c.socket_path, "config.rollback", {"user": user} if user else {}, timeout=120)
    if args.json:
        emit_json(result)
    else:
        state = "applied" if result["applied"] else f"NOT applied: {result.get('error')}"
        print(f"restored {result['restored']} (sha256 {result['hash'][:12]}), {state}")
    return EXIT_OK if result["applied"] else EXIT_FAILURE
