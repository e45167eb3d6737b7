"""`gatewayctl probe`: a probe whose library is missing is listed all the same, saying which
library it lacks, and running it says so (exit 4) instead of failing somewhere inside.

A missing library is simulated in a fresh interpreter by an import hook that refuses it, the
way Python refuses a package that is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import parts
from gateway.errors import EXIT_UNAVAILABLE

ROOT = Path(__file__).resolve().parents[2]

SHIM = """
import os, sys
from importlib.abc import MetaPathFinder

BLOCKED = os.environ["BLOCKED"]

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == BLOCKED or name.startswith(BLOCKED + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from gateway.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

PROBES = {p.name: p for p in parts.probes()}


def gatewayctl_without(blocked: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BLOCKED": blocked, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-c", SHIM, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, check=False)  # fmt: skip


def listed(help_text: str) -> dict[str, str]:
    """`probe --help`'s KIND entries: name -> its help line."""
    out = {}
    for line in help_text.splitlines():
        words = line.split(maxsplit=1)
        if line.startswith("    ") and words and words[0] in PROBES:
            out[words[0]] = words[1] if len(words) > 1 else ""
    return out


@pytest.mark.parametrize("kind", sorted(k for k, p in PROBES.items() if p.library))
def test_a_probe_whose_library_is_missing_is_listed_and_says_which(kind: str) -> None:
    library = PROBES[kind].library
    r = gatewayctl_without(library, "probe", "--help")
    assert r.returncode == 0, r.stderr
    entries = listed(r.stdout)
    assert set(entries) == set(PROBES), r.stdout
    assert "unavailable" in entries[kind] and "not installed" in entries[kind], entries[kind]
    dist = "pyserial" if library == "serial" else library
    assert repr(dist) in entries[kind], entries[kind]
    for other, line in entries.items():
        if PROBES[other].library != library:
            assert "unavailable" not in line, (other, line)


def test_running_a_probe_whose_library_is_missing_says_so() -> None:
    r = gatewayctl_without("bleak", "probe", "ble", "scan", "--seconds", "0.1")
    assert r.returncode == EXIT_UNAVAILABLE, (r.stdout, r.stderr)
    assert "probe ble: needs the Python package 'bleak', which is not installed" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_probe_that_cannot_be_loaded_at_all_is_listed() -> None:
    """A build without the CoAP driver: its probe used to vanish from `probe --help`."""
    r = gatewayctl_without("drivers.coap", "probe", "--help")
    assert r.returncode == 0, r.stderr
    entries = listed(r.stdout)
    assert set(entries) == set(PROBES), r.stdout
    assert "unavailable" in entries["coap"] and "drivers.coap" in entries["coap"], entries
    r = gatewayctl_without("drivers.coap", "probe", "coap", "coap://127.0.0.1/x")
    assert r.returncode == EXIT_UNAVAILABLE, (r.stdout, r.stderr)
    assert "probe coap" in r.stderr and "drivers.coap" in r.stderr


def test_with_every_library_the_listing_has_no_note() -> None:
    r = gatewayctl_without("no-such-module-blocked", "probe", "--help")
    assert r.returncode == 0, r.stderr
    entries = listed(r.stdout)
    assert set(entries) == set(PROBES)
    assert not [line for line in entries.values() if "unavailable" in line], entries
