"""`gatewayctl command DEVICE POINT VALUE [--id ID] [--wait] [--timeout S]` and
`gatewayctl commands [DEVICE | --id ID]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from gateway import errors
from gateway.cli.common import daemon_or_file, emit_json, fmt_time, fmt_value, load_config, table
from gateway.control import call
from gateway.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

#: reason of a rejection -> exit status (the error class's, as everywhere else)
_REJECTED_EXIT = {
    cls.reason: cls.exit_status
    for cls in (errors.UnknownDeviceError, errors.UnknownPointError, errors.NotWritableError,
                errors.WrongTypeError, errors.OutOfRangeError, errors.DeviceDisabledError,
                errors.RemoteWriteError, errors.CommandExpiredError, errors.QueueFullError)
}  # fmt: skip


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("command", help="write a point of a device (through the control service)")
    p.add_argument("device")
    p.add_argument("point")
    p.add_argument("value", help='a JSON value (21.5, true, "text"); other text is a string')
    p.add_argument("--id", default=None, help="idempotency key (the same id twice is one write)")
    p.add_argument("--wait", action="store_true", help="wait for the outcome and print it")
    p.add_argument("--timeout", type=float, default=None,
                   help="deadline in seconds (default: [control] deadline)")  # fmt: skip
    p.set_defaults(func=cmd_command)
    # `gatewayctl devices ID` (the kernel's verb) shows the device's commands: read them so.
    devices = sub.choices.get("devices")
    if devices is not None:
        from services.control import projection

        devices.set_defaults(device_commands=projection.commands)
    q = sub.add_parser("commands", help="recent commands (of one device), or one by --id")
    q.add_argument("device", nargs="?", default=None)
    q.add_argument("--id", default=None)
    q.set_defaults(func=cmd_commands)
    sp = sub.add_parser("saga", help="run, list and show sagas ([sagas.<name>])")
    ssub = sp.add_subparsers(dest="action", metavar="ACTION")
    ssub.required = True
    r = ssub.add_parser("run", help="start a saga by name")
    r.add_argument("name")
    r.add_argument("--id", default=None, help="the saga's id (the same id twice is one saga)")
    r.add_argument("--wait", action="store_true", help="wait until it completes or is undone")
    r.set_defaults(func=cmd_saga_run)
    ls = ssub.add_parser("list", help="sagas, newest first")
    ls.set_defaults(func=cmd_saga_list)
    sh = ssub.add_parser("show", help="one saga: each step with its time and outcome")
    sh.add_argument("id")
    sh.set_defaults(func=cmd_saga_show)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def outcome_status(row: dict[str, Any]) -> int:
    status = row.get("status")
    if status in ("succeeded", "accepted", "sent", "requested"):
        return EXIT_OK
    if status == "rejected":
        return _REJECTED_EXIT.get(str(row.get("reason")), EXIT_USAGE)
    return EXIT_FAILURE


def describe(row: dict[str, Any]) -> str:
    text = f"command {row.get('id')}: {row.get('status')}"
    if row.get("reason"):
        text += f" ({row['reason']})"
    if "result" in row:
        text += f", read back {fmt_value(row['result'])}"
    if row.get("error"):
        text += f": {row['error']}"
    return text


def cmd_command(args: argparse.Namespace) -> int:
    c = load_config(args)
    span = args.timeout if args.timeout is not None else c.control.deadline
    kw: dict[str, Any] = {"device": args.device, "point": args.point,
                          "value": parse_value(args.value), "wait": bool(args.wait)}  # fmt: skip
    if args.id is not None:
        kw["id"] = args.id
    if args.timeout is not None:
        kw["timeout"] = args.timeout
    row = call(c.socket_path, "command", kw, timeout=span + 30 if args.wait else 30)
    if args.json:
        emit_json(row)
    else:
        print(describe(row))
    return outcome_status(row)


def cmd_commands(args: argparse.Namespace) -> int:
    from services.control import projection as proj

    if args.id is not None:
        row, _ = daemon_or_file(args, "commands", lambda c: proj.command(c, args.id), id=args.id)
        if args.json:
            emit_json(row)
        else:
            print(describe(row) if row else f"no command {args.id!r}")
        return EXIT_OK if row else EXIT_USAGE
    kw = {"device": args.device} if args.device else {}
    rows, _ = daemon_or_file(args, "commands", lambda c: proj.commands(c, args.device, 50), **kw)
    if args.json:
        emit_json(rows)
        return EXIT_OK
    print(table([[r.get("id"), r.get("device"), r.get("point"), fmt_value(r.get("value")),
                  r.get("status"), r.get("reason") or "", fmt_time(r.get("requested"))]
                 for r in rows], ["id", "device", "point", "value", "status", "reason",
                                  "requested"]))  # fmt: skip
    return EXIT_OK


def _print_saga(row: dict[str, Any]) -> None:
    print(f"saga {row['id']} ({row['name']}): {row['status']}")
    for e in row["events"]:
        what = e["type"].removeprefix("saga.")
        step = f" step {e['step']}" if "step" in e else ""
        detail = " ".join(
            f"{k}={fmt_value(e[k])}"
            for k in ("command", "value", "reason", "error", "failed_step")
            if k in e
        )
        print(f"  {fmt_time(e['time'])}  {what}{step}  {detail}".rstrip())


def saga_status(row: dict[str, Any]) -> int:
    return EXIT_OK if row["status"] in ("completed", "running", "compensating") else EXIT_FAILURE


def cmd_saga_run(args: argparse.Namespace) -> int:
    c = load_config(args)
    kw: dict[str, Any] = {"name": args.name, "wait": bool(args.wait)}
    if args.id is not None:
        kw["id"] = args.id
    row = call(c.socket_path, "saga.run", kw, timeout=3600 if args.wait else 30)
    if args.json:
        emit_json(row)
    else:
        _print_saga(row)
    return saga_status(row)


def cmd_saga_list(args: argparse.Namespace) -> int:
    from services.control.sagas import list_sagas

    rows, _ = daemon_or_file(args, "sagas", list_sagas)
    if args.json:
        emit_json(rows)
        return EXIT_OK
    print(table([[r["id"], r["name"], r["status"], fmt_time(r["started"]),
                  fmt_time(r["updated"])] for r in rows],
                ["id", "name", "status", "started", "updated"]))  # fmt: skip
    return EXIT_OK


def cmd_saga_show(args: argparse.Namespace) -> int:
    from services.control.sagas import show

    row, _ = daemon_or_file(args, "sagas", lambda c: show(c, args.id), id=args.id)
    if row is None:
        print(f"no saga {args.id!r}")
        return EXIT_USAGE
    if args.json:
        emit_json(row)
    else:
        _print_saga(row)
    return saga_status(row)
