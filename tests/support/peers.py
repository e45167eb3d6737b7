"""Real protocol peers for tests: find them, start them, stop them by PID.

A test that needs a peer skips on a developer's machine without it, but fails under CI=true
(CI installs every peer; a missing one there is our bug, not a reason to skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip (laptop) or fail (CI) because a peer is missing."""
    msg = f"peer not available: {what}"
    if IN_CI:
        pytest.fail(msg + " (CI=true: every peer must be installed by .ci/run)")
    pytest.skip(msg)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name)
    assert path is not None
    return path


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], bool], what: str, attempts: int = 200, pause: float = 0.05
) -> None:
    """Poll a readiness check a bounded number of times (for peers that offer no event)."""
    for _ in range(attempts):
        if check():
            return
        time.sleep(pause)
    raise AssertionError(f"timed out waiting for {what}")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Peer:
    """A background process started by a test; `stop()` terminates it by PID, then kills it."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self._log = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._log is not subprocess.DEVNULL:
            self._log.close()  # type: ignore[union-attr]
        return self.proc.returncode
