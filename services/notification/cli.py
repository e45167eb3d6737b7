"""`gatewayctl alerts [--all] [--json]` and `gatewayctl alerts ack ID`."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from gateway.cli.common import ask_daemon, daemon_or_file, emit_json, fmt_age, fmt_time, table
from gateway.errors import EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("alerts", help="alerts: active ones first (--all: cleared ones too)")
    p.add_argument("--all", action="store_true", help="also alerts that have cleared")
    p.set_defaults(func=cmd_alerts)
    asub = p.add_subparsers(dest="action", metavar="ACTION")
    a = asub.add_parser("ack", help="acknowledge an active alert (recorded with who)")
    a.add_argument("id", help="the alert's rule name, as `gatewayctl alerts` shows it")
    a.add_argument("--by", default=os.environ.get("SUDO_USER") or os.environ.get("USER"))
    a.set_defaults(func=cmd_ack)


def cmd_alerts(args: argparse.Namespace) -> int:
    from services.notification.projection import alerts

    include = bool(args.all)
    rows, live = daemon_or_file(args, "alerts", lambda c: alerts(c, include), all=include)
    if args.json:
        emit_json({"live": live, "alerts": rows})
        return EXIT_OK
    if not live:
        print("gatewayd is not running: alerts as last recorded")
    if not rows:
        print("no active alerts" if not include else "no alerts")
        return EXIT_OK
    now = time.time()
    out: list[list[Any]] = []
    for r in rows:
        out.append([
            r["id"], r["severity"], "ACTIVE" if r["active"] else "cleared",
            fmt_time(r["raised_at"]), fmt_age(r["duration"]), r["value"],
            f"{r['acked_by']} {fmt_age(now - r['acked_at'])} ago" if r["acked_by"] else "-",
            r["message"],
        ])  # fmt: skip
    print(table(out, ["id", "severity", "state", "since", "duration", "value", "acked",
                      "message"]))  # fmt: skip
    return EXIT_OK


def cmd_ack(args: argparse.Namespace) -> int:
    r = ask_daemon(args, "alerts.ack", id=args.id, by=args.by or "unknown")
    if args.json:
        emit_json(r)
    else:
        print(f"acknowledged {args.id} (episode {r['episode']}) as event {r['seq']}")
    return EXIT_OK
