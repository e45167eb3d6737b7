"""The control socket: a Unix stream socket in the runtime directory (mode 0660) where
`gatewayctl` asks the daemon things. One JSON object per line each way:
`{"verb": "status", "args": {...}}` -> `{"ok": true, "result": ...}` or
`{"ok": false, "error": "...", "exit": N}`.

Who may do what: every connection's peer is read with SO_PEERCRED (uid, gid, pid) and
SO_PEERGROUPS. Read-only verbs answer anyone who can open the socket; verbs that change or
delete state (registered with `mutating=True`, the default) are refused unless the caller is
root, the daemon's own user, or in `[control] group`, and each one that runs is reported to
`audit` (the daemon records it as a `control.verb` event naming the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import grp
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.errors import DaemonUnavailableError, ForbiddenError, GatewayError

log = logging.getLogger("gateway.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LINE = 1 << 20
# Linux's value; Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a control connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, int]:
        return {"uid": self.uid, "gid": self.gid, "pid": self.pid}


#: The caller of the verb being answered (handlers that record who asked read it).
current_peer: contextvars.ContextVar[Peer | None] = contextvars.ContextVar(
    "current_peer", default=None
)

#: Called after a mutating verb ran: (verb, args, peer, error or None). It records it.
Audit = Callable[[str, dict[str, Any], Peer, str | None], Awaitable[None]]
#: Called when a verb is refused: (verb, peer, message). It records it (`auth.denied`).
Denied = Callable[[str, Peer | None, str], Awaitable[None]]


class Policy(Protocol):
    """Roles (services.auth): None if `peer` may run `verb`, else the refusal's message."""

    def check(self, verb: str, mutating: bool, peer: Peer | None) -> str | None: ...


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    groups: tuple[int, ...] = ()
    with contextlib.suppress(OSError):  # supplementary groups: Linux 4.13+
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)  # CPython max: 256
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return Peer(pid=pid, uid=uid, gid=gid, groups=groups)


