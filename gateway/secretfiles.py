"""Secret files named by the config (key, PSK, password files): where they are found and who
may read them. One policy for every part that reads one.

A relative path is looked up first in `$CREDENTIALS_DIRECTORY` (systemd's `LoadCredential=`:
the unit's dynamic user cannot read a root-only file under /etc, but systemd hands it a copy
it can), then in `$CONFIGURATION_DIRECTORY`. A file that every local user can read is refused,
with its path and the fix.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gateway.config import Section
from gateway.errors import ConfigError


def resolve(path: str) -> Path:
    """Where a secret file named in the config is: see the module's docstring."""
    p = Path(path)
    if p.is_absolute():
        return p
    for env in ("CREDENTIALS_DIRECTORY", "CONFIGURATION_DIRECTORY"):
        base = os.environ.get(env, "").split(":")[0]
        if base and (Path(base) / p).exists():
            return Path(base) / p
    return p


def mode_problem(path: Path, st: os.stat_result) -> str | None:
    """Why a secret file's permissions are refused (None when they are fine)."""
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IROTH | stat.S_IWOTH):
        return None
    return (
        f"{path}: mode {mode:04o} lets every local user read this secret; run "
        f"`chmod 600 {path}` (or `chmod 640` with the daemon's group), or pass it with "
        "systemd's LoadCredential= and name it here by its credential name"
    )


def oscore_problem(directory: str) -> str | None:
    """Why an aiocoap OSCORE context directory is refused: its key file (`secret.json`, or
    `settings.json` when the key is there) readable by every local user. None when fine."""
    for name in ("secret.json", "settings.json"):
        p = Path(directory) / name
        try:
            problem = mode_problem(p, p.stat())
            holds_key = name == "secret.json" or b'"secret' in p.read_bytes()
        except OSError:
            continue  # missing or unreadable: aiocoap says so when it loads the context
        if problem is not None and holds_key:
            return problem
    return None


def check(sec: Section, key: str) -> str | None:
    """Read the path at `key` of a config Section and check the file's mode if it exists now
    (a missing file is reported by whoever reads it). Returns the resolved path."""
    value = sec.str(key, None)
    if not isinstance(value, str) or not value:
        return None
    p = resolve(value)
    try:
        st = p.stat()
    except OSError:
        return str(p)
    problem = mode_problem(p, st)
    if problem is not None:
        sec.error(key, problem)
    return str(p)


def read(path: str, toml_path: str) -> bytes:
    """The contents of a secret file; ConfigError (at `toml_path`) when it cannot be read or
    every local user can read it. Never says what is in it."""
    p = resolve(path)
    try:
        with open(p, "rb") as f:
            problem = mode_problem(p, os.fstat(f.fileno()))
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}", toml_path) from None
    if problem is not None:
        raise ConfigError(problem, toml_path)
    return data
