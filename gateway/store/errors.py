"""SQLite errors turned into the store's own: every `sqlite3.Error` that reaches the store's
API leaves it as a `StoreError` naming the true cause (SQLite's error name and message)."""

from __future__ import annotations

import contextlib
import os
import sqlite3

from gateway.errors import StoreCorruptError, StoreError, StoreFullError, StoreIOError

# Primary result codes (https://sqlite.org/rescode.html).
SQLITE_READONLY = 8
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14
SQLITE_NOTADB = 26
SQLITE_BUSY = 5
SQLITE_LOCKED = 6


def _no_space(path: str | None) -> bool:
    if path is None:
        return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    # root may use the blocks reserved for it; others only what is available to them.
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0


def store_error(exc: BaseException, doing: str, path: str | None = None) -> BaseException:
    """The store's error for `exc`, raised while `doing` something (a few words). Errors
    that are the store's own already, and non-SQLite ones, come back as they are. With
    `path` (the database's folder), an I/O error on a file system with no free space left
    (SQLite says SQLITE_IOERR_SHMSIZE when it cannot grow its -shm file) is a full disk."""
    if isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    primary = code & 0xFF if isinstance(code, int) else None
    what = f"{doing}: {exc} ({name})"
    err: StoreError
    if primary == SQLITE_FULL:
        err = StoreFullError(f"disk full: {what}", retry_after=60, cause="disk")
    elif primary == SQLITE_IOERR and _no_space(path):
        err = StoreFullError(f"disk full (no space left in {path}): {what}", retry_after=60,
                        cause="disk")  # fmt: skip
    elif primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        err = StoreCorruptError(f"database damaged: {what}")
    elif primary in (SQLITE_IOERR, SQLITE_CANTOPEN, SQLITE_READONLY, SQLITE_BUSY, SQLITE_LOCKED):
        err = StoreIOError(f"database I/O failed: {what}")
    else:
        err = StoreError(f"database error: {what}")
    err.__cause__ = exc
    return err


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether `exc` says the file is damaged (then it is moved aside), rather than that it
    cannot be read or written now (a full disk, an I/O error: moving it aside would not help
    and would hide a healthy database). Errors without a SQLite code count as damage."""
    code = getattr(exc, "sqlite_errorcode", None)
    return not isinstance(code, int) or code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already (it does by itself on
    SQLITE_FULL and a few other errors: a ROLLBACK then fails with "no transaction is active"
    and would hide the error that caused it). A failing rollback is not raised either."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
