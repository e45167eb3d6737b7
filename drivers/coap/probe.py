"""`gatewayctl probe coap URI`: talk to a CoAP device on site, without the gateway's config.

    gatewayctl probe coap coap://192.0.2.7/sensors
    gatewayctl probe coap coap://192.0.2.7/setpoint --method put --payload 21.5
    gatewayctl probe coap coap://192.0.2.7/led --method put --payload true --content-format cbor
    gatewayctl probe coap coaps://192.0.2.7/sensors --psk-identity gw --psk-key-file key.psk
    gatewayctl probe coap coap://192.0.2.7/sensors --observe 30 --json

Shows the response code, options and decoded values (SenML records, CBOR/JSON maps, text)
as a table, or as JSON with --json. Uses the driver's own client, so what works here works
in the daemon. Exit status: 0 for a 2.xx answer, 1 for a 4.xx/5.xx answer, 2 for bad
arguments or a payload that does not fit the content-format, 4 when the device is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    DriverError,
    GatewayError,
    PayloadError,
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "coap",
        help="GET/PUT/POST/observe a CoAP resource on a device",
        description="Send one CoAP request (or observe a resource) and show the answer.",
        epilog="examples:\n"
        "  gatewayctl probe coap coap://192.0.2.7/sensors\n"
        "  gatewayctl probe coap coap://192.0.2.7/setpoint -m put -p 21.5\n"
        "  gatewayctl probe coap coap://192.0.2.7/led -m put -p true -t cbor\n"
        "  gatewayctl probe coap coaps://192.0.2.7/sensors --psk-identity gw "
        "--psk-key-file key.psk\n"
        "  gatewayctl probe coap coap://192.0.2.7/sensors --observe 30 --json\n"
        "exit status: 0 answer 2.xx, 1 answer 4.xx/5.xx, 2 bad arguments, 4 unreachable",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("uri", help="coap://host[:port]/path[?query] or coaps://...")
    p.add_argument(
        "--method", "-m", default="get", type=str.lower,
        choices=["get", "put", "post", "delete", "fetch"], help="request method (default get)",
    )  # fmt: skip
    body = p.add_mutually_exclusive_group()
    body.add_argument(
        "--payload", "-p",
        help="request payload as text; with --content-format cbor/json/senml it is read as "
        'JSON (21.5, true, {"temp": 1}, [{"n": "temp", "v": 1}]) and encoded in that format',
    )  # fmt: skip
    body.add_argument("--payload-file", help="send this file's bytes as they are ('-': stdin)")
    p.add_argument(
        "--content-format", "-t",
        help="text, octets, json, cbor, senml+json, senml (senml+cbor), or a number",
    )  # fmt: skip
    p.add_argument(
        "--observe", "-s", type=float, metavar="SECONDS",
        help="observe the resource for this long, showing each notification",
    )  # fmt: skip
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    p.add_argument(
        "--format", default="auto", choices=["auto", "senml", "cbor", "json", "text", "raw"],
        help="how to decode the answer (default: from its content-format)",
    )  # fmt: skip
    p.add_argument("--psk-identity", help="DTLS-PSK identity (coaps://)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--psk-key", help="DTLS-PSK key (visible in the process list: prefer a file)")
    key.add_argument("--psk-key-file", help="file holding the DTLS-PSK key (mode 0600)")
    p.add_argument("--oscore", metavar="DIR", help="OSCORE security context directory")
    p.set_defaults(func=run)


def _content_format(text: str | None) -> int | None:
    from drivers.coap.payload import CONTENT_FORMAT_NAMES

    if text is None:
        return None
    if text.isdigit():
        return int(text)
    cf = CONTENT_FORMAT_NAMES.get(text.lower())
    if cf is None:
        names = ", ".join(sorted(k for k in CONTENT_FORMAT_NAMES if "/" not in k))
        raise PayloadError(f"unknown content-format {text!r} (one of {names}, or a number)")
    return cf


def _body(args: argparse.Namespace, cf: int | None) -> bytes:
    """The request payload: a file's bytes as they are, or text encoded for `cf`."""
    from drivers.coap import payload as pl
    from gateway.coap import senml

    if args.payload_file is not None:
        if args.payload_file == "-":
            return sys.stdin.buffer.read()
        try:
            return Path(args.payload_file).read_bytes()
        except OSError as exc:
            raise PayloadError(f"cannot read {args.payload_file}: {exc.strerror}") from None
    if args.payload is None:
        return b""
    text: str = args.payload
    if cf in (None, pl.CF_TEXT, pl.CF_OCTETS) or cf not in (
        pl.CF_CBOR, pl.CF_JSON, pl.CF_SENML_CBOR, pl.CF_SENML_JSON,
    ):  # fmt: skip
        return text.encode("utf-8")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PayloadError(
            f"--payload is not JSON ({exc}); needed for content-format {cf}"
        ) from None
    if cf == pl.CF_JSON or cf == pl.CF_SENML_JSON:
        return json.dumps(value, separators=(",", ":")).encode("utf-8")
    import cbor2

    if cf == pl.CF_SENML_CBOR:
        if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
            raise PayloadError('SenML --payload must be an array of records: [{"n": ..}]')
        numbers = {name: num for num, name in senml.CBOR_LABELS.items()}
        value = [{numbers.get(k, k): v for k, v in rec.items()} for rec in value]
    return bytes(cbor2.dumps(value))


