"""Runs sagas (`services.control.sagas`) for the control service: forward steps, then on a
failure the compensations in reverse; every transition an event of `saga:<id>`, so a restart
resumes exactly where the log says."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway import names
from gateway.errors import ConcurrencyError, NotFoundError, PayloadError
from gateway.faults import kill_point
from gateway.store import queries
from services.control import sagas as sg

if TYPE_CHECKING:
    from services.control.service import ControlService

#: Attempts of a step declared `retry = true` whose outcome was unknown (and of an undo).
RETRIES = 3


class SagaRunner:
    def __init__(self, control: ControlService) -> None:
        self.control = control
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._done: dict[str, list[asyncio.Future[str]]] = {}

    @property
    def specs(self) -> Mapping[str, sg.SagaSpec]:
        conf = self.control.config.sections.get("sagas")
        return conf if isinstance(conf, dict) else {}

    async def start(self, name: str, *, sid: str | None, source: str, by: str | None) -> str:
        if name not in self.specs:
            raise NotFoundError(f"no saga {name!r} in the config ([sagas.{name}])")
        sid = sid or os.urandom(8).hex()
        problem = names.problem(sid, "saga id")
        if problem is not None:
            raise PayloadError(problem)
        data: dict[str, Any] = {"name": name, "source": source}
        if by is not None:
            data["by"] = by
        try:
            await self.control.store.append(sg.saga_stream(sid), sg.SAGA_STARTED, data,
                                            expected_version=0)  # fmt: skip
        except ConcurrencyError:
            pass  # the same id again: that saga
        else:
            kill_point(f"{sg.SAGA_STARTED}:{sid}")
        self.spawn(sid)
        return sid

    def spawn(self, sid: str) -> None:
        task = self.tasks.get(sid)
        if task is None or task.done():
            ctx = self.control._ctx
            assert ctx is not None
            self.tasks[sid] = ctx.create_task(self.run(sid), f"saga:{sid}")

    async def wait(self, sid: str) -> str:
        st = await self._state(sid)
        if st.end is not None:
            return st.end
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._done.setdefault(sid, []).append(fut)
        return await fut

    async def resume_all(self) -> None:
        rows = await self.control.store.read(lambda c: sg.list_sagas(c, 10_000))
        for r in rows:
            if r["status"] == "running":
                self.spawn(r["id"])

    async def _state(self, sid: str) -> sg.SagaState:
        evs = await self.control.store.read(lambda c: sg.events_of(c, sid))
        return sg.fold(sid, evs)

    async def _event(self, sid: str, etype: str, data: dict[str, Any]) -> None:
        await self.control.store.append(sg.saga_stream(sid), etype, data)
        kill_point(f"{etype}:{data.get('step', '')}")
        if etype in sg.ENDS:
            for fut in self._done.pop(sid, []):
                if not fut.done():
                    fut.set_result(sg.ENDS[etype])

    # -- the run --------------------------------------------------------------------------
    async def run(self, sid: str) -> None:
        st = await self._state(sid)
        if st.end is not None:
            return
        spec = self.specs.get(st.name)
        if spec is None:
            await self._event(sid, sg.SAGA_FAILED, {
                "error": f"no saga {st.name!r} in the config any more: its steps so far "
                         f"({st.done}) were left as they are"})  # fmt: skip
            return
        if st.failed is None:
            i = st.current if st.current is not None else len(st.done)
            while i < len(spec.steps):
                if st.current != i:
                    await self._event(sid, sg.STEP_STARTED, {"step": i})
                    st.current, st.current_at = i, time.time()
                ok, data = await self._step(sid, i, spec.steps[i], st.current_at)
                if ok:
                    await self._event(sid, sg.STEP_DONE, {"step": i, **data})
                    st.done.append(i)
                    st.current = None
                    i += 1
                    continue
                await self._event(sid, sg.STEP_FAILED, {"step": i, **data})
                st.failed = (i, str(data.get("reason")), str(data.get("error", "")))
                break
            else:
                await self._event(sid, sg.SAGA_COMPLETED, {})
                return
        assert st.failed is not None
        for j in reversed(st.done):
            step = spec.steps[j]
            if j in st.undone or step.write is None or not step.has_undo:
                continue
            if st.undoing != j:
                await self._event(sid, sg.UNDO_STARTED, {"step": j})
            ok, data = await self._write(f"{sid}.u{j}", step.write, step.undo, sid, retry=True)
            if not ok:
                await self._event(sid, sg.UNDO_FAILED, {"step": j, **data})
                error = (
                    f"compensation of step {j} ({step.describe()}) failed: {data.get('error')}; "
                    f"steps {sorted(st.undone)} were undone, the others before step "
                    f"{st.failed[0]} were left as they are"
                )
                await self._event(sid, sg.SAGA_FAILED, {"error": error})
                return
            await self._event(sid, sg.UNDO_DONE, {"step": j})
            st.undone.append(j)
        await self._event(sid, sg.SAGA_COMPENSATED,
                          {"failed_step": st.failed[0], "reason": st.failed[1]})  # fmt: skip

    async def _step(
        self, sid: str, i: int, step: sg.Step, since: float
    ) -> tuple[bool, dict[str, Any]]:
        if step.write is not None:
            return await self._write(f"{sid}.s{i}", step.write, step.value, sid, retry=step.retry)
        return await self._wait(step, since)

    async def _write(
        self, cid: str, ref: tuple[str, str], value: Any, sid: str, *, retry: bool
    ) -> tuple[bool, dict[str, Any]]:
        """A write as a command (the same id again after a restart: never done twice)."""
        attempt = cid
        for n in range(RETRIES if retry else 1):
            if n:
                attempt = f"{cid}.r{n}"
            row = await self.control.submit(ref[0], ref[1], value, cid=attempt, source="saga",
                                            wait=True, saga=sid)  # fmt: skip
            if row.get("status") == "succeeded":
                out: dict[str, Any] = {"command": attempt}
                if "result" in row:
                    out["value"] = row["result"]
                return True, out
            if row.get("reason") != "unknown_outcome":
                break
        return False, {"command": attempt, "reason": row.get("reason") or row.get("status"),
                       "error": row.get("error", "")}  # fmt: skip

    async def _wait(self, step: sg.Step, since: float) -> tuple[bool, dict[str, Any]]:
        deadline = since + step.timeout
        devices = {d for d, _ in step.refs.values()}
        sub = self.control.bus.subscribe("saga-wait", ["readings"])
        try:
            while True:
                latest = await self._latest(step)
                verdict = sg.evaluate(step, latest)
                if verdict:
                    return True, {}
                left = deadline - time.time()
                if left <= 0:
                    assert step.wait is not None
                    return False, {"reason": "timeout", "error": f"{step.wait.text!r} not true "
                                   f"within {step.timeout:g} s"}  # fmt: skip
                try:
                    async with asyncio.timeout(left):
                        async for e in sub:
                            dev = e.stream[7:] if e.stream.startswith("device:") else None
                            if dev in devices:
                                break
                except TimeoutError:
                    pass
        finally:
            sub.close()

    async def _latest(self, step: sg.Step) -> dict[tuple[str, str], Any]:
        refs = set(step.refs.values())

        def q(c: Any) -> dict[tuple[str, str], Any]:
            out = {}
            for dev, point in refs:
                rows = queries.latest(c, dev, point)
                if rows:
                    out[(dev, point)] = rows[0]["value"]
            return out

        return await self.control.store.read(q)
