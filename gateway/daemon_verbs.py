"""The daemon's own control verbs (status, reload, db.rebuild, db.prune, note, config.remote,
config.rollback), and the audit event every state-changing verb leaves."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway import events as ev
from gateway.control import ControlServer, Peer
from gateway.errors import PayloadError

if TYPE_CHECKING:
    from gateway.daemon import Daemon

log = logging.getLogger("gateway")


def storage_writes() -> int | None:
    """`write_bytes` of /proc/self/io (None where the kernel does not say)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class DaemonVerbs:
    """The verbs, over the running daemon's store, supervisor and config."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def register(self, control: ControlServer) -> None:
        control.audit = self._audit
        control.register("status", self._cmd_status, mutating=False)
        control.register("reload", self._cmd_reload, mutating=True)
        control.register("db.rebuild", self._cmd_rebuild, mutating=True)
        control.register("db.prune", self._cmd_prune, mutating=True)
        control.register("note", self._cmd_note, mutating=True)
        # From the sync service's link only (never the socket): a document from the cloud.
        control.register("config.remote", self._cmd_config_remote, local=True)
        control.register("config.rollback", self._cmd_config_rollback, mutating=True)

    async def _audit(self, verb: str, args: dict[str, Any], peer: Peer, error: str | None) -> None:
        """A state-changing verb ran: an event says which, with what, by whom, and how."""
        assert self.d.store is not None
        shown: Any = args
        if len(repr(args)) > 4096:
            shown = {"truncated": repr(args)[:4000]}
        data: dict[str, Any] = {"verb": verb, "args": shown, **peer.as_dict(), "ok": error is None}
        if error is not None:
            data["error"] = error[:1000]
        log.info("control: %s by uid %d gid %d pid %d%s", verb, peer.uid, peer.gid, peer.pid,
                 "" if error is None else f" failed: {error}")  # fmt: skip
        await self.d.store.append(ev.OPERATOR_STREAM, ev.CONTROL_VERB, data)

    def _writes(self) -> dict[str, float | None]:
        """Bytes this process has made the kernel write to storage (`/proc/self/io`; almost
        all of it the store's WAL and checkpoints): SD-card wear, as a daily rate."""
        written = storage_writes()
        up = time.monotonic() - self.d.started_mono
        per_day = None if written is None or up <= 0 else written / up * 86400
        return {"written_bytes": written, "written_per_day": per_day}

    async def _cmd_status(self, args: dict[str, Any]) -> Any:
        assert self.d.store is not None and self.d.supervisor is not None
        st = await self.d.store.stats()
        return {
            "gateway": self.d.config.gateway.id,
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.d.started_mono,
            "started": self.d.started_wall,
            "config": self.d.config_path,
            "status": self.d.status_line(),
            "services": self.d.supervisor.health(),
            "devices": len(self.d.config.devices),
            "store": {
                "path": st.path, "file_bytes": st.file_bytes, "used_bytes": st.used_bytes,
                "quota_bytes": st.quota_bytes, "last_seq": st.last_seq, "events": st.events,
                "dropped": st.dropped, "rejected": st.rejected,
                "full": None if self.d.store.full is None else str(self.d.store.full),
                **self._writes(),
            },
            "outbox": {
                "depth": st.outbox_depth, "bytes": st.outbox_bytes,
                "oldest_undelivered": st.oldest_undelivered, "dead_letters": st.dead_letters,
            },
            "reloads": self.d.reloads,
            "last_reload_error": self.d.last_reload_error,
            "process": {
                "gc_frozen": gc.get_freeze_count(),
                "switch_interval_ms": sys.getswitchinterval() * 1000.0,
            },
        }  # fmt: skip

    async def _cmd_reload(self, args: dict[str, Any]) -> Any:
        ok = await self.d.reload()
        return {
            "applied": ok, "errors": self.d.last_reload_error, "kind": self.d.last_reload_kind,
            "devices": len(self.d.config.devices),
        }  # fmt: skip

    async def _cmd_config_remote(self, args: dict[str, Any]) -> Any:
        await self.d.remote_config().receive(bytes(args["document"]), str(args["endpoint"]))

    async def _cmd_config_rollback(self, args: dict[str, Any]) -> Any:
        """The caller is recorded by the audit event too (SO_PEERCRED); `user` is as told."""
        who: dict[str, Any] = {"source": "cli"}
        if isinstance(args.get("user"), str):
            who["user"] = args["user"][:64]
        return await self.d.remote_config().rollback(who)

    async def _cmd_rebuild(self, args: dict[str, Any]) -> Any:
        assert self.d.store is not None
        return {"replayed": await self.d.store.rebuild()}

    async def _cmd_note(self, args: dict[str, Any]) -> Any:
        """An operator's note into the log ("replaced sensor"); answered after the commit."""
        assert self.d.store is not None
        text = args.get("text")
        if not isinstance(text, str) or not text.strip():
            raise PayloadError("note: text must be a non-empty string")
        if len(text) > 4096:
            raise PayloadError(f"note: text is {len(text)} characters, at most 4096")
        data: dict[str, Any] = {"text": text}
        if isinstance(args.get("author"), str):
            data["author"] = args["author"]
        e = await self.d.store.append(ev.OPERATOR_STREAM, ev.OPERATOR_NOTE, data)
        return {"seq": e.seq, "version": e.version}

    async def _cmd_prune(self, args: dict[str, Any]) -> Any:
        assert self.d.store is not None
        age = args.get("older_than")
        return {"pruned": await self.d.store.prune(float(age) if age is not None else None)}