def _device(args: argparse.Namespace) -> Any:
    from drivers.coap.options import CoapDevice, Credentials
    from gateway.retry import BreakerSettings, RetrySettings

    parts = urlsplit(args.uri)
    if parts.scheme not in ("coap", "coaps") or not parts.hostname:
        raise ConfigError(f"not a coap:// or coaps:// URI: {args.uri!r}", "uri")
    psk = args.psk_key is not None or args.psk_key_file is not None
    if parts.scheme == "coaps" and not (args.psk_identity and psk):
        raise ConfigError("coaps:// needs --psk-identity and --psk-key-file (or --psk-key)", "uri")
    if parts.scheme == "coap" and (args.psk_identity or psk):
        raise ConfigError("DTLS-PSK needs a coaps:// URI", "uri")
    if args.oscore and parts.scheme != "coap":
        raise ConfigError("OSCORE runs over coap://", "uri")
    creds = Credentials(
        psk_identity=args.psk_identity, psk_key=args.psk_key, psk_key_file=args.psk_key_file,
        oscore=args.oscore,
    )  # fmt: skip
    return CoapDevice(
        id="probe", uri=f"{parts.scheme}://{parts.netloc}", timeout=args.timeout,
        credentials=creds, points={}, observe_margin=0.0,
        retry=RetrySettings(initial=1.0, cap=1.0), breaker=BreakerSettings(threshold=1),
    )  # fmt: skip


def describe(resp: Any, fmt: str, received: float) -> dict[str, Any]:
    """A response as a JSON-able dict: options, payload and decoded values."""
    from drivers.coap import payload as pl

    out: dict[str, Any] = {
        "code": resp.code,
        "content_format": resp.content_format,
        "max_age": resp.max_age,
        "observe": resp.observe,
        "size": len(resp.payload),
        "received": received,
    }
    try:
        out["text"] = resp.payload.decode("utf-8")
    except UnicodeDecodeError:
        out["hex"] = resp.payload.hex()
    if not resp.payload or fmt == "raw" or not resp.ok:
        return out
    try:
        decoded = pl.decode(resp.payload, resp.content_format, fmt, received)
    except GatewayError as exc:
        out["error"] = str(exc)
        return out
    values: list[dict[str, Any]] = []
    if decoded.kind == "scalar":
        values.append({"n": "", "v": decoded.scalar})
    elif decoded.kind == "map":
        assert decoded.mapping is not None
        values.extend({"n": k, "v": v} for k, v in decoded.mapping.items())
    else:
        for r in decoded.records:
            rec: dict[str, Any] = {"n": r.name, "v": r.value}
            if r.unit is not None:
                rec["u"] = r.unit
            if r.time is not None:
                rec["t"] = r.time
            if r.sum is not None:
                rec["s"] = r.sum
            values.append(rec)
    out["values"] = values
    return out


def _print(d: dict[str, Any], as_json: bool, first: bool) -> None:
    from drivers.coap import payload as pl
    from gateway.cli.common import fmt_time, fmt_value, table

    if as_json:
        print(json.dumps(d, default=_json_default, sort_keys=True), flush=True)
        return
    if not first:
        print()
    head = [d["code"], pl.content_format_name(d["content_format"]), f"max-age {d['max_age']:g} s"]
    if d["observe"] is not None:
        head.append(f"observe {d['observe']}")
    head.append(f"{d['size']} bytes")
    print("  ".join(head))
    if "values" in d:
        rows = [
            (v["n"] or "(value)", fmt_value(v["v"]), v.get("u", ""),
             fmt_time(v["t"]) if "t" in v else "")
            for v in d["values"]
        ]  # fmt: skip
        print(table(rows, ["name", "value", "unit", "time"]).rstrip(), flush=True)
    elif "error" in d:
        print(f"cannot decode: {d['error']}")
        print(d.get("text", d.get("hex", "")), flush=True)
    elif d["size"]:
        print(d.get("text", d.get("hex", "")), flush=True)


def _json_default(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


async def _run(args: argparse.Namespace) -> int:
    from drivers.coap.client import Link

    cf = _content_format(args.content_format)
    body = _body(args, cf)
    if args.observe is not None and args.method != "get":
        raise ConfigError("--observe needs --method get", "observe")
    link = Link(_device(args), _logger())
    status = EXIT_OK
    try:
        if args.observe is None:
            resp = await link.request(
                args.method.upper(), args.uri, payload=body, content_format=cf
            )
            _print(describe(resp, args.format, time.time()), args.json, True)
            return EXIT_OK if resp.ok else EXIT_FAILURE
        end = time.monotonic() + args.observe
        obs = await link.observe(args.uri)
        try:
            _print(describe(obs.first, args.format, time.time()), args.json, True)
            if not obs.first.ok:
                return EXIT_FAILURE
            if not obs.active:
                print("(the resource is not observable)", file=sys.stderr)
                return EXIT_OK
            while (left := end - time.monotonic()) > 0:
                note = await obs.next(left)
                if note is None:
                    break
                _print(describe(note, args.format, time.time()), args.json, False)
                if not note.ok:
                    status = EXIT_FAILURE
                    break
        except DriverError as exc:
            print(f"observation ended: {exc}", file=sys.stderr)
        finally:
            obs.cancel()
        return status
    finally:
        await link.close()


def _logger() -> Any:
    import logging

    return logging.getLogger("gatewayctl.probe.coap")


def run(args: argparse.Namespace) -> int:
    if args.observe is not None and args.observe <= 0:
        print("gatewayctl: --observe needs a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout <= 0:
        print("gatewayctl: --timeout needs a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args))
    except ConfigError as exc:
        # No config file is involved here: its TOML paths would only confuse.
        print("gatewayctl: " + "; ".join(i.message for i in exc.issues), file=sys.stderr)
        return EXIT_USAGE
