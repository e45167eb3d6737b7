"""What the modules that touch a library's private names (`*_compat.py`) share: whether a
class still has the methods relied on, with the parameters they had in the pinned version
(each module checks at start and takes the library's stock path where not)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any


def wrong_signatures(
    cls: Any, methods: Mapping[str, tuple[str, ...]], qualified: bool = True
) -> list[str]:
    """The names of `methods` that `cls` lacks or takes other parameters for
    (`Class.name` when `qualified`)."""
    wrong = []
    for name, params in methods.items():
        fn = getattr(cls, name, None)
        try:
            ok = callable(fn) and tuple(inspect.signature(fn).parameters) == params
        except (TypeError, ValueError):
            ok = False
        if not ok:
            wrong.append(f"{cls.__name__}.{name}" if qualified else name)
    return wrong


def calls(fn: Any, name: str) -> bool:
    """Whether `fn`'s source still mentions `name` (True where the source cannot be read)."""
    try:
        return name in inspect.getsource(fn)
    except (OSError, TypeError):
        return True
