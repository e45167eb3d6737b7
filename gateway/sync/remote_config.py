"""Remote configuration (`[sync] remote_config = true`): a whole config document from the
config topic is validated exactly like a local file; a valid one is installed atomically in
place of the current file (which is kept as a numbered copy beside it), applied like a reload,
and kept only if the gateway comes up healthy within `[sync] remote_config_probation` seconds
(every service ok or degraded, and the sync link connected again); otherwise the previous file
is restored and applied. `gatewayctl config rollback` does the same on request.

Every step is a `config.change` event on the `config` stream (outcome, who, the document's
SHA-256, the one it replaced; never the document: it may hold secrets). Those events reach the
cloud through the outbox, on the response topic (`gateway.sync.link`), so a report survives
an outage; `gatewayctl config history` lists them.

Files beside the config (`config.toml`): `config.toml.1`, `.2`, ... the configs it replaced,
the newest numbered highest (at most KEEP); a rollback puts the newest one back and keeps the
config it replaces as `config.toml.rolled-back`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from gateway import config as cfg
from gateway.errors import ConfigError, GatewayError
from gateway.sync.config import CONFIG_STREAM, SyncConfig

if TYPE_CHECKING:
    from gateway.store import EventStore
    from gateway.supervisor import Supervisor

CONFIG_CHANGE: Final = "config.change"
MAX_DOCUMENT: Final = 256 * 1024  # bytes of TOML
KEEP: Final = 10  # numbered copies kept beside the config
HEALTH_EVERY: Final = 0.2  # seconds between health looks while on probation
MAX_ISSUES: Final = 50  # issues carried in one event (a report stays a reasonable size)

#: Outcomes, in the order a change can go through them.
OUTCOMES: Final = (
    "refused",  # invalid (as `gatewayctl config check` says), off or busy: nothing written
    "unchanged",  # the same document as the current file: nothing to do
    "accepted",  # valid and installed; being applied
    "failed",  # could not be applied: the previous file is back, the running config stays
    "applied",  # running, on probation
    "confirmed",  # healthy within the probation time: kept
    "rolled_back",  # not healthy in time, or `gatewayctl config rollback`: the previous is back
)

log = logging.getLogger("gateway.sync.remote_config")


class Host(Protocol):
    """What this needs from the daemon."""

    config: cfg.GatewayConfig
    config_path: str
    store: EventStore | None
    supervisor: Supervisor | None
    last_reload_error: str

    async def reload(self) -> bool: ...


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def backups(path: Path) -> list[tuple[int, Path]]:
    """The numbered copies kept beside `path`, oldest first."""
    prefix = path.name + "."
    out: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError):
        for p in path.parent.iterdir():
            n = p.name[len(prefix) :]
            if p.name.startswith(prefix) and n.isdigit():
                out.append((int(n), p))
    return sorted(out)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_beside(path: Path, name: str, data: bytes, like: os.stat_result) -> Path:
    """`data` in a new file `name` in `path`'s directory, with the mode (and, if allowed,
    the owner) of `like`, synced to disk."""
    tmp = path.with_name(name)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    mode = like.st_mode & 0o7777
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # (the umask narrowed it)
        with contextlib.suppress(PermissionError):
            os.fchown(fd, like.st_uid, like.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise
    os.close(fd)
    return tmp


def install(path: Path, data: bytes) -> Path:
    """Put `data` at `path` atomically (a reader sees the old file or the new one, never a
    mix); the file it replaces is kept as the next numbered copy, which is returned."""
    st = path.stat()
    kept = backups(path)
    backup = path.with_name(f"{path.name}.{kept[-1][0] + 1 if kept else 1}")
    tmp = _write_beside(path, f".{path.name}.remote.tmp", data, st)
    try:
        os.link(path, backup)  # the current file itself, as it is
    except BaseException:
        tmp.unlink()
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink()
        backup.unlink()
        raise
    _fsync_dir(path.parent)
    for _, old in kept[: max(0, len(kept) + 1 - KEEP)]:
        with contextlib.suppress(OSError):
            old.unlink()
    return backup


def restore(path: Path) -> tuple[Path, bytes]:
    """Put the newest numbered copy back at `path` atomically; the file it replaces is kept
    as `<name>.rolled-back`. Returns (the copy restored, its bytes)."""
    kept = backups(path)
    if not kept:
        raise GatewayError(f"{path}: no previous config is kept beside it ({path.name}.N)")
    top = kept[-1][1]
    data = top.read_bytes()
    aside = path.with_name(f"{path.name}.rolled-back")
    tmp = path.with_name(f".{path.name}.rolled-back.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    with contextlib.suppress(FileNotFoundError):  # (a config deleted meanwhile: nothing aside)
        os.link(path, tmp)
        os.replace(tmp, aside)
    os.replace(top, path)
    _fsync_dir(path.parent)
    return top, data


def _rolled_back_from(path: Path) -> str | None:
    try:
        return digest(path.with_name(f"{path.name}.rolled-back").read_bytes())
    except OSError:
        return None


def _marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.probation")


def _write_marker(path: Path, pending: dict[str, Any]) -> None:
    import json

    data = json.dumps(pending).encode()
    os.replace(_write_beside(path, f".{path.name}.probation.tmp", data, path.stat()), _marker(path))
    _fsync_dir(path.parent)


def _read_marker(path: Path) -> dict[str, Any] | None:
    import json

    try:
        pending = json.loads(_marker(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable, ignored: %s", _marker(path), exc)
        _drop_marker(path)
        return None
    return pending if isinstance(pending, dict) else None


def _drop_marker(path: Path) -> None:
    with contextlib.suppress(OSError):
        _marker(path).unlink()


def history_rows(conn: Any, limit: int = 100) -> list[dict[str, Any]]:
    """The last `limit` config changes, oldest first (read-only; for `gatewayctl`)."""
    from gateway.store import queries

    return [
        {"seq": e.seq, "time": e.wall_time, **dict(e.data)}
        for e in queries.last_events(conn, limit, CONFIG_STREAM)
        if e.type == CONFIG_CHANGE
    ]


class RemoteConfig:
    """Config changes from the cloud and rollbacks, one at a time; owned by the daemon."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = asyncio.Lock()  # file changes and the reloads that follow them
        self._change: asyncio.Task[None] | None = None  # applying and on probation
        self._abort = asyncio.Event()  # a rollback was asked for while on probation
        self._abort_by: dict[str, Any] = {}
        self._abort_result: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return Path(self.host.config_path)

    def busy(self) -> bool:
        return self._change is not None and not self._change.done()

    async def stop(self) -> None:
        """At shutdown: a change on probation is left as it is (the file is the new one)."""
        if self._change is not None and not self._change.done():
            self._change.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._change

    # -- a document from the cloud ------------------------------------------------------------
    async def receive(self, document: bytes, endpoint: str) -> None:
        """Returns once the outcome so far is committed (the message may then be acked);
        raises if it could not be (the broker sends the document again)."""
        who = {"source": "cloud", "endpoint": endpoint}
        h = digest(document)
        sync = self.host.config.sections.get("sync")
        if not isinstance(sync, SyncConfig) or not sync.remote_config:
            await self._record("refused", h, who, reason="remote configuration is off "
                               "([sync] remote_config = false)")  # fmt: skip
            return
        if self.busy() or self._lock.locked():
            busy = "another change is being applied or on probation: send it again later"
            await self._record("refused", h, who, reason=busy)
            return
        async with self._lock:
            accepted = await self._install(document, h, who, sync.remote_config_probation)
        if accepted is not None:
            self._abort.clear()
            self._change = asyncio.create_task(
                self._apply(h, accepted, who, sync.remote_config_probation), name="remote-config"
            )

    async def _install(
        self, document: bytes, h: str, who: dict[str, Any], probation: float
    ) -> str | None:
        """Validate and install; returns the hash of the file replaced, or None (reported)."""
        path = self.path
        if len(document) > MAX_DOCUMENT:
            await self._record("refused", h, who, reason=f"the document is {len(document)} "
                               f"bytes, over {MAX_DOCUMENT}")  # fmt: skip
            return None
        try:
            text = document.decode("utf-8")
        except UnicodeDecodeError as exc:
            await self._record("refused", h, who, reason=f"not UTF-8 text ({exc.reason} at "
                               f"byte {exc.start})")  # fmt: skip
            return None
        try:
            # Exactly as `gatewayctl config check` reads a file at the config's path: the same
            # messages (secrets are never in them).
            new = cfg.loads(text, str(path))
        except ConfigError as exc:
            errors = [str(i) for i in exc.issues]
            await self._record("refused", h, who, errors=errors[:MAX_ISSUES],
                               error_count=len(errors))  # fmt: skip
            return None
        except Exception as exc:  # e.g. a driver module that fails to import
            await self._record("refused", h, who, reason=f"cannot validate it: "
                               f"{type(exc).__name__}: {exc}")  # fmt: skip
            return None
        try:
            previous = digest(await asyncio.to_thread(path.read_bytes))
        except OSError as exc:
            await self._record("refused", h, who, reason=f"cannot read the current config "
                               f"{path}: {exc.strerror or exc}")  # fmt: skip
            return None
        if previous == h:
            await self._record("unchanged", h, who)
            return None
        if await asyncio.to_thread(_rolled_back_from, path) == h:
            # A retained message or a retry would apply it again and again.
            await self._record("refused", h, who, reason=f"this document was rolled back "
                               f"({path.name}.rolled-back): send a changed one")  # fmt: skip
            return None
        # Written first: a daemon killed on probation takes it up again at its next start.
        pending = {"hash": h, "previous": previous, "who": who, "probation": probation}
        try:
            await asyncio.to_thread(_write_marker, path, pending)
            backup = await asyncio.to_thread(install, path, document)
        except OSError as exc:
            _drop_marker(path)
            await self._record("refused", h, who, reason=f"cannot write {path} (and keep the "
                               f"current one): {exc.strerror or exc}")  # fmt: skip
            return None
        warnings = [str(w) for w in new.warnings][:MAX_ISSUES]
        try:
            await self._record("accepted", h, who, previous=previous, kept_as=backup.name,
                               devices=len(new.devices), warnings=warnings or None)  # fmt: skip
        except BaseException:
            # Not recorded, so not acknowledged: put the file back; the broker sends it again.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(restore, path)
            _drop_marker(path)
            raise
        return previous

    async def _apply(self, h: str, previous: str, who: dict[str, Any], probation: float) -> None:
        async with self._lock:
            ok = await self.host.reload()
            error = self.host.last_reload_error
            if not ok:
                _drop_marker(self.path)
                try:
                    await asyncio.to_thread(restore, self.path)
                except (OSError, GatewayError) as exc:
                    error += f"; the previous file could not be put back: {exc}"
        if not ok:
            await self._quietly("failed", h, who, previous=previous, reason=error)
            return
        await self._quietly("applied", h, who, previous=previous, probation=probation)
        await self._watch(h, previous, who, probation)

    def resume(self) -> None:
        """At start: a change that was on probation when the daemon stopped (or was killed)
        is on probation again, from now, if its document is the config that is running."""
        pending = _read_marker(self.path)
        if pending is None:
            return
        try:
            running = digest(self.path.read_bytes())
        except OSError:
            running = None
        h = pending.get("hash")
        if running != h or not isinstance(h, str):
            _drop_marker(self.path)  # it never got installed, or the file was changed since
            return
        probation = float(pending.get("probation") or 60.0)
        who = pending.get("who")
        who = who if isinstance(who, dict) else {}
        log.warning("config change %s was on probation when gatewayd stopped: %g s again",
                    h[:12], probation)  # fmt: skip
        self._abort.clear()
        self._change = asyncio.create_task(
            self._watch(h, str(pending.get("previous")), who, probation), name="remote-config"
        )

    async def _watch(self, h: str, previous: str, who: dict[str, Any], probation: float) -> None:
        """Probation: healthy in time is kept; else (or on request) the previous is back."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + probation
        problem = self._unhealthy()
        while problem is not None and not self._abort.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(HEALTH_EVERY, left)):
                    await self._abort.wait()
            problem = self._unhealthy()
        if self._abort.is_set():
            self._abort_result = await self._rollback(self._abort_by, "asked for on probation")
        elif problem is None:
            _drop_marker(self.path)
            await self._quietly("confirmed", h, who, previous=previous)
        else:
            with contextlib.suppress(GatewayError):  # (recorded as failed)
                await self._rollback(who, f"not healthy within {probation:g} s: {problem}")

    def _unhealthy(self) -> str | None:
        """What keeps the gateway from being healthy (None: it is)."""
        sup = self.host.supervisor
        if sup is None:
            return "not started"
        bad = []
        for name, h in sup.health().items():
            if h.get("state") not in ("ok", "degraded"):
                bad.append(f"{name} {h.get('state')}: {h.get('detail', '')}")
            elif name == "sync" and h.get("link") != "connected":
                bad.append(f"sync link {h.get('link')}: {h.get('last_error') or ''}")
        return "; ".join(bad) or None

    # -- rollback -------------------------------------------------------------------------------
    async def rollback(self, who: dict[str, Any]) -> dict[str, Any]:
        """Restore the previous config and apply it (the control verb `config.rollback`)."""
        if self.busy():
            assert self._change is not None
            self._abort_by, self._abort_result = who, {}
            self._abort.set()
            await asyncio.shield(self._change)
            if self._abort_result:
                return self._abort_result
            # It ended before it saw the request (it failed and was undone): roll back now.
        return await self._rollback(who, "asked for")

    async def _rollback(self, who: dict[str, Any], why: str) -> dict[str, Any]:
        async with self._lock:
            try:
                current = digest(await asyncio.to_thread(self.path.read_bytes))
            except OSError:
                current = None
            try:
                restored, data = await asyncio.to_thread(restore, self.path)
                _drop_marker(self.path)
            except (OSError, GatewayError) as exc:
                reason = f"rollback {why}, but impossible: {exc}"
                await self._quietly("failed", current, who, reason=reason)
                raise GatewayError(reason) from None
            ok = await self.host.reload()
        result: dict[str, Any] = {
            "restored": restored.name, "hash": digest(data), "applied": ok, "reason": why,
        }  # fmt: skip
        if not ok:
            result["error"] = self.host.last_reload_error
        await self._quietly("rolled_back", result["hash"], who, previous=current,
                            reason=why, restored=restored.name, applied=ok,
                            error=result.get("error"))  # fmt: skip
        return result

    # -- events ---------------------------------------------------------------------------------
    async def _record(self, outcome: str, h: str | None, who: dict[str, Any], **extra: Any) -> None:
        data: dict[str, Any] = {"outcome": outcome, "hash": h, **who}
        data.update({k: v for k, v in extra.items() if v is not None})
        shown = extra.get("reason") or "; ".join(extra.get("errors") or ())
        level = logging.INFO if outcome in ("accepted", "applied", "confirmed") else logging.WARNING
        by = who.get("endpoint") or who.get("source")
        log.log(level, "config change %s (%s from %s)%s", outcome, (h or "?")[:12], by,
                f": {shown}" if shown else "")  # fmt: skip
        assert self.host.store is not None
        await self.host.store.append(CONFIG_STREAM, CONFIG_CHANGE, data)

    async def _quietly(
        self, outcome: str, h: str | None, who: dict[str, Any], **extra: Any
    ) -> None:
        """Record, but never undo or stop a change because its event cannot be written."""
        try:
            await self._record(outcome, h, who, **extra)
        except GatewayError as exc:
            log.warning("config change %s could not be recorded: %s", outcome, exc)
