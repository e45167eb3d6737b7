"""What every `gatewayctl` verb needs: the config, the daemon (or the file when it is down),
and output as tables for people or JSON for scripts."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sqlite3
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway import config as cfg
from gateway import names
from gateway.control import call
from gateway.errors import ConfigError, DaemonUnavailableError
from gateway.store import open_readonly

T = TypeVar("T")


def load_config(args: argparse.Namespace) -> cfg.GatewayConfig:
    """The config; when the file on disk is broken (being edited, a bad reload), only where
    the daemon lives (state dir, database, socket) is taken from it, with a warning, so the
    CLI can still talk to the daemon running on the last good config."""
    path = args.config or cfg.default_path()
    try:
        return cfg.load(path)
    except ConfigError as exc:
        if not Path(path).is_file():
            raise
        c = _locations_only(path)
        print(
            f"gatewayctl: warning: {path} is invalid ({len(exc.issues)} error(s), see "
            f"`gatewayctl config check`); using socket {c.socket_path} and database "
            f"{c.db_path} from its [gateway], [store] and [control] tables",
            file=sys.stderr,
        )
        return c


def _locations_only(path: str) -> cfg.GatewayConfig:
    """A config made of the file's [gateway], [store] and [control] tables only (the
    defaults, and systemd's directories, when those are broken too)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # a syntax error elsewhere: read those tables alone
        data = {}
        for chunk in re.split(r"(?m)^(?=\s*\[)", text):
            if re.match(r"\s*\[\s*(gateway|store|control)\s*\]", chunk):
                with contextlib.suppress(tomllib.TOMLDecodeError):
                    data.update(tomllib.loads(chunk))
    part = {k: data[k] for k in ("gateway", "store", "control") if isinstance(data.get(k), dict)}
    try:
        return cfg.parse(part, path)
    except ConfigError:
        return cfg.parse({}, path)


def ask_daemon(args: argparse.Namespace, verb: str, **kw: Any) -> Any:
    """Ask the running daemon; raises DaemonUnavailableError when it is not running."""
    c = load_config(args)
    return call(c.socket_path, verb, kw)


def daemon_or_file(
    args: argparse.Namespace,
    verb: str,
    from_file: Callable[[sqlite3.Connection], T],
    **kw: Any,
) -> tuple[Any, bool]:
    """(result, live): from the daemon if it runs, else from the database file read-only."""
    c = load_config(args)
    try:
        return call(c.socket_path, verb, kw), True
    except DaemonUnavailableError:
        pass
    conn = open_readonly(c.db_path)
    try:
        return from_file(conn), False
    finally:
        conn.close()


def with_db(args: argparse.Namespace, fn: Callable[[sqlite3.Connection], T]) -> T:
    c = load_config(args)
    conn = open_readonly(c.db_path)
    try:
        return fn(conn)
    finally:
        conn.close()


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, default=_json_default, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _json_default(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> str:
    # Cells hold names and text from the network: control characters are shown escaped,
    # so a cell cannot break its row or move the terminal's cursor.
    cells = [[str(h) for h in headers]] + [[names.escape(fmt_value(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    nums = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]
    if not nums:
        return ""
    if len(nums) > width:  # average into `width` buckets
        step = len(nums) / width
        nums = [
            sum(b) / len(b)
            for i in range(width)
            if (b := nums[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)])
        ]
    lo, hi = min(nums), max(nums)
    if hi == lo:
        return _BARS[3] * len(nums)
    return "".join(_BARS[min(7, int((v - lo) / (hi - lo) * 8))] for v in nums)


def fail(message: str, status: int = 1) -> int:
    print(f"gatewayctl: {message}", file=sys.stderr)
    return status
