"""The file sink for air-gapped sites: the relay's batches appended to rotating files in a
directory, as newline-delimited JSON or a CBOR sequence (RFC 8742), one event per record.

"Delivered" means fsynced: a batch is acknowledged only after the data and the file are on
disk. The open file is `*.part`; at rotation it is fsynced, renamed to its final name and
the directory fsynced, so a collector only ever picks up complete files. After a power cut
the `.part` file is cut back to its last complete record and finalised at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import cbor2

from gateway.aio import wait_event
from gateway.retry import RetrySettings
from gateway.sync.codec import item_format
from gateway.sync.config import FileSinkConfig
from gateway.sync.link import ACCEPTED, Ack, LinkDownError

EXTENSIONS = {"ndjson": ".ndjson", "cbor-seq": ".cbors"}


def complete_length(data: bytes, fmt: str) -> int:
    """Length of the prefix of `data` made of complete records."""
    if fmt == "ndjson":
        return data.rfind(b"\n") + 1
    buf = io.BytesIO(data)
    good = 0
    while buf.tell() < len(data):
        try:
            cbor2.load(buf)
        except (cbor2.CBORDecodeError, EOFError, ValueError):
            break
        good = buf.tell()
    return good


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileChannel:
    def __init__(self, sink: FileSink) -> None:
        self._sink = sink
        self.label = f"file://{sink.dir}"
        self.item_format = item_format(sink.cfg.format)
        self.item_sep = b"\n" if self.item_format == "json" else b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting: list[asyncio.Future[Ack]] = []
        self._syncer: asyncio.Task[None] | None = None

    def fits(self, lane: str, stream: str, type_: str, size: int) -> bool:
        return True

    def send(
        self, lane: str, stream: str, type_: str, n: int, joined: bytes
    ) -> asyncio.Future[Ack]:
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        if self.closed.done():
            fut.set_exception(LinkDownError(f"{self.label}: closed"))
            return fut
        try:
            self._sink.write(joined + self.item_sep)
        except OSError as exc:
            fut.set_exception(LinkDownError(f"{self.label}: write failed: {exc}"))
            self._sink.last_error = str(exc)
            self.closed.set_result(None)
            return fut
        self._waiting.append(fut)
        if self._syncer is None or self._syncer.done():
            self._syncer = asyncio.get_running_loop().create_task(self._sync(), name="sync-fsync")
        return fut

    async def _sync(self) -> None:
        # Group commit: one fsync covers every batch written before it started.
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                await asyncio.to_thread(self._sink.fsync)
            except OSError as exc:
                self._sink.last_error = str(exc)
                for f in batch + self._waiting:
                    if not f.done():
                        f.set_exception(LinkDownError(f"{self.label}: fsync failed: {exc}"))
                        f.exception()
                self._waiting = []
                if not self.closed.done():
                    self.closed.set_result(None)
                return
            for f in batch:
                if not f.done():
                    f.set_result(ACCEPTED)
            if not self._waiting and self._sink.should_rotate():
                self._sink.rotate()

    async def close(self) -> None:
        if self._syncer is not None:
            with contextlib.suppress(Exception):
                await self._syncer
        if not self.closed.done():
            self.closed.set_result(None)


_INDEX = re.compile(r"events-(\d{8})-")


#: Reopening the directory after an error (the service passes `[sync] retry` instead).
RETRY = RetrySettings(initial=1.0, cap=60.0)


class FileSink:
    """A Sink writing to files; `connect` opens the directory (retrying on errors)."""

    def __init__(
        self, cfg: FileSinkConfig, logger: logging.Logger, retry: RetrySettings = RETRY
    ) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.directory)
        self.log = logger
        self.ext = EXTENSIONS[cfg.format]
        self._fd: int | None = None
        self._part: Path | None = None
        self._size = 0
        self.files = 0
        self.last_error: str | None = None
        self._kick = asyncio.Event()
        self.backoff = retry.backoff()  # between failed opens

    def kick(self) -> None:
        self._kick.set()

    def figures(self) -> dict[str, Any]:
        return {
            "endpoint": f"file://{self.dir}",
            "breakers": {},
            "last_error": self.last_error,
            "current_file": str(self._part) if self._part else None,
            "current_bytes": self._size,
            "files_closed": self.files,
        }

    async def connect(self) -> FileChannel:
        backoff = self.backoff
        backoff.reset()
        while True:
            try:
                await asyncio.to_thread(self._open)
                return FileChannel(self)
            except OSError as exc:
                self.last_error = f"{self.dir}: {exc}"
                self.log.warning("sync: file sink: %s", self.last_error)
                self._kick.clear()
                await wait_event(self._kick, backoff.next())

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._fd is not None:
            return
        for part in sorted(self.dir.glob("*.part")):
            self._finalise(part)
        # Files sort in the order they were written by a counter, not by the clock (a board
        # without an RTC can go back in time); the UTC stamp is for people.
        index = 1 + max(
            (int(m.group(1)) for f in self.dir.glob("events-*") if (m := _INDEX.match(f.name))),
            default=0,
        )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self._part = self.dir / f"events-{index:08d}-{stamp}{self.ext}.part"
        self._fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = 0
        _fsync_dir(self.dir)

    def _finalise(self, part: Path) -> None:
        """A leftover `.part` (power cut): cut any torn record, fsync, give it its name."""
        data = part.read_bytes()
        keep = complete_length(data, self.cfg.format)
        if keep < len(data):
            self.log.warning("sync: %s: dropping %d bytes of a torn record (never acked)",
                             part, len(data) - keep)  # fmt: skip
            with open(part, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        if keep == 0:
            part.unlink()
        else:
            part.rename(part.with_suffix(""))
            self.files += 1
        _fsync_dir(self.dir)

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(data)

    def fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def should_rotate(self) -> bool:
        return self._size >= self.cfg.rotate_bytes

    def rotate(self) -> None:
        """Called right after an fsync with nothing unsynced: close, rename, start anew."""
        if self._fd is None or self._part is None:
            return
        os.close(self._fd)
        self._fd = None
        part, self._part = self._part, None
        self._finalise(part)
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
