"""Config mistakes as the tests read them: the issues a config text raises."""

from __future__ import annotations

import pytest

from gateway.config import loads
from gateway.errors import ConfigError


def _raised(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        loads(text)
    return info.value


def issues(text: str) -> dict[str, str]:
    """{TOML path: message} of every issue `text` raises (it must raise)."""
    return {i.path: i.message for i in _raised(text).issues}


def issue_lines(text: str) -> list[str]:
    """Every issue `text` raises, as the user sees it ("path: message")."""
    return [str(i) for i in _raised(text).issues]
