"""Which tests start a process (a protocol peer, gatewayd, the CLI, a helper script): found by
following the names a test, its fixtures and the test helpers they use refer to, so that a
new peer test is marked `slow` without anyone remembering to."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import types
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.peers import Peer, require_binary

#: What starts a process; a module (subprocess) counts when the code names it at all, also
#: when imported inside the function.
_STARTS: tuple[object, ...] = (Peer, require_binary, subprocess, asyncio.create_subprocess_exec)
_STARTS_BY_NAME = frozenset(
    {"subprocess", "Popen", "create_subprocess_exec", "create_subprocess_shell"}
)


def _ours(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "tests" or module.startswith("tests.")


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """A function's code and that of everything defined inside it (nested defs, lambdas)."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _functions_of(cls: type) -> Iterator[Any]:
    for member in vars(cls).values():
        if isinstance(member, staticmethod | classmethod):
            yield member.__func__
        elif isinstance(member, property):
            yield member.fget
        elif inspect.isfunction(member):
            yield member


def _starts(obj: object, seen: set[int]) -> bool:
    if inspect.isclass(obj):
        if id(obj) in seen:
            return False
        seen.add(id(obj))
        return any(_starts(f, seen) for f in _functions_of(obj))
    if not callable(obj):
        return False
    func = inspect.unwrap(obj)
    code = getattr(func, "__code__", None)
    if not isinstance(code, types.CodeType) or id(code) in seen:
        return False
    seen.add(id(code))
    namespace: dict[str, Any] = getattr(func, "__globals__", {})
    for c in _code_objects(code):
        for name in c.co_names:
            if name in _STARTS_BY_NAME:
                return True
            target = namespace.get(name)
            if target is None:
                continue
            if any(target is s for s in _STARTS):
                return True
            if _ours(target) and _starts(target, seen):
                return True
    return False


def starts_a_process(item: pytest.Item) -> bool:
    """Whether the test, one of its fixtures, or a test helper either of them refers to
    starts a process."""
    seen: set[int] = set()
    if _starts(getattr(item, "function", None), seen):
        return True
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(
        _ours(fixturedef.func) and _starts(fixturedef.func, seen)
        for defs in info.name2fixturedefs.values()
        for fixturedef in defs
    )
