"""Incremental deframers for serial byte streams (pure: bytes in, frames out).

A serial line delivers bytes in arbitrary chunks; a deframer keeps what it has not yet
framed in a bounded buffer and returns every complete frame. Three framings: a delimiter
(lines), a fixed length, and a length prefix; each can have a start marker to resynchronise
on after line noise (a line on the *last* marker before its delimiter, e.g. the `$` of an
NMEA sentence that follows binary UBX frames without a line break). Bytes that cannot be
framed are reported as `Discarded` (never raised), so the caller can count and log them and
keep reading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

DEFAULT_MAX_FRAME: Final = 4096


@dataclass(frozen=True, slots=True)
class Discarded:
    """Bytes dropped by a deframer, and why (garbage before a marker, an oversize frame)."""

    reason: str
    size: int


Item = bytes | Discarded


class Deframer(Protocol):
    def feed(self, data: bytes) -> list[Item]:
        """Add bytes; return complete frames (without framing bytes) and discards, in order."""
        ...

    def reset(self) -> None:
        """Forget any partial frame (the port was reopened: the rest of it is lost)."""
        ...

    @property
    def buffered(self) -> int: ...


class DelimiterDeframer:
    """Frames end with `delimiter` (e.g. b"\\n"). Empty frames (blank lines) are skipped.

    A frame longer than `max_frame` is discarded up to and including its delimiter, so the
    buffer never holds more than `max_frame + len(delimiter) - 1` bytes.

    With start markers (`starts`, e.g. (b"$", b"!") for NMEA), a frame begins at the last
    marker before its delimiter: the bytes before it are discarded (reported), and so is a
    frame without any marker. The marker stays part of the frame (it is part of a line's
    text, as NMEA's `$`). A marker also ends an oversize run: what follows it is kept.
    """

    def __init__(
        self, delimiter: bytes, max_frame: int = DEFAULT_MAX_FRAME, starts: tuple[bytes, ...] = ()
    ) -> None:
        if not delimiter:
            raise ValueError("delimiter must not be empty")
        if max_frame < 1:
            raise ValueError("max_frame must be >= 1")
        if any(not s for s in starts):
            raise ValueError("a start marker must not be empty")
        self.delimiter = delimiter
        self.max_frame = max_frame
        self.starts = starts
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no complete delimiter
        self._skipping = 0  # > 0: inside an oversize frame, this many bytes dropped so far

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()
        self._scanned = 0
        self._skipping = 0

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        self._buf += data
        d = self.delimiter
        pos = 0
        while True:
            i = self._buf.find(d, max(pos, self._scanned - len(d) + 1))
            if i < 0:
                break
            frame = bytes(self._buf[pos:i])
            pos = i + len(d)
            self._scanned = pos
            if self.starts and frame:
                frame = self._resync(frame, out)
            if self._skipping:
                out.append(self._oversize(self._skipping + len(frame)))
                self._skipping = 0
            elif len(frame) > self.max_frame:
                out.append(self._oversize(len(frame)))
            elif frame:
                out.append(frame)
        del self._buf[:pos]
        self._scanned = max(0, self._scanned - pos)
        limit = self.max_frame + len(d) - 1
        kept = False
        if self.starts and (len(self._buf) > limit or self._skipping):
            # An oversize line may still end in a good frame: keep it from its last marker.
            # What comes before is dropped now and reported with the line (one report per
            # line, however the bytes were chunked).
            j = self._last_start(self._buf)
            if j >= 0 and len(self._buf) - j <= limit:
                self._skipping += j
                del self._buf[:j]
                kept = True
        # Keep a possible partial delimiter at the end; drop the rest of an oversize frame now
        # so that memory stays bounded whatever the device sends.
        if not kept and (len(self._buf) > limit or self._skipping):
            keep = len(d) - 1
            drop = len(self._buf) - keep
            if drop > 0:
                self._skipping += drop
                del self._buf[:drop]
        self._scanned = len(self._buf)
        return out

    def _oversize(self, size: int) -> Discarded:
        return Discarded(f"frame longer than {self.max_frame} bytes without a delimiter", size)

    def _last_start(self, data: bytes | bytearray) -> int:
        return max(data.rfind(s) for s in self.starts)

    def _resync(self, frame: bytes, out: list[Item]) -> bytes:
        """The frame from its last start marker on; what came before is reported."""
        j = self._last_start(frame)
        if j >= 0 and len(frame) - j > self.max_frame:
            return frame  # too long even from its marker: reported once, as oversize
        if j < 0:
            if self._skipping:  # the rest of an oversize run: reported with it
                return frame
            out.append(Discarded("no start marker in the frame", len(frame)))
            return b""
        if self._skipping:
            out.append(self._oversize(self._skipping + j))
            self._skipping = 0
        elif j:
            out.append(Discarded("bytes before the start marker", j))
        return frame[j:]


class _Hunter:
    """Finds an optional start marker; what comes before it is discarded."""

    def __init__(self, start: bytes) -> None:
        self.start = start
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def reset(self) -> None:
        self._buf.clear()

    def _sync(self, out: list[Item]) -> bool:
        """Drop bytes before the marker; True when _buf starts with a complete marker."""
        if not self.start:
            return True
        i = self._buf.find(self.start)
        if i < 0:
            # Nothing usable except a possible partial marker at the end.
            keep = len(self.start) - 1
            drop = len(self._buf) - keep
            if drop > 0:
                out.append(Discarded("bytes before the start marker", drop))
                del self._buf[:drop]
            return False
        if i > 0:
            out.append(Discarded("bytes before the start marker", i))
            del self._buf[:i]
        return True

    def _resync(self, out: list[Item], reason: str) -> None:
        """The frame at the head is bad: drop its first byte and hunt for the next marker."""
        n = max(1, len(self.start))
        out.append(Discarded(reason, n))
        del self._buf[:n]


class FixedDeframer(_Hunter):
    """Frames of `length` bytes, each after the optional `start` marker (which is stripped).

    Without a marker a lost byte shifts every later frame: prefer a marker when the device
    has one.
    """

    def __init__(self, length: int, start: bytes = b"") -> None:
        if length < 1:
            raise ValueError("length must be >= 1")
        super().__init__(start)
        self.length = length

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        self._buf += data
        n = len(self.start) + self.length
        while self._sync(out) and len(self._buf) >= n:
            out.append(bytes(self._buf[len(self.start) : n]))
            del self._buf[:n]
        return out


class LengthPrefixDeframer(_Hunter):
    """[start][length: size bytes][payload]; payload length = prefix + `adjust`.

    `adjust` covers devices whose prefix counts more or less than the payload (e.g. -2 when
    it includes itself). A length outside 0..max_frame is line noise: one byte is dropped and
    the deframer hunts again. Zero-length frames are skipped.
    """

    def __init__(
        self,
        size: Literal[1, 2, 4] = 1,
        order: Literal["big", "little"] = "big",
        adjust: int = 0,
        start: bytes = b"",
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        if size not in (1, 2, 4):
            raise ValueError("size must be 1, 2 or 4")
        if max_frame < 1:
            raise ValueError("max_frame must be >= 1")
        super().__init__(start)
        self.size = size
        self.order: Literal["big", "little"] = order
        self.adjust = adjust
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        self._buf += data
        head = len(self.start) + self.size
        while self._sync(out) and len(self._buf) >= head:
            prefix = int.from_bytes(self._buf[len(self.start) : head], self.order)
            length = prefix + self.adjust
            if not 0 <= length <= self.max_frame:
                self._resync(out, f"length {length} outside 0..{self.max_frame}")
                continue
            if len(self._buf) < head + length:
                break
            frame = bytes(self._buf[head : head + length])
            del self._buf[: head + length]
            if frame:
                out.append(frame)
        return out


def frames(items: list[Item]) -> list[bytes]:
    """Only the frames of a `feed()` result (for callers that count discards elsewhere)."""
    return [i for i in items if isinstance(i, bytes)]
