"""The control socket: a Unix stream socket in the runtime directory (mode 0660) where
`gatewayctl` asks the daemon things. One JSON object per line each way:
`{"verb": "status", "args": {...}}` -> `{"ok": true, "result": ...}` or
`{"ok": false, "error": "...", "exit": N}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway.errors import DaemonUnavailableError, GatewayError

log = logging.getLogger("gateway.control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LINE = 1 << 20


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
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def register(self, verb: str, handler: Handler) -> None:
        self._handlers[verb] = handler

    def unregister(self, verb: str) -> None:
        self._handlers.pop(verb, None)

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
                os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            except (KeyError, PermissionError) as exc:
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
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(dumps({"ok": False, "error": "request too long", "exit": 2}))
                    break
                if not line:
                    break
                writer.write(dumps(await self._answer(line)))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            verb = req["verb"]
            args = req.get("args") or {}
            if not isinstance(verb, str) or not isinstance(args, dict):
                raise TypeError("verb must be a string and args an object")
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": f"bad request: {exc}", "exit": 2}
        handler = self._handlers.get(verb)
        if handler is None:
            return {"ok": False, "error": f"unknown verb {verb!r}", "exit": 2}
        try:
            return {"ok": True, "result": await handler(args)}
        except GatewayError as exc:
            return {"ok": False, "error": str(exc), "exit": exc.exit_status}
        except Exception as exc:
            log.exception("control verb %s failed", verb)
            return {"ok": False, "error": f"internal error: {exc}", "exit": 1}


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
