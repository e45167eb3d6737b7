"""Read plans: coalescing by table and gap, protocol limits, and splitting answers into points."""

from __future__ import annotations

from drivers.modbus.plan import ModbusPoint, compile_plan
from drivers.modbus.registers import Layout


def reg(
    name: str, address: int, type_: str = "uint16", table: str = "holding", **kw: object
) -> ModbusPoint:
    length = kw.pop("length", None)
    bit = kw.pop("bit", None)
    word = kw.pop("word_order", "big")
    layout = Layout(type_, word, bit=bit, length=length)  # type: ignore[arg-type]
    return ModbusPoint(name, table, address, layout, **kw)  # type: ignore[arg-type]


def test_adjacent_and_near_points_share_a_request() -> None:
    points = [reg("a", 0), reg("b", 1, "float32"), reg("c", 10), reg("d", 30)]
    plan = compile_plan(points, max_gap=7)
    assert [(r.table, r.address, r.count) for r in plan] == [("holding", 0, 11), ("holding", 30, 1)]
    assert [p.name for p in plan[0].points] == ["a", "b", "c"]
    # gap 0: only touching points merge
    plan = compile_plan(points, max_gap=0)
    assert [(r.address, r.count) for r in plan] == [(0, 3), (10, 1), (30, 1)]


def test_tables_never_mix_and_limits_hold() -> None:
    points = [reg("h", 0), reg("i", 0, table="input"), reg("c", 5, "bool", "coil")]
    plan = compile_plan(points)
    assert sorted((r.table, r.address, r.count) for r in plan) == [
        ("coil", 5, 1), ("holding", 0, 1), ("input", 0, 1),
    ]  # fmt: skip
    many = [reg(f"p{i}", i) for i in range(300)]
    plan = compile_plan(many)
    assert [r.count for r in plan] == [125, 125, 50]
    coils = [reg(f"c{i}", i, "bool", "coil") for i in range(4500)]
    assert [r.count for r in compile_plan(coils)] == [2000, 2000, 500]
    assert [r.count for r in compile_plan(many, max_registers=100)] == [100, 100, 100]


def test_split_decodes_raw_values() -> None:
    # Raw values: the collection service applies scale and offset to every driver's readings.
    points = [
        reg("t", 0, "int16", scale=0.1, offset=-1.0),
        reg("f", 1, "float32"),
        reg("s", 3, "string", length=2),
        reg("flag", 5, "bool", bit=1),
        reg("flag2", 5, "bool", bit=0),
        reg("cdab", 6, "uint32", word_order="little"),
    ]
    (req,) = compile_plan(points)
    values = dict(req.split([0xFFF6, 0x3F80, 0x0000, 0x4F4B, 0x0000, 0b10, 0x0002, 0x0001]))
    assert values == {
        "t": -10, "f": 1.0, "s": "OK", "flag": True, "flag2": False, "cdab": 0x0001_0002,
    }  # fmt: skip
    assert [r.point for r in req.readings([0] * 8)] == list(values)  # fast path first
