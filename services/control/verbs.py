"""The control service's verbs on the control socket (`gatewayctl command`, `commands`,
`saga run`, `sagas`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.control import current_peer
from gateway.errors import NotFoundError, PayloadError
from services.control import projection as proj
from services.control import sagas as sg

if TYPE_CHECKING:
    from gateway.control import ControlServer
    from services.control.service import ControlService


class Verbs:
    def __init__(self, control: ControlService) -> None:
        self.control = control

    def register(self, server: ControlServer) -> None:
        server.register("command", self.command, mutating=True)
        server.register("commands", self.commands, mutating=False)
        server.register("saga.run", self.saga_run, mutating=True)
        server.register("sagas", self.sagas, mutating=False)

    async def command(self, args: dict[str, Any]) -> Any:
        peer = current_peer.get()
        by = None if peer is None else f"uid:{peer.uid}"
        timeout = args.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise PayloadError(f"--timeout must be a positive number, got {timeout!r}")
        row = await self.control.submit(
            str(args.get("device", "")), str(args.get("point", "")), args.get("value"),
            cid=args.get("id"), source="cli", by=by, timeout=timeout,
            wait=bool(args.get("wait")),
        )  # fmt: skip
        return public(row)

    async def saga_run(self, args: dict[str, Any]) -> Any:
        peer = current_peer.get()
        sid = await self.control.sagas.start(
            str(args.get("name", "")), sid=args.get("id"), source="cli",
            by=None if peer is None else f"uid:{peer.uid}",
        )  # fmt: skip
        if args.get("wait"):
            await self.control.sagas.wait(sid)
        show = await self.control.store.read(lambda c: sg.show(c, sid))
        return show

    async def sagas(self, args: dict[str, Any]) -> Any:
        sid = args.get("id")
        if isinstance(sid, str):
            row = await self.control.store.read(lambda c: sg.show(c, sid))
            if row is None:
                raise NotFoundError(f"no saga {sid!r}")
            return row
        return await self.control.store.read(sg.list_sagas)

    async def commands(self, args: dict[str, Any]) -> Any:
        cid = args.get("id")
        if isinstance(cid, str):
            row = await self.control.row(cid)
            if row is None:
                raise NotFoundError(f"no command {cid!r}")
            return public(row)
        device = args.get("device")
        rows = await self.control.store.read(
            lambda c: proj.commands(c, device if isinstance(device, str) else None, 50)
        )
        return [public(r) for r in rows]


def public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A command row as the CLI and CoAP observers see it (set fields only)."""
    keys = ("id", "device", "point", "value", "source", "by", "status", "reason", "error",
            "result", "requested", "updated", "deadline", "saga")  # fmt: skip
    return {k: row.get(k) for k in keys if row.get(k) is not None}
