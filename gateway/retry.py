"""One retry policy for every part: the `retry` and `breaker` tables and their one reader.

Every part that retries (a Modbus bus, a serial port, a BLE adapter, a CoAP device, the sync
link, the file sink) reads the same two tables with `read_retry` and `read_breaker`, and
turns them into the shared `gateway.breaker.Backoff` and `Breaker`:

    retry = { initial = 0.5, cap = 30, multiplier = 2, jitter = "full" }
    breaker = { threshold = 3, cooldown = 30 }

Each part keeps its own defaults (those it had before the tables existed). The keys each
part used before (`reconnect_delay`, `backoff_initial`, `retry_max`, `breaker_reset`...)
are still read, with a warning that names the new key; giving both is an error.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from gateway.breaker import Backoff, Breaker

if TYPE_CHECKING:
    from gateway.config import Section

__all__ = ["JITTERS", "BreakerSettings", "RetrySettings", "read_breaker", "read_retry"]

#: `jitter` -> the share of the ceiling always waited (`Backoff.floor`): "full" draws the
#: delay in [0, ceiling], "half" in [ceiling/2, ceiling], "none" waits the ceiling.
JITTERS: Final = {"full": 0.0, "half": 0.5, "none": 1.0}


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Pauses between attempts: from `initial`, times `multiplier` per failure, up to `cap`."""

    initial: float
    cap: float
    multiplier: float = 2.0
    jitter: str = "full"  # one of JITTERS

    def backoff(self, rng: Callable[[], float] = random.random) -> Backoff:
        return Backoff(
            self.initial, self.cap, rng, floor=JITTERS[self.jitter], multiplier=self.multiplier
        )


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Open after `threshold` consecutive failures; rest `cooldown` seconds, or, when it is
    None, a rest that grows like the part's retry backoff."""

    threshold: int
    cooldown: float | None = None

    def breaker(
        self, retry: RetrySettings | None = None, rng: Callable[[], float] = random.random
    ) -> Breaker:
        if self.cooldown is not None:
            return Breaker(self.threshold, self.cooldown)
        if retry is None:
            raise ValueError("a breaker without a fixed cooldown needs the retry settings")
        return Breaker(self.threshold, retry.backoff(rng))


def _source(
    sec: Section, table: Section, table_key: str, key: str, old: str | None
) -> tuple[Section, str]:
    """Where `key` is read from: (the table, `key`), or (`sec`, `old`) when it is given
    under its deprecated name."""
    if old is None or not sec.has(old):
        return table, key
    new = f"{table_key}.{key}"
    if table.has(key):
        sec.mark(old)
        sec.error(old, f"given twice: as {old!r} and as `{new}`; keep `{new}` only")
        return table, key
    sec.warn(old, f"deprecated name: use `{new}` instead")
    return sec, old


def read_retry(
    sec: Section, default: RetrySettings, *, old: Mapping[str, str] | None = None
) -> RetrySettings:
    """Read `sec`'s `retry` table (`default` fills what is missing). `old` maps a key of the
    table (`initial`, `cap`...) to the name it had directly in `sec`, still accepted."""
    old = old or {}
    t = sec.table("retry")
    src, initial_name = _source(sec, t, "retry", "initial", old.get("initial"))
    initial: float = src.float(initial_name, default.initial, gt=0, max=3600)
    src, cap_name = _source(sec, t, "retry", "cap", old.get("cap"))
    cap: float = src.float(cap_name, default.cap, gt=0, max=86400)
    if cap < initial:
        src.error(cap_name, f"must be >= {initial_name} ({initial:g})")
    src, name = _source(sec, t, "retry", "multiplier", old.get("multiplier"))
    multiplier: float = src.float(name, default.multiplier, min=1, max=100)
    jitter: str = t.str("jitter", default.jitter, choices=list(JITTERS))
    t.done()
    return RetrySettings(
        initial=initial, cap=cap, multiplier=multiplier,
        jitter=jitter if jitter in JITTERS else default.jitter,
    )  # fmt: skip


def read_breaker(
    sec: Section, default: BreakerSettings, *, old: Mapping[str, str] | None = None
) -> BreakerSettings:
    """Read `sec`'s `breaker` table (`default` fills what is missing). A default without a
    cooldown means the part's breaker rests like its retry backoff: no `cooldown` key then.
    `old` maps `threshold`/`cooldown` to the names they had directly in `sec`."""
    old = old or {}
    t = sec.table("breaker")
    src, name = _source(sec, t, "breaker", "threshold", old.get("threshold"))
    threshold: int = src.int(name, default.threshold, min=1, max=1000)
    cooldown: float | None = None
    if default.cooldown is not None:
        src, name = _source(sec, t, "breaker", "cooldown", old.get("cooldown"))
        cooldown = src.float(name, default.cooldown, gt=0, max=86400)
    t.done()
    return BreakerSettings(threshold=threshold, cooldown=cooldown)
