"""`gatewayd`: load the config, open the store, start the services, serve until a signal.

SIGTERM/SIGINT stop the services in reverse order within `gateway.stop_timeout`, then drain
the store's writer (everything already handed to it is committed) before exiting.
SIGHUP (or `gatewayctl reload`) reloads the config: a valid one is applied; any failure keeps
the running one, is logged and shown by `gatewayctl status`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from gateway import __version__, names, systemd
from gateway import config as cfg
from gateway import events as ev
from gateway.bus import Bus
from gateway.control import ControlServer, Peer
from gateway.errors import ConfigError, GatewayError, PayloadError, StoreFullError
from gateway.logs import LibraryNoise, RateLimitedLog
from gateway.service import Service
from gateway.store import EventStore, OutboxCodec
from gateway.supervisor import Supervisor

if TYPE_CHECKING:
    from gateway.sync.remote_config import RemoteConfig

log = logging.getLogger("gateway")

#: Services started when their config section is present: section -> "module:Class".
OPTIONAL_SERVICES: dict[str, str] = {
    "coap": "gateway.coap.service:CoapService",
    "sync": "gateway.sync.service:SyncService",
    "metrics": "gateway.metrics:MetricsService",
    "derived": "services.processing.service:ProcessingService",
    "processing": "services.processing.service:ProcessingService",
    "alerts": "services.notification.service:NotificationService",
}


def tune_process(gateway: cfg.GatewaySection | None = None) -> None:
    """Process-wide settings the daemon owns (measured with bench/coap.py and bench/store.py).

    The store's writer thread runs Python between its SQLite calls; with the default 5 ms GIL
    switch interval the event loop, back from every sendmsg/epoll, waits for it in 5 ms
    slices: 0.5 ms (`gateway.switch_interval_ms`) gave +10..50 % CoAP requests/s and a
    lower p99.9.
    """
    gateway = gateway or cfg.GatewaySection()
    sys.setswitchinterval(gateway.switch_interval_ms / 1000.0)


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


def freeze_startup_objects() -> None:
    """Everything built at start-up lives as long as the process: keep it out of the GC's
    generations, so full collections only walk what requests create (short pauses). After
    a reload the same again: what the old config held goes back to the GC (it may be
    garbage now), and what the new one built is frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    release_freed_memory()


def release_freed_memory() -> None:
    """Give the heap pages start-up freed back to the kernel (glibc's `malloc_trim(0)`).

    glibc keeps freed memory below the top of its heap for reuse; at READY that was ~1 MB of
    the daemon's RSS (bench/daemon.py): each module's bytecode read from its .pyc, the parsed
    TOML, SQLite's schema work, all freed but still resident. A no-op off glibc."""
    try:
        import ctypes  # dlopen(NULL): the C library already in the process

        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def build_services(config: cfg.GatewayConfig) -> list[Service]:
    from services.auth import AuthService
    from services.collection import CollectionService
    from services.control.service import ControlService
    from services.devices import DevicesService

    out: list[Service] = [AuthService(), DevicesService(), CollectionService()]
    for section, ref in OPTIONAL_SERVICES.items():
        conf = config.sections.get(section)
        if conf is None or getattr(conf, "enabled", True) is False:
            continue
        if any(f"{type(s).__module__}:{type(s).__name__}" == ref for s in out):
            continue  # one service serving several sections
        module, _, attr = ref.partition(":")
        out.append(getattr(importlib.import_module(module), attr)())
    out.append(ControlService())  # last: the CoAP front door, if any, runs by then
    return out


def auth_policy(control: ControlServer, c: cfg.GatewayConfig) -> None:
    from services.auth import apply_policy

    apply_policy(control, c)


def outbox_codec(c: cfg.GatewayConfig) -> OutboxCodec | None:
    """With cloud sync configured, outbox rows carry their events already encoded for the
    sink (imported only then: a gateway without sync loads none of it)."""
    sync = c.sections.get("sync")
    if sync is None:
        return None
    from gateway.sync.codec import outbox_encoder

    return outbox_encoder(sync, c.gateway.id)


