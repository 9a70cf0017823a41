"""The Modbus codec: addresses, register encoding (round trips, refusals) and read grouping."""

from __future__ import annotations

import itertools
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from parallelcity.field.modbus.codec import (
    MAX_BITS,
    MAX_REGISTERS,
    CodecError,
    ModbusAddress,
    decode,
    encode,
    plan_reads,
    type_problem,
    write_problem,
)

INT_TYPES = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
             "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1)}  # fmt: skip


def addr(**kw: object) -> ModbusAddress:
    return ModbusAddress.model_validate({"table": "holding", "address": 0, **kw})


# ------------------------------------------------------------------ the address model


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        ({"unit": 248}, "less than or equal to 247"),
        ({"unit": -1}, "greater than or equal to 0"),
        ({"address": 65536}, "less than or equal to 65535"),
        ({"table": "coils"}, "holding"),
        ({"data_type": "float16"}, "float32"),
        ({"table": "coil", "data_type": "int16"}, "data_type must be bool"),
        ({"data_type": "bool"}, "bool is for coils"),
        ({"scale": 0.0}, "scale must not be 0"),
        ({"address": 65534, "data_type": "float64"}, "beyond 65535"),
        ({"table": "coil", "scale": 2.0}, "a bool is not scaled"),
        ({"word_order": "middle"}, "'big' or 'little'"),
        ({"unit": "1"}, "valid integer"),
        ({"register": 3}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_address_is_refused_with_a_reason(keys: dict[str, object], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        addr(**keys)


def test_defaults_and_writability() -> None:
    assert addr().dtype == "uint16"
    assert addr(table="coil").dtype == "bool"
    assert addr(table="discrete").words == 1
    assert addr(data_type="float64").words == 4
    assert write_problem(addr()) is None
    assert write_problem(addr(table="coil")) is None
    assert "read-only" in (write_problem(addr(table="input")) or "")
    assert "read-only" in (write_problem(addr(table="discrete")) or "")


def test_point_types_must_match_the_data_type() -> None:
    assert type_problem("float", addr(data_type="int16", scale=0.1)) is None
    assert type_problem("int", addr(data_type="int32")) is None
    assert "integer" in (type_problem("int", addr(data_type="int16", scale=0.1)) or "")
    assert "integer" in (type_problem("int", addr(data_type="float32")) or "")
    assert type_problem("bool", addr(table="coil")) is None
    assert type_problem("bool", addr()) is not None
    assert type_problem("float", addr(table="discrete")) is not None


# ------------------------------------------------------------------ encoding


def test_known_encodings() -> None:
    assert encode(addr(data_type="float32"), 70.5) == [0x428D, 0x0000]
    assert encode(addr(data_type="float32", word_order="little"), 70.5) == [0x0000, 0x428D]
    assert encode(addr(data_type="int16"), -1) == [0xFFFF]
    assert encode(addr(data_type="int16", scale=0.1), -3.2) == [0xFFE0]
    assert encode(addr(data_type="uint32"), 0x12345678) == [0x1234, 0x5678]
    assert encode(addr(data_type="uint16", scale=0.5, offset=-40), 10.0) == [100]
    assert decode(addr(data_type="int16", scale=0.1), [0xFFE0]) == pytest.approx(-3.2)
    assert decode(addr(data_type="int32"), [0xFFFF, 0xFFFE]) == -2
    assert decode(addr(table="coil"), [True]) is True


@pytest.mark.parametrize(
    ("keys", "value", "why"),
    [
        ({"data_type": "int16"}, 32768, "outside int16"),
        ({"data_type": "uint16"}, -1, "outside uint16"),
        ({"data_type": "uint16", "scale": 0.1}, 6553.6, "outside uint16"),
        ({"data_type": "uint32"}, 2.0**32, "outside uint32"),
        ({"data_type": "float32"}, 1e39, "too large for float32"),
        ({"data_type": "float64"}, math.inf, "not a finite number"),
        ({"data_type": "float32"}, math.nan, "not a finite number"),
        ({"table": "coil"}, 2.0, "a bit is 0 or 1"),
    ],
)
def test_a_value_that_does_not_fit_is_refused_never_wrapped(
    keys: dict[str, object], value: float, why: str
) -> None:
    with pytest.raises(CodecError, match=why):
        encode(addr(**keys), value)


def test_a_scaled_integer_is_rounded_to_the_register_resolution() -> None:
    a = addr(data_type="uint16", scale=0.001)
    assert encode(a, 0.3456789) == [346]
    assert decode(a, [346]) == pytest.approx(0.346)
    assert encode(addr(data_type="int16"), 2.5) == [2]  # half to even, within 0.5


def test_decode_refuses_a_wrong_word_count() -> None:
    with pytest.raises(CodecError, match="2 needed"):
        decode(addr(data_type="float32"), [1])


orders = st.sampled_from(["big", "little"])
scales = st.sampled_from([1.0, 0.1, 0.01, 2.0, -0.5])
offsets = st.sampled_from([0.0, -40.0, 273.15])


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(INT_TYPES)), orders, st.data())
def test_integers_round_trip_exactly(dtype: str, order: str, data: st.DataObject) -> None:
    lo, hi = INT_TYPES[dtype]
    raw = data.draw(st.integers(lo, hi))
    a = addr(data_type=dtype, word_order=order)
    words = encode(a, raw)
    assert len(words) == a.words and all(0 <= w <= 0xFFFF for w in words)
    assert decode(a, words) == raw
    assert encode(a, decode(a, words)) == words


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(INT_TYPES)), orders, scales, offsets, st.data())
def test_scaled_integers_round_trip(
    dtype: str, order: str, scale: float, offset: float, data: st.DataObject
) -> None:
    lo, hi = INT_TYPES[dtype]
    raw = data.draw(st.integers(lo, hi))
    a = addr(data_type=dtype, word_order=order, scale=scale, offset=offset)
    value = raw * scale + offset
    words = encode(a, value)
    assert decode(a, words) == pytest.approx(value, rel=1e-12, abs=1e-9)
    assert encode(a, decode(a, words)) == words


