"""Fault injection for crash tests: with `GATEWAY_FAULT_KILL_AT=LABEL` in its environment the
daemon SIGKILLs itself when it reaches the point named LABEL (right after the event there has
committed), so a test can stop it at every step boundary of a saga in turn. Unset (always, in
production) every point is a no-op."""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("GATEWAY_FAULT_KILL_AT") or None


def kill_point(label: str) -> None:
    if _AT is not None and label == _AT:
        os.kill(os.getpid(), signal.SIGKILL)