def local_types(c: cfg.GatewayConfig) -> frozenset[str]:
    """Event types `[sync] local_types` keeps out of the outbox."""
    return frozenset(getattr(c.sections.get("sync"), "local_types", ()))


def has_sink(c: cfg.GatewayConfig) -> bool:
    """Whether anything delivers the outbox (cloud sync configured and enabled)."""
    sync = c.sections.get("sync")
    return sync is not None and getattr(sync, "enabled", True) is not False


class Daemon:
    def __init__(self, config: cfg.GatewayConfig, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self._stop = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self.store: EventStore | None = None
        self.supervisor: Supervisor | None = None
        self.control: ControlServer | None = None
        self.reloads = 0
        self.last_reload_error = ""
        self.last_reload_kind = ""  # "config" (the file is invalid) or "internal"
        self._reload_lock = asyncio.Lock()
        self._repeats = RateLimitedLog(log)
        self.remote: RemoteConfig | None = None  # made when first needed

    async def run(self) -> int:
        c = self.config
        tune_process(c.gateway)
        importlib.import_module("services.control")  # its tables, before the store opens
        store = await self._open_store()
        if store is None:
            return 0  # stopped while waiting for room to open the database
        self.store = store
        bus = Bus(self.store)
        self.control = ControlServer(c.socket_path, c.control.group)
        self.supervisor = Supervisor(
            build_services(c), config=c, store=self.store, bus=bus, control=self.control
        )
        self._register_verbs()
        auth_policy(self.control, c)  # roles from the socket's first request on
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        # gateway.watchdog = false leaves WatchdogSec= pings off (for debugging under gdb...).
        watchdog = systemd.Watchdog(self._healthy) if c.gateway.watchdog else None
        try:
            await self.control.start()
            self.store.on_full_change = self._store_full_changed
            await self.supervisor.start()
            started_task = await self._started(
                {"version": __version__, "pid": os.getpid(), "devices": len(c.devices)}
            )
            if c.sections.get("sync") is not None:
                self._remote().resume()  # a remote config change still on probation
            freeze_startup_objects()
            systemd.ready(self.status_line())
            log.info("gatewayd %s ready: %s", __version__, self.status_line())
            if watchdog is not None:
                watchdog.start()
            status_task = asyncio.create_task(self._status_loop(), name="status")
            maint_task = asyncio.create_task(self._maintenance(), name="maintenance")
            await self._stop.wait()
            status_task.cancel()
            maint_task.cancel()
            if started_task is not None:
                started_task.cancel()
        finally:
            systemd.stopping("stopping")
            log.info("stopping")
            if watchdog is not None:
                await watchdog.stop()
            await self._bounded_shutdown()
        return 0

    async def _open_store(self) -> EventStore | None:
        """Open the store. When the disk is so full that SQLite cannot even open the file
        (it needs room for its -shm index), wait for room instead of exiting: say why (log,
        STATUS=), keep systemd's start time-out extended, retry; None if stopped meanwhile."""
        c = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # (SIGHUP's default would end the process while it waits; reloads come after.)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning("reload ignored: starting"))
        said = False
        while True:
            try:
                return await EventStore.open(
                    c.db_path, c.store, gateway_id=c.gateway.id, outbox_codec=outbox_codec(c),
                    sink=has_sink(c), local_types=local_types(c),
                )  # fmt: skip
            except StoreFullError as exc:
                pause = c.store.check_interval
                if not said:
                    log.error("cannot open the store: %s; retrying every %.1f s until there is "
                              "room", exc, pause)  # fmt: skip
                    said = True
                systemd.notify(f"EXTEND_TIMEOUT_USEC={int((pause + 60) * 1e6)}")
                systemd.status(f"DEGRADED, waiting for room to open the database: {exc}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._stop.wait()
                if self._stop.is_set():
                    return None

    async def _started(self, data: dict[str, Any]) -> asyncio.Task[None] | None:
        """Record `gateway.started` before READY=1. On a full store the daemon starts
        degraded instead (delivery and retention make room), and a task records the event
        once there is room."""
        assert self.store is not None
        try:
            await self.store.append(ev.GATEWAY_STREAM, ev.GATEWAY_STARTED, data)
            return None
        except StoreFullError as exc:
            log.warning("starting degraded: %s", exc)
        return asyncio.create_task(self._append_started(data), name="started")

    async def _append_started(self, data: dict[str, Any]) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.config.store.check_interval)
            try:
                await self.store.append(ev.GATEWAY_STREAM, ev.GATEWAY_STARTED, data)
                return
            except StoreFullError:
                continue

    def _store_full_changed(self, why: StoreFullError | None) -> None:
        systemd.status(self.status_line())

    async def _bounded_shutdown(self) -> None:
        """Stop within `stop_timeout` (+ a little for the store's last commit). If something
        hangs, say what (every task's stack) and leave: acknowledged events are committed by
        definition, so exiting now loses nothing that was promised."""
        bound = self.config.gateway.stop_timeout + 2.0
        try:
            await asyncio.wait_for(self._shutdown(), bound)
        except TimeoutError:
            log.error("shutdown did not finish within %.0f s; tasks still running:", bound)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    log.error("  %r\n%s", task, "".join(_stack(task)))
            import faulthandler

            faulthandler.dump_traceback(all_threads=True)
            os._exit(1)

    async def _shutdown(self) -> None:
        timeout = self.config.gateway.stop_timeout
        if self.remote is not None:
            await self.remote.stop()
        if self.supervisor is not None:
            await self.supervisor.stop(timeout * 0.7)
        if self.control is not None:
            await self.control.stop()
        if self.store is not None:
            with contextlib.suppress(GatewayError):
                await self.store.append(ev.GATEWAY_STREAM, ev.GATEWAY_STOPPED, {"pid": os.getpid()})
            await self.store.close()

    def _healthy(self) -> bool:
        return self.store is not None and self.store.healthy()

    def _on_hup(self) -> None:
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reload_quietly(), name="reload")

    async def _reload_quietly(self) -> None:
        await self.reload()

    async def reload(self) -> bool:
        """Apply the config file as it is now. Any failure (an invalid file, a driver that
        cannot be imported, a service that cannot take the new config) keeps the running
        config, is logged and kept for `status`, and systemd hears READY=1 again either way."""
        async with self._reload_lock:
            systemd.reloading()
            try:
                return await self._reload()
            finally:
                systemd.ready(self.status_line())

    async def _reload(self) -> bool:
        assert self.supervisor is not None and self.store is not None
        old = self.config
        try:
            new = cfg.load(self.config_path)
        except ConfigError as exc:
            self.last_reload_error = str(exc)
            self.last_reload_kind = "config"
            log.error("reload rejected, the running config stays:\n%s", exc)
            return False
        except Exception as exc:  # e.g. a driver module that fails to import
            self.last_reload_error = f"cannot load {self.config_path}: {type(exc).__name__}: {exc}"
            self.last_reload_kind = "internal"
            log.error("reload failed, the running config stays: %s", self.last_reload_error,
                      exc_info=True)  # fmt: skip
            return False
        for warning in new.warnings:
            log.warning("config: %s", warning)
        try:
            await self.supervisor.reload(new)
        except Exception as exc:
            self.last_reload_error = f"applying the new config failed: {type(exc).__name__}: {exc}"
            self.last_reload_kind = "internal"
            log.error("reload failed, going back to the running config: %s",
                      self.last_reload_error, exc_info=True)  # fmt: skip
            try:
                await self.supervisor.reload(old)
            except Exception:
                log.exception("restoring the running config after a failed reload failed too")
            return False
        self.config = new
        self.reloads += 1
        self.last_reload_error = ""
        self.last_reload_kind = ""
        tune_process(new.gateway)
        freeze_startup_objects()  # what the new config built lives until the next reload
        log.info("config reloaded: %d devices", len(new.devices))
        try:
            await self.store.append(
                ev.GATEWAY_STREAM, ev.CONFIG_RELOADED, {"devices": sorted(new.devices)}
            )
        except GatewayError as exc:  # applied all the same: a full store must not undo it
            log.warning("config reloaded, but its event could not be recorded: %s", exc)
        return True

    def status_line(self) -> str:
        assert self.supervisor is not None and self.store is not None
        health = self.supervisor.health()
        bad = [n for n, h in health.items() if h["state"] not in ("ok",)]
        coll = health.get("collection", {})
        parts = [
            f"{len(self.config.devices)} devices",
            f"{len(coll.get('unavailable', []))} down",
            f"seq {self.store.last_seq}",
        ]
        sync = health.get("sync")
        if sync and "backlog" in sync:
            parts.append(f"backlog {sync['backlog']}")
        if bad:
            parts.append("attention: " + ", ".join(f"{n} {health[n]['state']}" for n in bad))
        if self.store.full is not None:
            parts.insert(0, f"DEGRADED, new events refused: {self.store.full}")
        return "; ".join(parts)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(10)
            systemd.status(self.status_line())

    async def _maintenance(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.config.store.check_interval)
            try:
                n = await self.store.prune()
                if n:
                    log.info("retention: pruned %d delivered events", n)
            except GatewayError as exc:
                self._repeats.warning("retention", "retention failed: %s", exc)

    # -- control verbs --------------------------------------------------------------------
    def _register_verbs(self) -> None:
        assert self.control is not None
        self.control.audit = self._audit
        self.control.register("status", self._cmd_status, mutating=False)
        self.control.register("reload", self._cmd_reload, mutating=True)
        self.control.register("db.rebuild", self._cmd_rebuild, mutating=True)
        self.control.register("db.prune", self._cmd_prune, mutating=True)
        self.control.register("note", self._cmd_note, mutating=True)
        # From the sync service's link only (never the socket): a document from the cloud.
        self.control.register("config.remote", self._cmd_config_remote, local=True)
        self.control.register("config.rollback", self._cmd_config_rollback, mutating=True)

    async def _audit(self, verb: str, args: dict[str, Any], peer: Peer, error: str | None) -> None:
        """A state-changing verb ran: an event says which, with what, by whom, and how."""
        assert self.store is not None
        shown: Any = args
        if len(repr(args)) > 4096:
            shown = {"truncated": repr(args)[:4000]}
        data: dict[str, Any] = {"verb": verb, "args": shown, **peer.as_dict(), "ok": error is None}
        if error is not None:
            data["error"] = error[:1000]
        log.info("control: %s by uid %d gid %d pid %d%s", verb, peer.uid, peer.gid, peer.pid,
                 "" if error is None else f" failed: {error}")  # fmt: skip
        await self.store.append(ev.OPERATOR_STREAM, ev.CONTROL_VERB, data)

    def _writes(self) -> dict[str, float | None]:
        """Bytes this process has made the kernel write to storage (`/proc/self/io`; almost
        all of it the store's WAL and checkpoints): SD-card wear, as a daily rate."""
        written = storage_writes()
        up = time.monotonic() - self.started_mono
        per_day = None if written is None or up <= 0 else written / up * 86400
        return {"written_bytes": written, "written_per_day": per_day}

    async def _cmd_status(self, args: dict[str, Any]) -> Any:
        assert self.store is not None and self.supervisor is not None
        st = await self.store.stats()
        return {
            "gateway": self.config.gateway.id,
            "version": __version__,
            "pid": os.getpid(),
            "uptime": time.monotonic() - self.started_mono,
            "started": self.started_wall,
            "config": self.config_path,
            "status": self.status_line(),
            "services": self.supervisor.health(),
            "devices": len(self.config.devices),
            "store": {
                "path": st.path, "file_bytes": st.file_bytes, "used_bytes": st.used_bytes,
                "quota_bytes": st.quota_bytes, "last_seq": st.last_seq, "events": st.events,
                "dropped": st.dropped, "rejected": st.rejected,
                "full": None if self.store.full is None else str(self.store.full),
                **self._writes(),
            },
            "outbox": {
                "depth": st.outbox_depth, "bytes": st.outbox_bytes,
                "oldest_undelivered": st.oldest_undelivered, "dead_letters": st.dead_letters,
            },
            "reloads": self.reloads,
            "last_reload_error": self.last_reload_error,
            "process": {
                "gc_frozen": gc.get_freeze_count(),
                "switch_interval_ms": sys.getswitchinterval() * 1000.0,
            },
        }  # fmt: skip

    async def _cmd_reload(self, args: dict[str, Any]) -> Any:
        ok = await self.reload()
        return {
            "applied": ok, "errors": self.last_reload_error, "kind": self.last_reload_kind,
            "devices": len(self.config.devices),
        }  # fmt: skip

    def _remote(self) -> RemoteConfig:
        if self.remote is None:  # (imported only when used)
            from gateway.sync.remote_config import RemoteConfig

            self.remote = RemoteConfig(self)
        return self.remote

    async def _cmd_config_remote(self, args: dict[str, Any]) -> Any:
        await self._remote().receive(bytes(args["document"]), str(args["endpoint"]))

    async def _cmd_config_rollback(self, args: dict[str, Any]) -> Any:
        """The caller is recorded by the audit event too (SO_PEERCRED); `user` is as told."""
        who: dict[str, Any] = {"source": "cli"}
        if isinstance(args.get("user"), str):
            who["user"] = args["user"][:64]
        return await self._remote().rollback(who)

    async def _cmd_rebuild(self, args: dict[str, Any]) -> Any:
        assert self.store is not None
        return {"replayed": await self.store.rebuild()}

    async def _cmd_note(self, args: dict[str, Any]) -> Any:
        """An operator's note into the log ("replaced sensor"); answered after the commit."""
        assert self.store is not None
        text = args.get("text")
        if not isinstance(text, str) or not text.strip():
            raise PayloadError("note: text must be a non-empty string")
        if len(text) > 4096:
            raise PayloadError(f"note: text is {len(text)} characters, at most 4096")
        data: dict[str, Any] = {"text": text}
        if isinstance(args.get("author"), str):
            data["author"] = args["author"]
        e = await self.store.append(ev.OPERATOR_STREAM, ev.OPERATOR_NOTE, data)
        return {"seq": e.seq, "version": e.version}

    async def _cmd_prune(self, args: dict[str, Any]) -> Any:
        assert self.store is not None
        age = args.get("older_than")
        return {"pruned": await self.store.prune(float(age) if age is not None else None)}


