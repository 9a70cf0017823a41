"""Modbus addresses and their values: pure, no I/O.

A ``ModbusAddress`` says where one value lives on a Modbus device and how it is
encoded: the unit (slave) id, the table (holding or input registers, coils or
discrete inputs), the first address, the data type, the word order of a
multi-register type, and a linear scale: ``engineering = raw * scale + offset``.
Registers are 16-bit words, each big-endian on the wire (the Modbus rule);
``word_order`` says whether the most significant word of a 32- or 64-bit value
comes first ("big") or last ("little").

``encode`` rounds a value to its register's resolution (``scale``) and refuses
one that does not fit its type after scaling (out of range, not finite): a
setpoint is never wrapped on its way to the field.  ``plan_reads`` groups addresses
into as few read requests as possible: contiguous (or overlapping) ranges of one
unit and table, at most ``MAX_REGISTERS`` registers or ``MAX_BITS`` bits each.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.errors import FieldError

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["bool", "int16", "uint16", "int32", "uint32", "float32", "float64"]
WordOrder = Literal["big", "little"]
PointType = Literal["float", "int", "bool"]

MAX_REGISTERS = 125  # registers one read request may ask for (Modbus spec, FC 3 and 4)
MAX_BITS = 2000  # coils or discrete inputs one read request may ask for (FC 1 and 2)
MAX_UNIT = 247  # highest unit id of a device (248..255 are reserved)

BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
WRITABLE_TABLES: frozenset[str] = frozenset({"holding", "coil"})

_WORDS: dict[str, int] = {
    "bool": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "float64": 4,
}
_STRUCT: dict[str, str] = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
    "float64": ">d",
}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


class CodecError(FieldError, ValueError):
    """A value cannot be encoded for its Modbus address, or registers do not decode."""


class AddressKeys(BaseModel):
    """The keys that say where a value lives on a Modbus device and how it is encoded:
    checked together by ``ModbusAddress``, and carried by a scenario's points and inputs."""

    unit: int = Field(1, ge=0, le=MAX_UNIT, description="unit (slave) id of the device, 0..247")
    table: Table = Field(
        description="holding or input registers, coils or discrete inputs; only holding "
        "registers and coils can be written"
    )
    address: int = Field(ge=0, le=65535, description="first register or bit, 0-based")
    data_type: DataType | None = Field(
        None,
        description="bool (coils, discrete inputs), int16, uint16, int32, uint32, float32 "
        "or float64 (registers); default bool for bit tables, uint16 for registers",
    )
    word_order: WordOrder = Field(
        "big", description="multi-register types: most significant word first (big) or last"
    )
    scale: float = Field(1.0, description="engineering value = raw * scale + offset; not 0")
    offset: float = Field(0.0, description="engineering value = raw * scale + offset")


