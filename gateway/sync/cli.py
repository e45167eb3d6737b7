"""`gatewayctl outbox`: backlog figures, forced reconnect, dead letters and requeue.

Figures and dead letters come from the daemon when it runs, else from the database file
(read-only); `retry` and `requeue` need the daemon (it owns the only writer)."""

from __future__ import annotations

import argparse
import sqlite3
import time
from typing import Any

from gateway.cli.common import (
    ask_daemon,
    daemon_or_file,
    emit_json,
    fail,
    fmt_age,
    fmt_bytes,
    fmt_time,
    load_config,
    table,
    with_db,
)
from gateway.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from gateway.store import outbox, queries

#: What every outbox verb says when the config has no `[sync]` section (no sink to deliver to).
NOT_CONFIGURED = "cloud sync is not configured (no [sync] section in {source})"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("outbox", help="cloud sync: backlog, link, dead letters")
    p.set_defaults(func=cmd_outbox)
    osub = p.add_subparsers(dest="action", metavar="ACTION")
    r = osub.add_parser("retry", help="reconnect now (skip the backoff and open breakers)")
    r.set_defaults(func=cmd_retry)
    d = osub.add_parser("dead-letters", help="events the cloud refused for good, with reasons")
    d.add_argument("-n", "--limit", type=int, default=1000)
    d.set_defaults(func=cmd_dead_letters)
    q = osub.add_parser("requeue", help="put dead letters back in the outbox")
    q.add_argument("seqs", nargs="*", type=int, metavar="SEQ")
    q.add_argument("--all", action="store_true", help="every dead letter")
    q.set_defaults(func=cmd_requeue)


def _from_file(conn: sqlite3.Connection) -> dict[str, Any]:
    st = queries.stats(conn)
    oldest = st["oldest_undelivered"]
    return {
        "backlog": st["outbox_depth"],
        "backlog_bytes": st["outbox_bytes"],
        "oldest_age": None if oldest is None else max(0.0, time.time() - oldest),
        "dead_letters": st["dead_letters"],
        "link": "daemon not running",
    }


def _not_configured(args: argparse.Namespace) -> str | None:
    """Why the outbox verbs have nothing to talk about (no `[sync]`), or None."""
    c = load_config(args)
    return None if "sync" in c.sections else NOT_CONFIGURED.format(source=c.source or "the config")


def cmd_outbox(args: argparse.Namespace) -> int:
    if (why := _not_configured(args)) is not None:
        # No sink: the daemon has no outbox verbs; the local log's figures still tell the
        # technician what is waiting (read-only, safe while the daemon runs).
        data = with_db(args, _from_file)
        data.update(configured=False, link="not configured", live=False)
        if args.json:
            emit_json(data)
        else:
            print(why)
            size, age = fmt_bytes(data["backlog_bytes"]), fmt_age(data["oldest_age"])
            print(f"local backlog: {data['backlog']} events ({size}), "
                  f"oldest {age}, dead letters {data['dead_letters']}")  # fmt: skip
        return EXIT_OK
    data, live = daemon_or_file(args, "outbox", _from_file)
    data["live"] = live
    if args.json:
        emit_json(data)
        return EXIT_OK
    rate = data.get("delivery_rate")
    lines = [
        f"backlog:      {data.get('backlog')} events ({fmt_bytes(data.get('backlog_bytes'))})",
        f"oldest:       {fmt_age(data.get('oldest_age'))}",
        f"dead letters: {data.get('dead_letters')}",
        f"link:         {data.get('link')}",
    ]
    if live:
        lines += [
            f"endpoint:     {data.get('endpoint') or '-'} (breaker {data.get('breaker') or '-'})",
            f"delivered:    {data.get('delivered')} ({rate if rate is not None else '-'} events/s)",
        ]
        if data.get("live_first"):
            lines.append(f"backfill:     {data.get('backfill_left')} events left (live first)")
        lines.append(f"last error:   {data.get('last_error') or '-'}")
    print("\n".join(lines))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    if (why := _not_configured(args)) is not None:
        return fail(why, EXIT_FAILURE)
    data = ask_daemon(args, "outbox.retry")
    if args.json:
        emit_json(data)
    else:
        print("reconnecting now")
    return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace) -> int:
    if _not_configured(args) is None:
        rows, _live = daemon_or_file(
            args,
            "outbox.dead_letters",
            lambda c: outbox.dead_letters(c, args.limit),
            limit=args.limit,
        )
    else:  # dead letters from an earlier [sync] stay readable in the file
        rows = with_db(args, lambda c: outbox.dead_letters(c, args.limit))
    if args.json:
        emit_json(rows)
        return EXIT_OK
    if not rows:
        print("no dead letters")
        return EXIT_OK
    print(table(
        [(r["seq"], r["stream"], r["type"], fmt_time(r["at"]), r["reason"]) for r in rows],
        ["SEQ", "STREAM", "TYPE", "AT", "REASON"],
    ))  # fmt: skip
    return EXIT_OK


def cmd_requeue(args: argparse.Namespace) -> int:
    if (why := _not_configured(args)) is not None:
        return fail(why, EXIT_FAILURE)
    if not args.all and not args.seqs:
        return fail("outbox requeue: give SEQ... or --all", EXIT_USAGE)
    kw: dict[str, Any] = {"all": True} if args.all else {"seqs": args.seqs}
    data = ask_daemon(args, "outbox.requeue", **kw)
    if args.json:
        emit_json(data)
    else:
        print(f"requeued {len(data['requeued'])} events")
    return EXIT_OK