def _stack(task: asyncio.Task[Any]) -> list[str]:
    import io

    buf = io.StringIO()
    task.print_stack(limit=12, file=buf)
    return [buf.getvalue()]


def setup_logging(level: str) -> None:
    # Under systemd, journald adds the time; the priority prefix <N> sets the journal level.
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = (
        "<%(levelno_sd)s>%(name)s: %(message)s"
        if under_journal
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )

    class _Fmt(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            record.levelno_sd = {10: 7, 20: 6, 30: 4, 40: 3, 50: 2}.get(record.levelno, 6)
            return super().format(record)

        def formatMessage(self, record: logging.LogRecord) -> str:
            # A message carries names and text from the network: its control characters
            # are shown escaped, so one record is one line and cannot forge another.
            record.message = names.escape(record.message)
            return super().formatMessage(record)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Fmt(fmt))
    handler.addFilter(LibraryNoise())  # pymodbus' own chatter: DEBUG (the driver reports)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, with the width from $COLUMNS: the default asks `shutil` for the terminal
    size, and importing shutil (with bz2 and lzma) costs the daemon ~0.3 MB for its lifetime."""

    def __init__(self, prog: str) -> None:
        try:
            width = int(os.environ.get("COLUMNS", "")) - 2
        except ValueError:
            width = 78
        super().__init__(prog, width=width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gatewayd", description="Edge gateway daemon.", formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--config", default=None,
        help=f"config file (default: $GATEWAY_CONFIG, then {cfg.DEFAULT_CONFIG_PATH})",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    args = parser.parse_args(argv)
    path = args.config or cfg.default_path()
    try:
        config = cfg.load(path)
    except ConfigError as exc:
        print(f"gatewayd: invalid configuration {path}:", file=sys.stderr)
        for issue in exc.issues:
            print(f"  {issue}", file=sys.stderr)
        return exc.exit_status
    setup_logging(config.gateway.log_level)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    try:
        return asyncio.run(Daemon(config, path).run())
    except GatewayError as exc:
        log.error("%s", exc)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