class ModbusAddress(AddressKeys):
    """Where one value lives on a Modbus device, and how it is encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    @model_validator(mode="after")
    def _consistent(self) -> ModbusAddress:
        bits = self.table in BIT_TABLES
        if self.data_type is None:
            object.__setattr__(self, "data_type", "bool" if bits else "uint16")
        if bits and self.data_type != "bool":
            raise ValueError(f"a {self.table} holds one bit: data_type must be bool")
        if not bits and self.data_type == "bool":
            raise ValueError(
                f"{self.table} registers hold numbers: data_type bool is for coils and "
                "discrete inputs"
            )
        if self.scale == 0.0:
            raise ValueError("scale must not be 0 (the value could not be written back)")
        if self.data_type == "bool" and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError("a bool is not scaled: leave scale and offset out")
        end = self.address + self.words - 1
        if end > 65535:
            raise ValueError(
                f"a {self.dtype} at address {self.address} ends at {end}, beyond 65535"
            )
        return self

    @property
    def dtype(self) -> DataType:
        assert self.data_type is not None  # set by the validator
        return self.data_type

    @property
    def words(self) -> int:
        """Registers (or bits) the value occupies."""
        return _WORDS[self.dtype]

    @property
    def is_bits(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def writable(self) -> bool:
        return self.table in WRITABLE_TABLES

    @property
    def integral(self) -> bool:
        """Its engineering value is a whole number: an integer type, unscaled."""
        return self.dtype in _INT_RANGE and self.scale == 1.0 and self.offset == 0.0

    def describe(self) -> str:
        return f"unit {self.unit} {self.table} {self.address} ({self.dtype})"


def type_problem(point_type: PointType, address: ModbusAddress) -> str | None:
    """Why a point declared ``point_type`` cannot be read from ``address``, or None."""
    if point_type == "bool" and address.dtype != "bool":
        return f"type bool needs a coil or discrete input, not {address.table} registers"
    if point_type != "bool" and address.dtype == "bool":
        return f"a {address.table} is a bool: declare type = 'bool'"
    if point_type == "int" and not address.integral:
        return "type int needs an integer data_type without scale or offset"
    return None


def write_problem(address: ModbusAddress) -> str | None:
    """Why a setpoint cannot be written to ``address``, or None."""
    if not address.writable:
        return (
            f"{address.table} {'inputs' if address.is_bits else 'registers'} are read-only: "
            "an input must be written to a holding register or a coil"
        )
    return None


# --------------------------------------------------------------------------------- values


def decode(address: ModbusAddress, raw: Sequence[int] | Sequence[bool]) -> bool | int | float:
    """The engineering value of the ``address.words`` registers (or one bit) in ``raw``."""
    if len(raw) != address.words:
        raise CodecError(f"{address.describe()}: {len(raw)} word(s) given, {address.words} needed")
    if address.is_bits:
        return bool(raw[0])
    words = [int(w) for w in raw]
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise CodecError(f"{address.describe()}: register value {w} is not 16 bits")
    if address.word_order == "little":
        words.reverse()
    value = struct.unpack(_STRUCT[address.dtype], struct.pack(f">{len(words)}H", *words))[0]
    if address.integral:
        return int(value)
    return float(value) * address.scale + address.offset


def encode(address: ModbusAddress, value: float) -> list[int] | list[bool]:
    """The registers (or the bit) that hold engineering ``value`` at ``address``.

    An integer type holds the nearest raw value (the register's resolution is ``scale``);
    a value that is not finite or does not fit the type after scaling is refused
    (``CodecError``): never wrapped.
    """
    where = address.describe()
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise CodecError(f"{where}: {value!r} is not a finite number")
    if address.is_bits:
        if value not in (0.0, 1.0):
            raise CodecError(f"{where}: a bit is 0 or 1, not {value!r}")
        return [bool(value)]
    raw = (float(value) - address.offset) / address.scale
    dtype = address.dtype
    packed: bytes
    if dtype in _INT_RANGE:
        whole = round(raw)  # to the register's resolution: at most scale / 2 away
        lo, hi = _INT_RANGE[dtype]
        if not lo <= whole <= hi:
            raise CodecError(f"{where}: {value!r} is {whole} raw, outside {dtype} {lo}..{hi}")
        packed = struct.pack(_STRUCT[dtype], whole)
    else:
        if not math.isfinite(raw):
            raise CodecError(f"{where}: {value!r} scales to {raw!r}")
        try:
            packed = struct.pack(_STRUCT[dtype], raw)
        except OverflowError:
            raise CodecError(f"{where}: {value!r} is {raw!r} raw, too large for {dtype}") from None
    words = list(struct.unpack(f">{len(packed) // 2}H", packed))
    if address.word_order == "little":
        words.reverse()
    return words


def as_point_value(point_type: PointType, value: bool | int | float) -> bool | int | float:
    """A decoded value as the type its point declares (what ``point_table`` checks)."""
    if point_type == "bool":
        return bool(value)
    if point_type == "int":
        return int(value)
    return float(value)


# --------------------------------------------------------------------------------- reads


@dataclass(frozen=True)
class ReadRequest:
    """One read of ``count`` registers or bits from ``start``, and what it carries."""

    unit: int
    table: Table
    start: int
    count: int
    members: tuple[tuple[Hashable, ModbusAddress], ...] = field(default=())

    def slice(self, address: ModbusAddress, values: Sequence[int] | Sequence[bool]) -> list[int]:
        """The words of ``address`` in the response ``values`` of this request."""
        first = address.address - self.start
        return [int(v) for v in values[first : first + address.words]]


def plan_reads(items: Sequence[tuple[Hashable, ModbusAddress]]) -> list[ReadRequest]:
    """As few requests as reading every item needs: contiguous runs per unit and table."""
    by_key: dict[tuple[int, str], list[tuple[Hashable, ModbusAddress]]] = {}
    for key, addr in items:
        by_key.setdefault((addr.unit, addr.table), []).append((key, addr))
    requests: list[ReadRequest] = []
    for (unit, table), group in sorted(by_key.items()):
        group.sort(key=lambda item: (item[1].address, item[1].words))
        limit = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
        start = end = -1
        members: list[tuple[Hashable, ModbusAddress]] = []
        for key, addr in group:
            a_end = addr.address + addr.words
            if members and addr.address <= end and max(end, a_end) - start <= limit:
                end = max(end, a_end)
                members.append((key, addr))
                continue
            if members:
                requests.append(
                    ReadRequest(unit, group[0][1].table, start, end - start, (*members,))
                )
            start, end, members = addr.address, a_end, [(key, addr)]
        if members:
            requests.append(ReadRequest(unit, group[0][1].table, start, end - start, (*members,)))
    return requests
