"""Sagas: named multi-step procedures (`[sagas.<name>]`) that survive a crash.

Steps are `{ write = "device/point", value = V, undo = U?, retry = false }` (a command
through the control service, id `<saga>.<step>`) and `{ wait = "EXPR", timeout = S }` (the
expression language of `services.expr` over `device/point` values from the latest
readings; write `-` and `/` with spaces around them when they are operators). Each step and
each compensation is an event in the stream `saga:<id>`. A failed step runs the `undo` of
the completed write steps in reverse order. After a restart a saga resumes from its events:
a step that was cut short is asked again under the same command id (idempotent: a write
that was done is not done twice); one whose outcome is unknown is compensated, or retried
when the step says `retry = true` (the write is idempotent by declaration). A compensation
that fails ends the saga `failed`, saying which step was left as it was.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from gateway.config import Section, validate_name
from gateway.events import Event

if TYPE_CHECKING:
    import sqlite3

    from services.expr import Expr

SAGA_STARTED: Final = "saga.started"  # data: {"name", "source", "by"?}
STEP_STARTED: Final = "saga.step.started"  # data: {"step"}
STEP_DONE: Final = "saga.step.done"  # data: {"step", "value"?}
STEP_FAILED: Final = "saga.step.failed"  # data: {"step", "reason", "error"}
UNDO_STARTED: Final = "saga.undo.started"  # data: {"step"}
UNDO_DONE: Final = "saga.undo.done"  # data: {"step"}
UNDO_FAILED: Final = "saga.undo.failed"  # data: {"step", "reason", "error"}
SAGA_COMPLETED: Final = "saga.completed"
SAGA_COMPENSATED: Final = "saga.compensated"  # data: {"failed_step", "reason"}
SAGA_FAILED: Final = "saga.failed"  # data: {"error"}: compensation did not finish

TYPES: Final = (SAGA_STARTED, STEP_STARTED, STEP_DONE, STEP_FAILED, UNDO_STARTED, UNDO_DONE,
                UNDO_FAILED, SAGA_COMPLETED, SAGA_COMPENSATED, SAGA_FAILED)  # fmt: skip
ENDS: Final = {SAGA_COMPLETED: "completed", SAGA_COMPENSATED: "compensated",
               SAGA_FAILED: "failed"}  # fmt: skip

#: `device/point` inside a wait expression (names of the one name rule, no spaces)
_REF = re.compile(r"(?<![\w.\-/])([A-Za-z0-9_][\w.\-]*)/([A-Za-z0-9_][\w.\-]*)")


def saga_stream(sid: str) -> str:
    return f"saga:{sid}"


@dataclass(frozen=True, slots=True)
class Step:
    write: tuple[str, str] | None = None  # (device, point)
    value: Any = None
    undo: Any = None
    has_undo: bool = False
    retry: bool = False
    wait: Expr | None = None
    refs: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # expr name -> ref
    timeout: float = 30.0

    def describe(self) -> str:
        if self.write is not None:
            return f"write {self.write[0]}/{self.write[1]} = {self.value!r}"
        return f"wait {self.wait.text if self.wait else ''} (timeout {self.timeout:g} s)"


@dataclass(frozen=True, slots=True)
class SagaSpec:
    name: str
    steps: tuple[Step, ...]


def compile_wait(text: str) -> tuple[Expr, dict[str, tuple[str, str]]]:
    from services.expr import compile_expr  # only with [sagas]: a gateway without loads none

    refs: dict[str, tuple[str, str]] = {}

    def sub(m: re.Match[str]) -> str:
        name = f"ref_{len(refs)}"
        refs[name] = (m.group(1), m.group(2))
        return name

    return compile_expr(_REF.sub(sub, text), None), refs


def parse(root: Section) -> dict[str, SagaSpec]:
    out: dict[str, SagaSpec] = {}
    for name, sec in _tables(root):
        validate_name(sec, "", name, "saga")
        raw = sec.list("steps")
        steps: list[Step] = []
        for i, item in enumerate(raw if isinstance(raw, list) else []):
            where = f"{sec.at('steps')}[{i}]"
            if not isinstance(item, dict):
                sec.issues.add(where, "must be a table {write, value, undo?} or {wait, timeout}")
                continue
            step = Section(item, where, sec.issues)
            if step.has("write") == step.has("wait"):
                step.error("", "a step has either 'write' or 'wait'")
                step.mark(*item)
                continue
            if step.has("write"):
                ref = step.str("write")
                dp: tuple[str, str] | None = None
                if isinstance(ref, str) and ref.count("/") == 1:
                    dp = (ref.split("/")[0], ref.split("/")[1])
                    validate_name(step, "write", dp[0], "device")
                    validate_name(step, "write", dp[1], "point")
                else:
                    step.error("write", f'must be "device/point", got {ref!r}')
                value = step.raw("value")
                has_undo = step.has("undo")
                undo = step.raw("undo", None)
                retry = step.bool("retry", False)
                step.done()
                if dp is not None:
                    steps.append(Step(write=dp, value=value, undo=undo, has_undo=has_undo,
                                      retry=retry))  # fmt: skip
            else:
                text = step.str("wait")
                timeout = step.float("timeout", 30.0, gt=0, max=86400)
                step.done()
                if not isinstance(text, str) or not text:
                    continue
                from services.expr import ExprSyntaxError

                try:
                    expr, refs = compile_wait(text)
                except ExprSyntaxError as exc:
                    step.error("wait", str(exc))
                    continue
                for dev, point in refs.values():
                    validate_name(step, "wait", dev, "device")
                    validate_name(step, "wait", point, "point")
                steps.append(Step(wait=expr, refs=refs, timeout=timeout))
        if isinstance(raw, list) and not raw:
            sec.error("steps", "a saga needs at least one step")
        sec.done()
        out[name] = SagaSpec(name, tuple(steps))
    return out


def _tables(root: Section) -> list[tuple[str, Section]]:
    out = []
    for name in list(root.data):
        root.mark(name)
        value = root.data[name]
        if not isinstance(value, dict):
            root.error(name, "must be a table with 'steps'")
            continue
        out.append((name, Section(value, root.at(name), root.issues)))
    return out


# -- state from events ---------------------------------------------------------------------
@dataclass
class SagaState:
    """Where a saga stands, folded from its events."""

    id: str
    name: str = ""
    done: list[int] = field(default_factory=list)  # steps completed, in order
    current: int | None = None  # a step started without an outcome
    current_at: float = 0.0  # wall time it started (a wait's timeout counts from there)
    failed: tuple[int, str, str] | None = None  # (step, reason, error)
    undone: list[int] = field(default_factory=list)
    undoing: int | None = None
    end: str | None = None
    version: int = 0

    def apply(self, e: Event) -> None:
        d = e.data
        self.version = e.version
        step = int(d.get("step") or 0)
        if e.type == SAGA_STARTED:
            self.name = str(d.get("name"))
        elif e.type == STEP_STARTED:
            self.current, self.current_at = step, e.wall_time
        elif e.type == STEP_DONE:
            self.done.append(step)
            self.current = None
        elif e.type == STEP_FAILED:
            self.failed = (step, str(d.get("reason")), str(d.get("error", "")))
            self.current = None
        elif e.type == UNDO_STARTED:
            self.undoing = step
        elif e.type in (UNDO_DONE, UNDO_FAILED):
            self.undone.append(step)
            self.undoing = None
        elif e.type in ENDS:
            self.end = ENDS[e.type]


def fold(sid: str, events: Sequence[Event]) -> SagaState:
    st = SagaState(sid)
    for e in events:
        st.apply(e)
    return st


def events_of(conn: sqlite3.Connection, sid: str) -> list[Event]:
    from gateway.store.queries import events

    return events(conn, 0, 10_000, saga_stream(sid))


def show(conn: sqlite3.Connection, sid: str) -> dict[str, Any] | None:
    """A saga's steps with times and outcomes (for `gatewayctl saga show`)."""
    evs = events_of(conn, sid)
    if not evs:
        return None
    st = fold(sid, evs)
    return {
        "id": sid, "name": st.name, "status": st.end or ("compensating" if st.failed
                                                         else "running"),
        "started": evs[0].wall_time, "updated": evs[-1].wall_time,
        "events": [{"time": e.wall_time, "type": e.type, **dict(e.data)} for e in evs],
    }  # fmt: skip


def list_sagas(conn: sqlite3.Connection, limit: int = 50) -> list[dict[str, Any]]:
    """Newest first (the `sagas` projection)."""
    have = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sagas'"
    ).fetchone()
    if not have:
        return []
    rows = conn.execute(
        "SELECT id, name, status, started, updated FROM sagas ORDER BY started DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [dict(zip(("id", "name", "status", "started", "updated"), r, strict=True))
            for r in rows]  # fmt: skip


def evaluate(step: Step, latest: Mapping[tuple[str, str], Any]) -> bool | None:
    """The wait's condition on the latest values: True/False, None when a value is missing."""
    from services.expr import EvalError

    assert step.wait is not None
    env = {name: latest.get(ref) for name, ref in step.refs.items()}
    if any(v is None for v in env.values()):
        return None
    try:
        return bool(step.wait.evaluate(env))
    except EvalError:
        return None


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.time()))
