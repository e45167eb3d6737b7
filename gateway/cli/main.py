"""`gatewayctl`: the on-site CLI. Talks to the daemon over its control socket, and reads the
SQLite file read-only when the daemon is down.

Exit codes: 0 ok; 1 failure; 2 usage error (bad arguments, unknown device); 3 invalid
configuration; 4 daemon or device unreachable; 5 store problem (corrupt, missing).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gateway import __version__, parts
from gateway import config as cfg
from gateway.errors import EXIT_UNAVAILABLE, EXIT_USAGE, ConfigError, GatewayError


class _Parser(argparse.ArgumentParser):
    """Every parser, nested ones included, takes --config and --json, before or after verbs;
    usage errors exit with status 2 and name the problem."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # "resolve": a verb module that declares --json itself just takes it over.
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--config", default=argparse.SUPPRESS,
            help="config file (default: $GATEWAY_CONFIG, then /etc/gateway/config.toml)",
        )  # fmt: skip
        self.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS,
            help="machine-readable output",
        )  # fmt: skip

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _import_optional(ref: str) -> Any:
    """Import a module that may not be part of this build (None then); real errors propagate."""
    try:
        return importlib.import_module(ref)
    except ModuleNotFoundError as exc:
        if exc.name and ref.startswith(exc.name):
            return None
        raise


class _Unavailable:
    """Stands in for `gatewayctl probe`'s subparsers when a probe cannot run here: its entry
    (in `probe --help` and its own) says why, and running it says so instead."""

    def __init__(self, sub: argparse._SubParsersAction[Any], why: str) -> None:
        self.sub = sub
        self.why = why

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        note = f"[unavailable: {self.why}]"
        kwargs["help"] = f"{kwargs['help']} {note}" if kwargs.get("help") else note
        kwargs["description"] = f"{kwargs.get('description') or ''} {note}".strip()
        parser: argparse.ArgumentParser = self.sub.add_parser(name, **kwargs)
        parser.set_defaults(unavailable=f"probe {name}: {self.why}")
        return parser


def _add_probes(psub: argparse._SubParsersAction[Any]) -> None:
    """Every driver's probe (`gateway.parts`); one that cannot run here is listed all the same,
    saying which library it lacks."""
    for part in parts.probes():
        why = parts.missing_library(part)
        try:
            module = importlib.import_module(part.probe)
        except ImportError as exc:  # not in this build, or its library imported at load
            missing = exc.name or part.probe
            stub = _Unavailable(psub, why or f"cannot load {part.probe} ({missing} is missing)")
            stub.add_parser(part.name).add_argument("args", nargs=argparse.REMAINDER)
            continue
        module.add_parser(psub if why is None else _Unavailable(psub, why))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gatewayctl",
        description="Look at and operate a running gateway.",
        epilog="exit codes: 0 ok, 1 failure, 2 usage, 3 bad config, 4 unreachable, 5 store",
    )
    parser.add_argument("--version", action="version", version=f"gatewayctl {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for ref in parts.verb_modules():
        module = _import_optional(ref)
        if module is not None:
            module.add_parsers(sub)
    probe = sub.add_parser("probe", help="talk to a device directly, without the config")
    psub = probe.add_subparsers(dest="kind", metavar="KIND")
    psub.required = True
    _add_probes(psub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "json"):
        args.json = False
    if not hasattr(args, "config"):
        args.config = None
    if getattr(args, "unavailable", None):
        print(f"gatewayctl: {args.unavailable}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        # One message per line, each with its TOML path, as `config check` prints them.
        source = args.config or cfg.default_path()
        print(f"gatewayctl: invalid configuration {source}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return exc.exit_status
    except GatewayError as exc:
        print(f"gatewayctl: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