@settings(max_examples=100, deadline=None)
@given(orders, st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_float32_round_trips_every_float32(order: str, value: float) -> None:
    a = addr(data_type="float32", word_order=order)
    assert decode(a, encode(a, value)) == value


@settings(max_examples=100, deadline=None)
@given(orders, scales, offsets, st.floats(allow_nan=False, allow_infinity=False))
def test_float64_round_trips_or_is_refused(
    order: str, scale: float, offset: float, value: float
) -> None:
    a = addr(data_type="float64", word_order=order, scale=scale, offset=offset)
    try:
        words = encode(a, value)
    except CodecError:
        assert not math.isfinite((value - offset) / scale)
        return
    assert decode(a, words) == pytest.approx(value, rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(INT_TYPES)), scales, st.floats(-1e12, 1e12))
def test_an_integer_encoding_never_wraps(dtype: str, scale: float, value: float) -> None:
    a = addr(data_type=dtype, scale=scale)
    lo, hi = INT_TYPES[dtype]
    try:
        words = encode(a, value)
    except CodecError:
        assert not lo <= round(value / scale) <= hi
        return
    assert decode(a, words) == pytest.approx(value, abs=abs(scale) / 2 + 1e-9)


def test_big_word_order_is_the_wire_order_of_the_value() -> None:
    a = addr(data_type="float64")
    words = encode(a, math.pi)
    assert struct.pack(">4H", *words) == struct.pack(">d", math.pi)


# ------------------------------------------------------------------ grouping reads


def test_contiguous_points_share_one_request() -> None:
    items = [
        ("a", addr(address=0, data_type="float32")),
        ("b", addr(address=2, data_type="int16")),
        ("c", addr(address=3, data_type="float64")),
        ("gap", addr(address=10)),
        ("in", addr(table="input", address=0)),
        ("u2", addr(unit=2, address=0)),
        ("c1", addr(table="coil", address=5)),
        ("c2", addr(table="coil", address=6)),
    ]
    plan = plan_reads(items)
    shapes = sorted((r.unit, r.table, r.start, r.count, len(r.members)) for r in plan)
    assert shapes == [
        (1, "coil", 5, 2, 2),
        (1, "holding", 0, 7, 3),
        (1, "holding", 10, 1, 1),
        (1, "input", 0, 1, 1),
        (2, "holding", 0, 1, 1),
    ]


def test_requests_respect_the_modbus_limits() -> None:
    regs = [(k, addr(address=2 * k, data_type="float32")) for k in range(200)]
    bits = [(k, addr(table="coil", address=k)) for k in range(4500)]
    plan = plan_reads(regs + bits)
    assert all(r.count <= (MAX_BITS if r.table == "coil" else MAX_REGISTERS) for r in plan)
    assert sum(len(r.members) for r in plan) == 4700
    assert len([r for r in plan if r.table == "holding"]) == 4  # 400 registers / 124 per request
    assert len([r for r in plan if r.table == "coil"]) == 3


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["holding", "input", "coil"]), st.integers(0, 400),
                  st.sampled_from(["uint16", "float32", "float64"])),
        min_size=1, max_size=60,
    )
)  # fmt: skip
def test_every_point_is_read_whole_and_once(points: list[tuple[str, int, str]]) -> None:
    items = [
        (k, addr(table=t, address=a, data_type="bool" if t == "coil" else d))
        for k, (t, a, d) in enumerate(points)
    ]
    plan = plan_reads(items)
    seen = [key for r in plan for key, _ in r.members]
    assert sorted(seen) == list(range(len(items)))
    for r in plan:
        assert r.count <= (MAX_BITS if r.table == "coil" else MAX_REGISTERS)
        for _, a in r.members:
            assert r.start <= a.address and a.address + a.words <= r.start + r.count
    # fewest requests: two requests of one unit and table could not have been one
    spans = sorted((r.unit, r.table, r.start, r.start + r.count) for r in plan)
    for (u1, t1, s1, e1), (u2, t2, s2, e2) in itertools.pairwise(spans):
        if (u1, t1) == (u2, t2):
            limit = MAX_BITS if t1 == "coil" else MAX_REGISTERS
            assert s2 > e1 or max(e1, e2) - s1 > limit
