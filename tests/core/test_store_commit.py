"""Where a batch's COMMIT runs: in the event loop's thread while commits are fast, in the
store's writer thread when they are slow (an SD card's fsync) or when another connection
holds the write lock; and the WAL is checkpointed by the writer thread.

A slow disk cannot be had here, so a slow COMMIT is made by SQLite's own trace hook on the
store's connection (called as each statement starts): a stand-in for the fsync of an SD
card, the one place where these tests do not use the real thing. Fast commits use a tmpfs
(/dev/shm), where an fsync costs nothing.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway import events as ev
from gateway.store import EventStore


def _tmpfs() -> str:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) here")
    return "/dev/shm"


@pytest.fixture
async def fast_store() -> AsyncIterator[EventStore]:
    with tempfile.TemporaryDirectory(dir=_tmpfs()) as d:
        s = await EventStore.open(Path(d) / "g.db")
        try:
            yield s
        finally:
            await s.close()


def trace(store: EventStore, hook: Callable[[str], None]) -> None:
    conn = store._w  # the writer connection: see the module docstring for why
    assert conn is not None
    conn.set_trace_callback(hook)


async def append(store: EventStore, i: int) -> ev.Event:
    return await store.append(f"device:d{i % 3}", ev.READINGS, {"r": [{"n": "x", "v": i}]})


async def test_fast_commits_stay_in_the_loop_thread(fast_store: EventStore) -> None:
    loop_thread = threading.get_ident()
    where: list[bool] = []  # per COMMIT: ran in the loop's thread?
    trace(fast_store, lambda sql: where.append(threading.get_ident() == loop_thread)
          if sql == "COMMIT" else None)  # fmt: skip
    for i in range(40):
        await append(fast_store, i)
    assert len(where) == 40
    # The first ones go to the writer thread (nothing measured yet), then the loop's own.
    assert not where[0] and all(where[-10:]), where


async def test_slow_commits_go_to_the_writer_thread_and_the_loop_runs_meanwhile(
    fast_store: EventStore,
) -> None:
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    for i in range(40):  # fast commits: the loop's thread commits now (test above)
        await append(fast_store, i)
    reached = asyncio.Event()
    release = threading.Event()
    inline = 0

    def slow_commit(sql: str) -> None:
        nonlocal inline
        if sql != "COMMIT":
            return
        if threading.get_ident() == loop_thread:
            inline += 1
            release.wait(0.05)  # a slow fsync, holding the loop once: it is measured
        else:
            loop.call_soon_threadsafe(reached.set)
            release.wait(30)  # the writer thread waits for the disk; the loop does not

    trace(fast_store, slow_commit)
    await append(fast_store, 100)  # commits were fast: in the loop's thread, measured slow
    assert inline == 1
    pending = asyncio.ensure_future(append(fast_store, 101))
    async with asyncio.timeout(30):  # (an inline commit would never set `reached`)
        await reached.wait()
    # The writer thread is inside the slow COMMIT, and the loop is running this test.
    assert not pending.done() and inline == 1
    release.set()
    e = await pending
    assert e.seq == fast_store.last_seq


async def test_a_write_lock_held_elsewhere_does_not_stop_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another connection (a technician's sqlite3 shell, say) holds the write lock: the
    batch goes to the writer thread, which waits for the lock (busy_timeout, 5 s); the loop
    goes on; the append commits once the lock is free. asyncio's debug mode reports any step
    of a task that holds the loop over 2 s: waiting out busy_timeout in the loop's thread
    (5 s, then the writer thread anyway) would be one."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 2.0
    caplog.set_level("WARNING", logger="asyncio")
    store = await EventStore.open(tmp_path / "g.db")
    other = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
    try:
        for i in range(20):
            await append(store, i)
        loop_thread = threading.get_ident()
        waiting = asyncio.Event()

        def hook(sql: str) -> None:
            if sql == "BEGIN IMMEDIATE" and threading.get_ident() != loop_thread:
                loop.call_soon_threadsafe(waiting.set)

        trace(store, hook)
        other.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(append(store, 99))
        await waiting.wait()  # the writer thread waits for the lock; the loop runs this
        assert not pending.done()
        other.execute("COMMIT")
        e = await pending
        assert e.seq == 21
    finally:
        other.close()
        await store.close()
        loop.set_debug(False)
    assert not [r for r in caplog.records if "took" in r.getMessage()], caplog.text


async def test_the_wal_is_checkpointed_as_it_grows(fast_store: EventStore) -> None:
    """No COMMIT checkpoints (it may be the loop's): the writer thread does, so the WAL
    stays about SQLite's default size however much is written."""
    wal = Path(str(fast_store.path) + "-wal")
    blob = {"r": [{"n": "x", "vs": "y" * 2000}]}
    largest = 0
    for _ in range(100):  # ~20 MB of events
        await fast_store.append_many(
            [ev.NewEvent(f"device:d{i}", ev.READINGS, blob) for i in range(100)]
        )
        largest = max(largest, os.stat(wal).st_size)
    assert fast_store.last_seq == 10_000
    assert largest < 8 * 1024 * 1024, largest
