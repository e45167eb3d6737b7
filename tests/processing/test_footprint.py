"""A gateway without [derived], [processing] or [alerts] loads none of their code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_unconfigured_processing_and_notification_import_nothing() -> None:
    code = (
        "import sys\n"
        "from gateway import config\n"
        "from gateway.daemon import build_services\n"
        "c = config.load('config.toml')\n"
        "names = [type(s).__name__ for s in build_services(c)]\n"
        "mods = [m for m in sys.modules if m.startswith(('services.processing',"
        " 'services.notification', 'services.expr'))]\n"
        "print(names, mods)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # The shipped config runs the CoAP front door too; nothing of processing/notification.
    assert r.stdout.strip() == (
        "['AuthService', 'DevicesService', 'CollectionService', 'CoapService', "
        "'ControlService'] []"
    )
