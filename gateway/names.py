"""The one name rule for every identifier that enters the gateway (device, point, RD
endpoint, command id, gateway id), and the escaping of text that goes to a log line or a
table cell.

A name is 1..64 ASCII characters from `A-Z a-z 0-9 . _ : -`, starting with a letter or a
digit. So a name can never be an MQTT wildcard (`+`, `#`), a topic or path separator (`/`),
NUL or any other control character, or a space: whatever a name becomes later (a topic
segment, a stream, a CoAP path, a log line, a table cell) is safe by construction. `:` is
allowed because SenML device names are often URNs (`urn:dev:ow:10e2073a01080063`).
"""

from __future__ import annotations

import re
from typing import Final, TypeGuard

MAX_LENGTH: Final = 64
RULE: Final = (
    f"letters, digits, '.', '_', ':' or '-' (1 to {MAX_LENGTH} ASCII characters, "
    "starting with a letter or a digit)"
)
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*\Z")
# C0, DEL and C1 controls, and the Unicode line/paragraph separators a terminal may honour.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def is_valid(name: object) -> TypeGuard[str]:
    """Whether `name` obeys the name rule."""
    return isinstance(name, str) and 0 < len(name) <= MAX_LENGTH and _NAME.match(name) is not None


def problem(name: object, what: str = "name") -> str | None:
    """None when `name` is valid, else one sentence that says what is wrong with it (the
    name itself shown escaped, so the message is safe to log and print)."""
    if is_valid(name):
        return None
    if not isinstance(name, str):
        return f"{what} must be a string, got {type(name).__name__}"
    if not name:
        return f"{what} must not be empty"
    shown = escape(name[:80]) + ("..." if len(name) > 80 else "")
    if len(name) > MAX_LENGTH:
        return f"{what} {shown!r} is longer than {MAX_LENGTH} characters"
    return f"{what} {shown!r} must use {RULE}"


def escape(text: str) -> str:
    """`text` with every control character shown as an escape (`\\n`, `\\x1b`, `\\u2028`):
    one log line stays one line, and a table cell cannot move the cursor."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape_one, text)


def _escape_one(m: re.Match[str]) -> str:
    c = m.group()
    special = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if c in special:
        return special[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def topic_segment_problem(value: str) -> str | None:
    """Why `value` cannot be put into an MQTT topic we publish on (None: it can)."""
    if "+" in value or "#" in value:
        return f"{escape(value)!r} contains an MQTT wildcard ('+' or '#')"
    if _CONTROL.search(value) is not None:
        return f"{escape(value)!r} contains NUL or control characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{escape(value)!r} is not encodable as UTF-8"
    return None
