"""Rate-limited log lines: one line per kind per interval, with a count, for errors that can
repeat thousands of times a second (a full store refusing every reading)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

#: How often one kind of repeated message may be logged, in seconds.
REPEAT_INTERVAL = 60.0


class _Kind:
    __slots__ = ("args", "level", "msg", "since", "suppressed", "timer")

    def __init__(self, since: float) -> None:
        self.since = since
        self.suppressed = 0
        self.level = logging.WARNING
        self.msg = ""
        self.args: tuple[object, ...] = ()
        self.timer: asyncio.TimerHandle | None = None


class RateLimitedLog:
    """The first message of a kind is logged at once; the next ones within `interval` s are
    counted, and the last of them is logged with the count when the interval ends (by a
    timer on the running event loop, or else with the next message after it)."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = REPEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.ERROR, kind, msg, *args)

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        now = self._clock()
        k = self._kinds.get(kind)
        if k is None or now - k.since >= self.interval:
            if k is not None:
                self._summary(k)
            self._kinds[kind] = _Kind(now)
            self.logger.log(level, msg, *args)
            return
        k.suppressed += 1
        k.level, k.msg, k.args = level, msg, args
        if k.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop in this thread: said with the next message after the interval
            k.timer = loop.call_later(k.since + self.interval - now, self._due, kind)

    def _due(self, kind: str) -> None:
        k = self._kinds.get(kind)
        if k is None:
            return
        k.timer = None
        if k.suppressed:
            self._summary(k)
            self._kinds[kind] = _Kind(self._clock())  # the next one waits a whole interval
        else:
            del self._kinds[kind]

    def _summary(self, k: _Kind) -> None:
        if k.timer is not None:
            k.timer.cancel()
            k.timer = None
        if k.suppressed:
            self.logger.log(
                k.level, k.msg + " (repeated %d times in the last %.0f s)", *k.args, k.suppressed,
                self._clock() - k.since,
            )  # fmt: skip
            k.suppressed = 0

    def flush(self) -> None:
        """Say what was counted and not said yet (at stop)."""
        for k in self._kinds.values():
            self._summary(k)
        self._kinds.clear()


#: Libraries whose own log lines only matter when debugging: the component using them
#: reports every fault itself (the Modbus driver: first failure WARNING, repeats DEBUG),
#: while pymodbus logs each time-out at ERROR and each failed connect at WARNING.
QUIET_LIBRARIES = ("pymodbus",)


class LibraryNoise(logging.Filter):
    """A handler's filter that shows the records of `libraries`' loggers (and their
    children) at DEBUG, and only when the root logger is at DEBUG; other records pass as
    they are. Installed by the daemon's logging setup: no logger's level is changed."""

    def __init__(self, libraries: tuple[str, ...] = QUIET_LIBRARIES) -> None:
        super().__init__()
        self.libraries = libraries
        self.prefixes = tuple(f"{name}." for name in libraries)

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        if name not in self.libraries and not name.startswith(self.prefixes):
            return True
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
