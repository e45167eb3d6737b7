"""The one retry policy: the `retry` and `breaker` tables, their one reader, the deprecated
names each part used before (accepted, with a warning naming the new key)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.breaker import Backoff
from gateway.config import Issues, Section
from gateway.retry import BreakerSettings, RetrySettings, read_breaker, read_retry

RETRY = RetrySettings(initial=0.5, cap=30.0)
BREAKER = BreakerSettings(threshold=3, cooldown=30.0)
OLD_RETRY = {"initial": "reconnect_delay", "cap": "reconnect_delay_max"}
OLD_BREAKER = {"threshold": "breaker_threshold", "cooldown": "breaker_cooldown"}


def read(data: dict[str, Any]) -> tuple[RetrySettings, BreakerSettings, Issues]:
    issues = Issues()
    sec = Section(data, "devices.m", issues)
    retry = read_retry(sec, RETRY, old=OLD_RETRY)
    breaker = read_breaker(sec, BREAKER, old=OLD_BREAKER)
    sec.done()
    return retry, breaker, issues


def shown(issues: list[Any]) -> list[str]:
    return [str(i) for i in issues]


def test_absent_tables_give_the_defaults() -> None:
    retry, breaker, issues = read({})
    assert (retry, breaker) == (RETRY, BREAKER) and not issues and not issues.warnings
    assert retry.jitter == "full"


def test_the_tables_are_read() -> None:
    retry, breaker, issues = read({
        "retry": {"initial": 2, "cap": 40, "multiplier": 3, "jitter": "half"},
        "breaker": {"threshold": 7, "cooldown": 9.5},
    })  # fmt: skip
    assert retry == RetrySettings(2.0, 40.0, 3.0, "half")
    assert breaker == BreakerSettings(7, 9.5)
    assert not issues and not issues.warnings


def test_the_settings_make_the_shared_backoff_and_breaker() -> None:
    b = RetrySettings(1.0, 10.0, 3.0, "none").backoff()
    assert isinstance(b, Backoff) and [b.next() for _ in range(4)] == [1.0, 3.0, 9.0, 10.0]
    full = RetrySettings(1.0, 10.0).backoff(lambda: 0.25)
    assert (full.floor, full.next()) == (0.0, 0.25)
    assert RetrySettings(1.0, 10.0, jitter="half").backoff(lambda: 0.0).next() == 0.5
    assert BreakerSettings(2, 5.0).breaker().cooldown == 5.0
    grows = BreakerSettings(2).breaker(RetrySettings(1.0, 8.0), lambda: 1.0)
    grows.failure(0.0)
    grows.failure(0.0)
    assert grows.retry_at == 1.0
    with pytest.raises(ValueError, match="needs the retry settings"):
        BreakerSettings(2).breaker()


def test_old_names_are_read_with_a_warning_naming_the_new_key() -> None:
    retry, breaker, issues = read({
        "reconnect_delay": 0.05, "reconnect_delay_max": 0.2,
        "breaker_threshold": 2, "breaker_cooldown": 0.3,
    })  # fmt: skip
    assert retry == RetrySettings(0.05, 0.2) and breaker == BreakerSettings(2, 0.3)
    assert not issues
    assert shown(issues.warnings) == [
        "devices.m.reconnect_delay: deprecated name: use `retry.initial` instead",
        "devices.m.reconnect_delay_max: deprecated name: use `retry.cap` instead",
        "devices.m.breaker_threshold: deprecated name: use `breaker.threshold` instead",
        "devices.m.breaker_cooldown: deprecated name: use `breaker.cooldown` instead",
    ]


def test_old_and_new_name_together_is_an_error() -> None:
    _, _, issues = read({"reconnect_delay": 1.0, "retry": {"initial": 2.0}})
    assert shown(issues.items) == [
        "devices.m.reconnect_delay: given twice: as 'reconnect_delay' and as `retry.initial`;"
        " keep `retry.initial` only"
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"retry": {"initial": 10, "cap": 1}}, "devices.m.retry.cap: must be >= initial (10)"),
        (
            {"reconnect_delay": 10, "reconnect_delay_max": 1},
            "devices.m.reconnect_delay_max: must be >= reconnect_delay (10)",
        ),
        ({"retry": {"initial": 0}}, "devices.m.retry.initial: must be > 0, got 0"),
        ({"retry": {"multiplier": 0.5}}, "devices.m.retry.multiplier: must be >= 1, got 0.5"),
        (
            {"retry": {"jitter": "ful"}},
            "devices.m.retry.jitter: must be one of 'full', 'half', 'none', got 'ful'",
        ),
        ({"retry": {"intial": 1}}, "devices.m.retry.intial: unknown key (did you mean"),
        ({"breaker": {"threshold": 0}}, "devices.m.breaker.threshold: must be >= 1, got 0"),
        ({"breaker": {"cooldown": -1}}, "devices.m.breaker.cooldown: must be > 0, got -1"),
        ({"retry": 3}, "devices.m.retry: must be a table, got an integer 3"),
    ],
)
def test_bad_values_name_their_path(data: dict[str, Any], expected: str) -> None:
    _, _, issues = read(data)
    assert any(m.startswith(expected) for m in shown(issues.items)), shown(issues.items)


def test_a_breaker_resting_like_its_retry_has_no_cooldown_key() -> None:
    issues = Issues()
    sec = Section({"breaker": {"threshold": 2, "cooldown": 5}}, "devices.c", issues)
    assert read_breaker(sec, BreakerSettings(3)) == BreakerSettings(2)
    assert shown(issues.items) == ["devices.c.breaker.cooldown: unknown key"]