def _default(obj: object) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_default, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    def __init__(self, path: Path, group: str | None = None) -> None:
        self.path = path
        self.group = group
        self._handlers: dict[str, Handler] = {}
        self._mutating: set[str] = set()
        self._local: set[str] = set()  # answered in-process (`ask`) only, never on the socket
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._gid: int | None = None
        #: Records every mutating verb that ran (set by the daemon).
        self.audit: Audit | None = None
        #: Roles per verb (set by the auth service when `[auth]` exists), and who records a
        #: refusal. Without a policy: mutating verbs need root, the daemon's user or the group.
        self.policy: Policy | None = None
        self.on_denied: Denied | None = None
        self.refused = 0

    def register(
        self, verb: str, handler: Handler, *, mutating: bool = True, local: bool = False
    ) -> None:
        """`mutating`: the verb changes or deletes state (the default: a verb is only open to
        every socket user when its author says it reads). `local`: for the daemon's own
        services only (`ask`); the socket answers it as an unknown verb."""
        self._handlers[verb] = handler
        if local:
            self._local.add(verb)
        if mutating:
            self._mutating.add(verb)
        else:
            self._mutating.discard(verb)

    def unregister(self, verb: str) -> None:
        self._handlers.pop(verb, None)
        self._mutating.discard(verb)

    def mutating(self, verb: str) -> bool:
        return verb in self._mutating

    def allowed(self, peer: Peer) -> bool:
        """May `peer` run mutating verbs: root, the daemon's own user, or `[control] group`."""
        if peer.uid in (0, os.geteuid()):
            return True
        if self._gid is None:
            return False
        if peer.gid == self._gid or self._gid in peer.groups:
            return True
        try:  # more groups than SO_PEERGROUPS returned: the group database says
            import pwd

            return pwd.getpwuid(peer.uid).pw_name in grp.getgrgid(self._gid).gr_mem
        except KeyError:
            return False

    async def ask(self, verb: str, args: dict[str, Any] | None = None) -> Any:
        """Answer a verb in-process, as a client would get it (the metrics textfile asks
        for `status` this way)."""
        return await self._handlers[verb](args or {})

    @property
    def verbs(self) -> list[str]:
        return sorted(self._handlers)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            # A socket left by a killed daemon. Refuse to steal a live one.
            if _alive(self.path):
                raise GatewayError(f"{self.path}: another gatewayd is listening here")
            self.path.unlink()
        old = os.umask(0o117)  # created as 0660: owner and group only
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_LINE
            )
        finally:
            os.umask(old)
        os.chmod(self.path, 0o660)
        if self.group:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                log.warning("control socket: no group %r: only root may change state", self.group)
        if self._gid is not None:
            try:
                os.chown(self.path, -1, self._gid)
            except PermissionError as exc:
                log.warning("control socket: cannot give it to group %s: %s", self.group, exc)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            if self._conns:
                await asyncio.wait(list(self._conns), timeout=2)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            peer = peer_of(writer.get_extra_info("socket"))
        except OSError:
            peer = None  # not a Unix socket peer the kernel can name: read-only verbs only
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(dumps({"ok": False, "error": "request too long", "exit": 2}))
                    break
                if not line:
                    break
                writer.write(dumps(await self._answer(line, peer)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, peer: Peer | None = None) -> dict[str, Any]:
        try:
            req = json.loads(line)
            verb = req["verb"]
            args = req.get("args") or {}
            if not isinstance(verb, str) or not isinstance(args, dict):
                raise TypeError("verb must be a string and args an object")
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad request: {exc}", "exit": 2}
        handler = self._handlers.get(verb)
        if handler is None or verb in self._local:
            return {"ok": False, "error": f"unknown verb {verb!r}", "exit": 2}
        mutating = verb in self._mutating
        refusal: str | None = None
        if self.policy is not None:
            refusal = self.policy.check(verb, mutating, peer)
        elif mutating and (peer is None or not self.allowed(peer)):
            who = "an unknown peer" if peer is None else f"uid {peer.uid} (pid {peer.pid})"
            group = f"in group {self.group!r}" if self._gid is not None else "the daemon's user"
            refusal = (
                f"{verb}: permission denied: it changes state, so it needs root or {group}"
                f" (you are {who})"
            )
        if refusal is not None:
            self.refused += 1
            who = "an unknown peer" if peer is None else f"uid {peer.uid} (pid {peer.pid})"
            log.warning("control: %s refused for %s", verb, who)
            if self.on_denied is not None:
                try:
                    await self.on_denied(verb, peer, refusal)
                except Exception as exc:
                    log.warning("control: a refusal could not be recorded: %s", exc)
            err = ForbiddenError(refusal)
            return {"ok": False, "error": str(err), "exit": err.exit_status}
        error: str | None = None
        token = current_peer.set(peer)
        try:
            answer = {"ok": True, "result": await handler(args)}
        except GatewayError as exc:
            error = str(exc)
            answer = {"ok": False, "error": error, "exit": exc.exit_status}
        except Exception as exc:
            log.exception("control verb %s failed", verb)
            error = f"internal error: {exc}"
            answer = {"ok": False, "error": error, "exit": 1}
        finally:
            current_peer.reset(token)
        if mutating and self.audit is not None and peer is not None:
            try:
                await self.audit(verb, args, peer, error)
            except Exception as exc:  # the verb ran: say who did it even if it cannot be kept
                log.warning("control: %s by uid %d gid %d pid %d could not be recorded: %s",
                            verb, peer.uid, peer.gid, peer.pid, exc)  # fmt: skip
        return answer


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def call(path: Path, verb: str, args: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
    """Blocking client for the CLI. Raises DaemonUnavailableError when nobody listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnavailableError(
                f"gatewayd is not running ({path}: {exc.strerror})"
            ) from None
        except PermissionError:
            raise DaemonUnavailableError(
                f"{path}: permission denied (join the socket's group, or use sudo)"
            ) from None
        s.sendall(dumps({"verb": verb, "args": args or {}}))
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise DaemonUnavailableError("gatewayd closed the control connection")
            buf += chunk
    except TimeoutError:
        raise DaemonUnavailableError(f"gatewayd did not answer within {timeout:g} s") from None
    finally:
        s.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        err = GatewayError(reply.get("error", "failed"))
        err.exit_status = int(reply.get("exit", 1))
        raise err
    return reply.get("result")
