"""Deframers: frames out of arbitrary chunks, garbage discarded and counted, buffers bounded."""

from __future__ import annotations

from drivers.serial.framing import (
    DelimiterDeframer,
    Discarded,
    FixedDeframer,
    Item,
    LengthPrefixDeframer,
    frames,
)


def feed_bytewise(
    d: DelimiterDeframer | FixedDeframer | LengthPrefixDeframer, data: bytes
) -> list[Item]:
    out: list[Item] = []
    for b in data:
        out += d.feed(bytes([b]))
    return out


def test_delimiter_lines_in_one_chunk_and_bytewise() -> None:
    data = b"T=21.5\r\nT=21.6\r\n\r\nT=21."
    d = DelimiterDeframer(b"\r\n")
    assert d.feed(data) == [b"T=21.5", b"T=21.6"]
    assert d.buffered == 5
    assert d.feed(b"7\r\n") == [b"T=21.7"]
    assert feed_bytewise(DelimiterDeframer(b"\r\n"), data + b"7\r\n") == [
        b"T=21.5", b"T=21.6", b"T=21.7",
    ]  # fmt: skip


def test_delimiter_split_across_chunks() -> None:
    d = DelimiterDeframer(b"\r\n")
    assert d.feed(b"abc\r") == []
    assert d.feed(b"\ndef") == [b"abc"]
    assert d.feed(b"\r\n") == [b"def"]


def test_oversize_frame_is_discarded_and_buffer_stays_bounded() -> None:
    d = DelimiterDeframer(b"\n", max_frame=8)
    out = d.feed(b"ok\n" + b"x" * 5)
    assert out == [b"ok"]
    out = []
    for _ in range(100):
        out += d.feed(b"y" * 50)
        assert d.buffered <= 8
    out += d.feed(b"zz\nnext\n")
    assert out == [
        Discarded("frame longer than 8 bytes without a delimiter", 5 + 100 * 50 + 2),
        b"next",
    ]


def test_oversize_frame_inside_one_chunk() -> None:
    d = DelimiterDeframer(b"\n", max_frame=4)
    assert d.feed(b"12345\n1234\n") == [
        Discarded("frame longer than 4 bytes without a delimiter", 5),
        b"1234",
    ]


def test_reset_drops_partial_frame() -> None:
    d = DelimiterDeframer(b"\n")
    d.feed(b"partial")
    d.reset()
    assert d.feed(b"line\n") == [b"line"]


def test_fixed_length_without_marker() -> None:
    d = FixedDeframer(4)
    assert d.feed(b"abcdefg") == [b"abcd"]
    assert d.feed(b"hij") == [b"efgh"]
    assert d.buffered == 2


def test_fixed_length_with_marker_resyncs_after_garbage() -> None:
    d = FixedDeframer(3, start=b"\xaa\x55")
    out = d.feed(b"\x00\x01\xaa\x55abc\xff\xaa")
    assert out == [Discarded("bytes before the start marker", 2), b"abc",
                   Discarded("bytes before the start marker", 1)]  # fmt: skip
    assert d.feed(b"\x55xyz") == [b"xyz"]
    assert frames(feed_bytewise(FixedDeframer(3, start=b"\xaa\x55"), b"\x13\xaa\x55abc")) == [
        b"abc"
    ]


def test_length_prefix_big_and_little_endian() -> None:
    d = LengthPrefixDeframer(size=2, order="big")
    assert d.feed(b"\x00\x03abc\x00\x02d") == [b"abc"]
    assert d.feed(b"e") == [b"de"]
    d = LengthPrefixDeframer(size=2, order="little")
    assert d.feed(b"\x03\x00abc") == [b"abc"]
    assert feed_bytewise(LengthPrefixDeframer(size=4), b"\x00\x00\x00\x02hi") == [b"hi"]


def test_length_prefix_counting_itself_with_adjust() -> None:
    d = LengthPrefixDeframer(size=1, adjust=-1)
    assert d.feed(b"\x04abc\x01") == [b"abc"]  # the empty frame is skipped


def test_length_prefix_bad_length_resyncs_on_marker() -> None:
    d = LengthPrefixDeframer(size=1, start=b"\x02", max_frame=4)
    out = d.feed(b"\x02\x09junk\x02\x02ok")
    assert out == [
        Discarded("length 9 outside 0..4", 1),
        Discarded("bytes before the start marker", 5),
        b"ok",
    ]


def test_length_prefix_cbor_payloads() -> None:
    # Two CBOR maps {"t": 21.5} behind 1-byte length prefixes, split mid-frame.
    payload = bytes.fromhex("a16174f94d60")
    d = LengthPrefixDeframer(size=1)
    stream = bytes([len(payload)]) + payload
    assert d.feed(stream + stream[:3]) == [payload]
    assert d.feed(stream[3:]) == [payload]
