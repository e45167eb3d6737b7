"""`gatewayctl metrics`: the figures of `status` as OpenMetrics (or Prometheus 0.0.4) text."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli.common import daemon_or_file, load_config
from gateway.cli.core import status_from_file
from gateway.errors import EXIT_OK
from gateway.metrics import render


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("metrics", help="status figures as OpenMetrics text (for Prometheus)")
    p.add_argument(
        "--format", choices=("openmetrics", "prometheus"), default="openmetrics",
        help="openmetrics (default) or the Prometheus text format 0.0.4",
    )  # fmt: skip
    p.set_defaults(func=cmd_metrics)


def cmd_metrics(args: argparse.Namespace) -> int:
    data, live = daemon_or_file(args, "status", status_from_file)
    # From the file (daemon down) the document has no gateway id: the config has it.
    doc = {"live": live, "gateway": load_config(args).gateway.id, **data}
    sys.stdout.write(render(doc, args.format))
    return EXIT_OK
