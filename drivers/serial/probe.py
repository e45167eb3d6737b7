"""`gatewayctl probe serial PORT`: open a port with given settings and print what arrives,
frame by frame, parsed (or why not), for N seconds or N frames, without touching the config.

The options are checked by the same code as a configured device (`options.parse_options`),
and frames go through the same deframer and parser, so what the probe shows is what the
gateway would read. Every field is shown, not only mapped ones; malformed frames are shown
with their reason instead of being counted silently.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from drivers.base import Value
from drivers.serial.framing import Discarded
from drivers.serial.options import FLOW_CONTROLS, FRAMINGS, PARITIES, SerialOptions, parse_options
from drivers.serial.parsers import PARSER_TYPES, FrameError
from gateway.aio import cancel_and_wait
from gateway.config import DeviceSpec
from gateway.errors import (
    ConfigError,
    ConfigIssue,
    DeviceProtocolError,
    DeviceTimeoutError,
    DeviceUnavailableError,
    PayloadError,
)

#: Option path -> the flag that sets it, so errors name what the user typed.
_FLAGS = {
    "port": "PORT", "baudrate": "--baudrate", "bytesize": "--bytesize", "parity": "--parity",
    "stopbits": "--stopbits", "flow_control": "--flow-control", "request": "--request",
    "framing.type": "--framing", "framing.delimiter": "--delimiter", "framing.length": "--length",
    "framing.start": "--start", "framing.length_size": "--length-size",
    "framing.length_order": "--length-order", "framing.length_adjust": "--length-adjust",
    "framing.max_frame": "--max-frame", "parser.type": "--parser", "parser.pattern": "--pattern",
    "parser.columns": "--columns", "parser.separator": "--separator",
    "parser.encoding": "--encoding", "parser.sentences": "--sentences",
}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "serial",
        help="open a serial port and print parsed frames",
        description="Open PORT with the given settings and print each frame as parsed "
        "(or why it could not be), for --seconds or --frames, whichever comes first. "
        "Byte strings (--delimiter, --start, --request) take escapes: '\\r\\n', '\\x02'. "
        "Exit status: 0 frames read, 1 only malformed ones, 4 port missing or silent.",
    )
    p.add_argument("port", metavar="PORT", help="device path, e.g. /dev/serial/by-id/...")
    p.add_argument("--baudrate", type=int, default=9600)
    p.add_argument("--bytesize", type=int, default=8)
    p.add_argument("--parity", choices=PARITIES, default="none")
    p.add_argument("--stopbits", type=float, default=1.0)
    p.add_argument("--flow-control", choices=FLOW_CONTROLS, default="none")
    p.add_argument("--framing", choices=FRAMINGS, default="delimiter")
    p.add_argument("--delimiter", default="\\n", help="frame delimiter (default '\\n')")
    p.add_argument("--length", type=int, help="fixed framing: bytes per frame")
    p.add_argument("--start", help="start marker to resynchronise on (a line: its last one)")
    p.add_argument("--length-size", type=int, default=1, help="length framing: 1, 2 or 4")
    p.add_argument("--length-order", choices=["big", "little"], default="big")
    p.add_argument("--length-adjust", type=int, default=0)
    p.add_argument("--max-frame", type=int, default=4096)
    p.add_argument(
        "--parser", choices=PARSER_TYPES, default="raw",
        help="default raw: each frame in hex (as text with --encoding ascii)",
    )  # fmt: skip
    p.add_argument("--pattern", help="regex parser: pattern with named groups")
    p.add_argument("--columns", help="csv parser: column names, comma-separated")
    p.add_argument("--separator", help="csv parser: column separator (default ',')")
    p.add_argument("--encoding", help="text encoding (regex, csv, json, raw)")
    p.add_argument("--sentences", help="nmea parser: sentence types to show, e.g. GGA,RMC")
    p.add_argument("--no-checksum", action="store_true", help="nmea: accept no '*HH'")
    p.add_argument("--request", help="send this query every --interval s and show the answers")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between requests")
    p.add_argument("--seconds", type=float, default=10.0, help="stop after this long (10)")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames")
    p.set_defaults(func=run)


def _bytes_arg(text: str, flag: str) -> str:
    """Shell-friendly escapes ('\\r\\n', '\\x02') into the characters the options expect."""
    try:
        return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"{flag}: bad escape in {text!r}: {exc.reason}") from None


def options_from_args(args: argparse.Namespace) -> SerialOptions:
    """Build and check the options; a bad one is a ConfigError naming its flag."""
    framing: dict[str, Any] = {"type": args.framing, "max_frame": args.max_frame}
    if args.start:
        framing["start"] = _bytes_arg(args.start, "--start")
    if args.framing == "delimiter":
        framing["delimiter"] = _bytes_arg(args.delimiter, "--delimiter")
    else:
        if args.length is not None:
            framing["length"] = args.length
        if args.framing == "length":
            framing.update(
                length_size=args.length_size, length_order=args.length_order,
                length_adjust=args.length_adjust,
            )  # fmt: skip
    parser: dict[str, Any] = {"type": args.parser}
    if args.pattern is not None:
        parser["pattern"] = args.pattern
    if args.columns is not None:
        parser["columns"] = args.columns.split(",")
    if args.separator is not None:
        parser["separator"] = args.separator
    if args.encoding is not None:
        parser["encoding"] = args.encoding
    if args.parser == "nmea":
        parser["require_checksum"] = not args.no_checksum
        if args.sentences:
            parser["sentences"] = [s.strip() for s in args.sentences.split(",") if s.strip()]
    options: dict[str, Any] = {
        "port": args.port, "baudrate": args.baudrate, "bytesize": args.bytesize,
        "parity": args.parity, "stopbits": args.stopbits, "flow_control": args.flow_control,
        "framing": framing, "parser": parser,
    }  # fmt: skip
    if args.request is not None:
        options.update(mode="request", request=_bytes_arg(args.request, "--request"))
    if args.interval <= 0 or args.seconds <= 0 or args.frames < 0:
        raise PayloadError("--interval and --seconds must be > 0, --frames >= 0")
    spec = DeviceSpec("probe", "serial", options=options)
    try:
        return parse_options(spec, require_points=False)
    except ConfigError as exc:
        prefix = spec.path + "."
        issues = []
        for i in exc.issues:
            key = i.path.removeprefix(prefix)
            issues.append(ConfigIssue(_FLAGS.get(key, key), i.message))
        raise ConfigError(issues) from None


@dataclass
class _Result:
    rows: list[dict[str, Any]] = field(default_factory=list)
    frames: int = 0
    malformed: int = 0
    ignored: int = 0
    lost: str | None = None


def _jsonable(v: Value) -> Any:
    return v.hex() if isinstance(v, bytes) else v


def _show(v: Value) -> str:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, str) and (not v or " " in v):
        return repr(v)
    return str(v)


async def _probe(args: argparse.Namespace, opts: SerialOptions, out: TextIO | None) -> _Result:
    from drivers.serial.link import open_port, settings_text

    try:
        ser = open_port(opts.port)
    except Exception as exc:  # SerialException, OSError or ValueError from pyserial
        raise DeviceUnavailableError(opts.port.port, f"cannot open: {exc}") from None
    loop = asyncio.get_running_loop()
    deframer, parser = opts.framing.deframer(), opts.parser.parser()
    result = _Result()
    done: asyncio.Future[None] = loop.create_future()
    start = time.monotonic()

    def row(item: dict[str, Any]) -> None:
        result.rows.append(item)
        if out is not None:
            at = f"{item['t']:8.3f}"
            if "error" in item:
                print(f"{at}  ! {item['error']}", file=out)
            else:
                shown = "  ".join(f"{k}={_show(v)}" for k, v in item["values"].items())
                print(f"{at}  {shown}", file=out)
            out.flush()
        if args.frames and result.frames + result.malformed >= args.frames and not done.done():
            done.set_result(None)

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, result.lost = b"", f"read failed: {exc}"
        if not data:
            result.lost = result.lost or "device disconnected"
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)
            return
        t = round(time.monotonic() - start, 3)
        for item in deframer.feed(data):
            if done.done():
                return
            if isinstance(item, Discarded):
                result.malformed += 1
                row({"t": t, "error": f"{item.size} byte(s) discarded: {item.reason}"})
                continue
            try:
                parsed = parser.parse(item)
            except FrameError as exc:
                result.malformed += 1
                row({"t": t, "error": str(exc), "frame": item.hex()})
                continue
            if parsed is None:
                result.ignored += 1
                continue
            result.frames += 1
            values = {k: _jsonable(v) for k, v in parsed.values.items()}
            row({"t": t, "values": values} | ({"ts": parsed.ts} if parsed.ts else {}))

    async def ask() -> None:
        while True:
            data = memoryview(opts.request)
            while data:
                try:
                    data = data[os.write(fd, data) :]
                except BlockingIOError:
                    await asyncio.sleep(0.01)  # a full output buffer on a slow line
            await asyncio.sleep(args.interval)

    fd = ser.fileno()
    if out is not None:
        print(f"# {opts.port.port} {settings_text(opts.port)}, framing {opts.framing.type}, "
              f"parser {opts.parser.type}", file=out)  # fmt: skip
    loop.add_reader(fd, readable)
    asker = loop.create_task(ask()) if opts.mode == "request" else None
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), args.seconds)
    finally:
        await cancel_and_wait(asker)
        loop.remove_reader(fd)
        ser.close()
    return result


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    out = None if args.json else sys.stdout
    result = asyncio.run(_probe(args, opts, out))
    if args.json:
        doc = {
            "port": opts.port.port, "frames": result.frames, "malformed": result.malformed,
            "ignored": result.ignored, "lost": result.lost, "rows": result.rows,
        }  # fmt: skip
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        lost = f"; port lost: {result.lost}" if result.lost else ""
        print(f"# {result.frames} frame(s), {result.malformed} malformed, "
              f"{result.ignored} ignored{lost}")  # fmt: skip
    # The README's exit codes: a line that only carried garbage is a failure (1); a line that
    # carried nothing at all is as good as unreachable (4).
    if result.lost:
        raise DeviceUnavailableError(opts.port.port, result.lost)
    if not result.frames and not result.ignored:
        if result.malformed:
            raise DeviceProtocolError(
                opts.port.port, f"{result.malformed} malformed frame(s) and none readable"
            )
        raise DeviceTimeoutError(opts.port.port, f"no frame within {args.seconds:g} s")
    return 0
