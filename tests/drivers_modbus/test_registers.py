"""The register codec against literal vectors: hand-laid byte orders (ABCD, CDAB, BADC, DCBA) of
known values; and the Modbus specifications' frames and CRC examples through pymodbus."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
from pymodbus.pdu.other_message import ReadExceptionStatusRequest
from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadInputRegistersRequest

from drivers.modbus.registers import (
    CodecError,
    Layout,
    apply_scale,
    decode,
    encode,
    encode_bit,
    exception_name,
    int_range,
)

# --- Modbus Application Protocol Specification V1.1b3, section 6 (request/response examples) ---
# The driver talks through pymodbus: the spec's frames are checked against pymodbus's own
# encoder and decoder (the library, not a second codec of ours).

CLIENT = DecodePDU(is_server=False)


def request_pdu(request: ModbusPDU) -> bytes:
    return bytes((request.function_code,)) + request.encode()


def response(pdu: str) -> ModbusPDU:
    decoded = CLIENT.decode(bytes.fromhex(pdu))
    assert decoded is not None, pdu
    return decoded


def test_read_coils_example_6_1() -> None:
    # Read coils 20-38: request 01 0013 0013, response 01 03 CD 6B 05.
    assert request_pdu(ReadCoilsRequest(address=19, count=19)) == bytes.fromhex("0100130013")
    bits = response("0103CD6B05").bits[:19]
    # "coils 27-20 = CD hex = 1100 1101", "35-28 = 6B hex", "38-36 = 05 hex"
    want = [(0xCD >> i) & 1 for i in range(8)] + [(0x6B >> i) & 1 for i in range(8)]
    want += [(0x05 >> i) & 1 for i in range(3)]
    assert bits == [bool(b) for b in want]


def test_read_discrete_inputs_example_6_2() -> None:
    request = ReadDiscreteInputsRequest(address=196, count=22)
    assert request_pdu(request) == bytes.fromhex("0200C40016")
    bits = response("0203ACDB35").bits[:22]
    want = [(0xAC >> i) & 1 for i in range(8)] + [(0xDB >> i) & 1 for i in range(8)]
    want += [(0x35 >> i) & 1 for i in range(6)]
    assert bits == [bool(b) for b in want]


def test_read_holding_registers_example_6_3() -> None:
    # Registers 108-110: request 03 006B 0003, response 03 06 022B 0000 0064 = 555, 0, 100.
    request = ReadHoldingRegistersRequest(address=107, count=3)
    assert request_pdu(request) == bytes.fromhex("03006B0003")
    assert response("0306022B00000064").registers == [555, 0, 100]


def test_read_input_registers_example_6_4() -> None:
    assert request_pdu(ReadInputRegistersRequest(address=8, count=1)) == bytes.fromhex("0400080001")
    assert response("0402000A").registers == [10]


def test_exception_response_example_7() -> None:
    # Section 7: a read coils request answered with exception 02 (ILLEGAL DATA ADDRESS): 81 02.
    answer = response("8102")
    assert isinstance(answer, ExceptionResponse)
    assert answer.exception_code == 2 and answer.function_code & 0x7F == 1
    assert exception_name(answer.exception_code) == "ILLEGAL DATA ADDRESS"
    assert exception_name(0x0B) == "GATEWAY TARGET DEVICE FAILED TO RESPOND"


def test_bad_responses_are_refused() -> None:
    assert CLIENT.decode(bytes.fromhex("0306022B0000")) is None  # byte count lies


# --- Modbus over Serial Line V1.02: CRC-16 (6.2.2 and appendix B) ---


def test_crc16_spec_example() -> None:
    # Appendix B: the CRC of the frame 02 07 is 0x1241, sent low byte first (41 12).
    assert FramerRTU.compute_CRC(bytes.fromhex("0207")).to_bytes(2, "big") == bytes.fromhex("4112")
    rtu = FramerRTU(DecodePDU(is_server=False))
    assert rtu.buildFrame(ReadExceptionStatusRequest(dev_id=2)) == bytes.fromhex("02074112")


def test_rtu_frames() -> None:
    # Read 3 holding registers from 40108 of unit 17 (the common 11 03 006B 0003 7687 example).
    rtu = FramerRTU(DecodePDU(is_server=True))
    frame = rtu.buildFrame(ReadHoldingRegistersRequest(address=0x6B, count=3, dev_id=0x11))
    assert frame == bytes.fromhex("1103006B00037687")
    used, request = rtu.handleFrame(frame, 0, 0)
    assert used == len(frame) and request is not None
    assert (request.dev_id, request_pdu(request)) == (0x11, bytes.fromhex("03006B0003"))
    _, refused = rtu.handleFrame(bytes.fromhex("1103006B00037688"), 0, 0)  # CRC mismatch
    assert refused is None


# --- raw types, word and byte order ---

# 0x12345678 as int32/uint32 in the four orders: ABCD, CDAB (word little), BADC (byte little),
# DCBA (both little).
ORDERS_32 = [
    ("big", "big", [0x1234, 0x5678]),
    ("little", "big", [0x5678, 0x1234]),
    ("big", "little", [0x3412, 0x7856]),
    ("little", "little", [0x7856, 0x3412]),
]


@pytest.mark.parametrize(("word", "byte", "regs"), ORDERS_32)
def test_uint32_orders(word: str, byte: str, regs: list[int]) -> None:
    layout = Layout("uint32", word, byte)  # type: ignore[arg-type]
    assert decode(regs, layout) == 0x12345678
    assert encode(0x12345678, layout) == regs


def test_float32_and_float64() -> None:
    # IEEE 754: 1.0f = 3F80 0000; -2.5 = C020 0000; 1.0 (double) = 3FF0 0000 0000 0000.
    assert decode([0x3F80, 0x0000], Layout("float32")) == 1.0
    assert decode([0x0000, 0xC020], Layout("float32", "little")) == -2.5
    assert decode([0x3FF0, 0, 0, 0], Layout("float64")) == 1.0
    assert decode([0, 0, 0, 0xF03F], Layout("float64", "little", "little")) == 1.0
    assert encode(-2.5, Layout("float32")) == [0xC020, 0x0000]
    assert math.isnan(float(decode([0x7FC0, 0], Layout("float32"))))
    with pytest.raises(CodecError):
        encode(1e39, Layout("float32"))


def test_integers() -> None:
    assert decode([0xFFFF], Layout("int16")) == -1
    assert decode([0xFFFF], Layout("uint16")) == 65535
    assert decode([0x00FF], Layout("uint16", byte_order="little")) == 0xFF00
    assert decode([0xFFFF, 0xFFFE], Layout("int32")) == -2
    assert decode([0x0001, 0x0000, 0x0000, 0x0000], Layout("uint64")) == 1 << 48
    assert decode([0x8000, 0, 0, 0], Layout("int64")) == -(1 << 63)
    assert encode(-2, Layout("int64", "little")) == [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF]
    assert encode(12.6, Layout("int16")) == [13]  # scaled values round to the nearest step
    with pytest.raises(CodecError, match="out of range"):
        encode(70000, Layout("uint16"))
    with pytest.raises(CodecError, match="out of range"):
        encode(-1, Layout("uint32"))
    with pytest.raises(CodecError, match="number"):
        encode("7", Layout("uint16"))


def test_strings() -> None:
    # "AB", "C\0": two registers 0x4142 0x4300; byte little swaps within each register.
    assert decode([0x4142, 0x4300], Layout("string", length=2)) == "ABC"
    assert decode([0x4241, 0x0043], Layout("string", byte_order="little", length=2)) == "ABC"
    assert encode("ABC", Layout("string", length=2)) == [0x4142, 0x4300]
    with pytest.raises(CodecError, match="do not fit"):
        encode("ABCDE", Layout("string", length=2))


def test_bits() -> None:
    assert decode([0b1000_0000_0000_0100], Layout("bool", bit=2)) is True
    assert decode([0b1000_0000_0000_0100], Layout("uint16", bit=15)) is True
    assert decode([0b1000_0000_0000_0100], Layout("uint16", bit=3)) is False
    assert decode([0x0001], Layout("bool", byte_order="little", bit=8)) is True
    assert decode([0], Layout("bool")) is False and decode([7], Layout("bool")) is True
    assert encode_bit(0b0100, Layout("bool", bit=0), True) == 0b0101
    assert encode_bit(0b0101, Layout("bool", bit=2), False) == 0b0001


def test_scale() -> None:
    assert apply_scale(215, 0.1, -20.0) == pytest.approx(1.5)
    assert apply_scale(215, 1.0, 0.0) == 215 and isinstance(apply_scale(215, 1.0, 0.0), int)
    assert apply_scale(True, 10.0, 1.0) is True


# --- round trips over the whole value space of each type ---

orders = st.sampled_from(["big", "little"])


@given(
    t=st.sampled_from(["int16", "uint16", "int32", "uint32", "int64", "uint64"]),
    data=st.data(),
    word=orders,
    byte=orders,
)
def test_integer_round_trip(t: str, data: st.DataObject, word: str, byte: str) -> None:
    lo, hi = int_range(t)
    value = data.draw(st.integers(lo, hi))
    layout = Layout(t, word, byte)  # type: ignore[arg-type]
    regs = encode(value, layout)
    assert len(regs) == layout.registers and all(0 <= r <= 0xFFFF for r in regs)
    assert decode(regs, layout) == value


@given(value=st.floats(allow_nan=False, width=32), word=orders, byte=orders)
def test_float32_round_trip(value: float, word: str, byte: str) -> None:
    layout = Layout("float32", word, byte)  # type: ignore[arg-type]
    assert decode(encode(value, layout), layout) == value


@given(value=st.floats(allow_nan=False), word=orders, byte=orders)
def test_float64_round_trip(value: float, word: str, byte: str) -> None:
    layout = Layout("float64", word, byte)  # type: ignore[arg-type]
    assert decode(encode(value, layout), layout) == value


@given(text=st.text(st.characters(min_codepoint=1, max_codepoint=0x7F), max_size=8), byte=orders)
def test_string_round_trip(text: str, byte: str) -> None:
    layout = Layout("string", byte_order=byte, length=4)  # type: ignore[arg-type]
    assert decode(encode(text, layout), layout) == text


@given(register=st.integers(0, 0xFFFF), bit=st.integers(0, 15), value=st.booleans(), byte=orders)
def test_bit_round_trip(register: int, bit: int, value: bool, byte: str) -> None:
    layout = Layout("bool", byte_order=byte, bit=bit)  # type: ignore[arg-type]
    new = encode_bit(register, layout, value)
    assert decode([new], layout) is value
    # the other 15 bits are untouched
    other = Layout("uint16", byte_order=byte)  # type: ignore[arg-type]
    mask = ~(1 << bit) & 0xFFFF
    assert int(decode([new], other)) & mask == int(decode([register], other)) & mask
