"""Property: how a byte stream is chunked by the OS never changes the frames a deframer
returns (nor, for delimiters, what it discards); buffers stay bounded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.serial.framing import (
    DelimiterDeframer,
    Discarded,
    FixedDeframer,
    Item,
    LengthPrefixDeframer,
    frames,
)

pytestmark = pytest.mark.slow  # properties over generated streams

alphabet = st.sampled_from(b"ab\r\n\x02\xaa\x00\x05")
streams = st.lists(alphabet, max_size=300).map(bytes)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(data)]:
        out.append(data[last:p])
        last = p
    return out


def feed_all(d: DelimiterDeframer | FixedDeframer | LengthPrefixDeframer,
             chunks: list[bytes]) -> list[Item]:  # fmt: skip
    out: list[Item] = []
    for c in chunks:
        out += d.feed(c)
    return out


@settings(max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(min_value=0), max_size=20))
def test_delimiter_chunking_is_invisible(data: bytes, cuts: list[int]) -> None:
    whole = DelimiterDeframer(b"\r\n", max_frame=8).feed(data)
    d = DelimiterDeframer(b"\r\n", max_frame=8)
    got = feed_all(d, chunked(data, cuts))
    assert got == whole
    assert d.buffered <= 8 + 1
    for f in frames(got):
        assert b"\r\n" not in f and 0 < len(f) <= 8


@settings(max_examples=300, deadline=None)
@given(streams, st.lists(st.integers(min_value=0), max_size=20))
def test_marker_framings_chunking_gives_same_frames(data: bytes, cuts: list[int]) -> None:
    for make in (
        lambda: FixedDeframer(3, start=b"\x02\xaa"),
        lambda: LengthPrefixDeframer(size=1, start=b"\x02", max_frame=6),
        lambda: LengthPrefixDeframer(size=2, order="little", max_frame=6),
    ):
        whole = make().feed(data)
        d = make()
        got = feed_all(d, chunked(data, cuts))
        assert frames(got) == frames(whole)
        dropped = sum(i.size for i in got if isinstance(i, Discarded))
        assert dropped == sum(i.size for i in whole if isinstance(i, Discarded))
        assert d.buffered <= 2 + 2 + 6


marked = st.lists(st.sampled_from(b"ab$!\r\n\xb5\x62"), max_size=300).map(bytes)


@settings(max_examples=300, deadline=None)
@given(marked, st.lists(st.integers(min_value=0), max_size=20))
def test_delimiter_with_start_markers_chunking_is_invisible(data: bytes, cuts: list[int]) -> None:
    def make() -> DelimiterDeframer:
        return DelimiterDeframer(b"\r\n", max_frame=8, starts=(b"$", b"!"))

    whole = make().feed(data)
    d = make()
    got = feed_all(d, chunked(data, cuts))
    assert frames(got) == frames(whole)
    # What is dropped, and how many times it is reported, do not depend on the chunks either.
    assert [i.size for i in got if isinstance(i, Discarded)] == [
        i.size for i in whole if isinstance(i, Discarded)
    ]
    assert d.buffered <= 8 + 1
    for f in frames(got):
        # A frame starts at its last marker and holds no other one.
        assert f[:1] in (b"$", b"!") and b"$" not in f[1:] and b"!" not in f[1:]
        assert b"\r\n" not in f and 0 < len(f) <= 8
    # Nothing is lost silently: after a last delimiter, every byte was framed or reported.
    got += d.feed(b"\r\n")
    framed = sum(len(f) for f in frames(got))
    dropped = sum(i.size for i in got if isinstance(i, Discarded))
    assert framed + dropped + 2 * (data + b"\r\n").count(b"\r\n") == len(data) + 2
