"""The canonical encoding (RFC 8785) against docs/wire-vectors.json, reproduced three ways.

``parallelcity.dispatch.wire`` must produce every vector byte for byte; so must the
independent encoder below, written without the project's JSON code: its
numbers come from exact decimal arithmetic (the shortest correctly rounded
digits that read back as the double), its strings from its own escaper, its
key order from UTF-16 code units computed by hand.  Where Node.js is
installed, JavaScript's own ``JSON.stringify`` checks the same file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
import subprocess
from decimal import ROUND_HALF_EVEN, Context, Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from parallelcity.dispatch.wire import (
    MAX_DETAIL_BYTES,
    MAX_SEQ,
    Command,
    RefusalCode,
    canonical_json,
    check_issuer_name,
    decode_command,
    decode_reply,
    decode_request,
    format_number,
    truncate_detail,
)
from parallelcity.errors import ScenarioError, WireFormatError
from parallelcity.gateway.config import ClientEntry
from parallelcity.gateway.core import GatewayCore
from parallelcity.gateway.grants import Grant
from parallelcity.scenario.definition import ZmqSecurity
from parallelcity.specs import InputLimit

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "docs" / "wire-vectors.json"
DOC = ROOT / "docs" / "wire-protocol.md"


def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text("utf-8"))
    return data


# --------------------------------------------------------------------------- the reference


def ref_digits(x: float) -> tuple[str, int]:
    """(digits, n) with x = 0.digits * 10**n, digits the fewest that read back as ``x``."""
    exact = Decimal(x)
    for p in range(1, 18):
        best = Context(prec=p, rounding=ROUND_HALF_EVEN).plus(exact)
        unit = Decimal(1).scaleb(best.adjusted() - p + 1)
        found = [c for c in (best, best - unit, best + unit) if float(c) == x]
        if found:
            pick = min(found, key=lambda c: abs(c - exact))
            _, digits, exponent = pick.as_tuple()
            assert isinstance(exponent, int)
            text = "".join(map(str, digits))
            n = exponent + len(text)
            return text.rstrip("0"), n
    raise AssertionError(f"no 17-digit form of {x!r} reads back")


def ref_number(x: float) -> str:
    """ECMAScript Number::toString, section 6.1.6.1.20 of ECMA-262, step by step."""
    if isinstance(x, int):
        assert abs(x) <= 2**53 - 1
        x = float(x)
    assert math.isfinite(x)
    if x == 0:
        return "0"
    if x < 0:
        return "-" + ref_number(-x)
    s, n = ref_digits(x)
    k = len(s)
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * (-n) + s
    exponent = n - 1
    sign = "+" if exponent >= 0 else "-"
    head = s[0] if k == 1 else s[0] + "." + s[1:]
    return f"{head}e{sign}{abs(exponent)}"


HEX = "0123456789abcdef"
SHORT_ESCAPES = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r"}


def ref_string(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif code in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[code])
        elif code < 0x20:
            out.append("\\u00" + HEX[code >> 4] + HEX[code & 15])
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def utf16_units(text: str) -> list[int]:
    units: list[int] = []
    for ch in text:
        code = ord(ch)
        if code < 0x10000:
            units.append(code)
        else:
            code -= 0x10000
            units += [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
    return units


def ref_canonical(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        return ref_number(value)
    if isinstance(value, str):
        return ref_string(value)
    if isinstance(value, list):
        return "[" + ",".join(ref_canonical(v) for v in value) + "]"
    assert isinstance(value, dict)
    keys = sorted(value, key=utf16_units)
    return "{" + ",".join(ref_string(k) + ":" + ref_canonical(value[k]) for k in keys) + "}"


# --------------------------------------------------------------------------- the vectors


def double(bits: str) -> float:
    value: float = struct.unpack(">d", bytes.fromhex(bits))[0]
    return value


def test_number_vectors_include_rfc_8785_appendix_b_and_all_three_agree() -> None:
    numbers = vectors()["numbers"]
    table = {n["ieee754"]: n["text"] for n in numbers}
    # RFC 8785 Appendix B, written out here as well: the file must keep them.
    assert table["0000000000000001"] == "5e-324"
    assert table["8000000000000000"] == "0"
    assert table["7fefffffffffffff"] == "1.7976931348623157e+308"
    assert table["4340000000000000"] == "9007199254740992"
    assert table["4430000000000000"] == "295147905179352830000"
    assert table["44b52d02c7e14af5"] == "9.999999999999997e+22"
    assert table["44b52d02c7e14af6"] == "1e+23"
    assert table["444b1ae4d6e2ef50"] == "1e+21"
    assert table["3eb0c6f7a0b5ed8c"] == "9.999999999999997e-7"
    assert table["3eb0c6f7a0b5ed8d"] == "0.000001"
    assert table["41b3de4355555554"] == "333333333.33333325"
    assert table["becbf647612f3696"] == "-0.0000033333333333333333"
    assert table["43143ff3c1cb0959"] == "1424953923781206.2"
    assert len(numbers) >= 40
    for n in numbers:
        x = double(n["ieee754"])
        assert format_number(x) == n["text"], n
        assert ref_number(x) == n["text"], n
        assert float(n["text"]) == x, n


def test_value_vectors_are_reproduced_byte_for_byte() -> None:
    for v in vectors()["values"]:
        value = json.loads(v["input"])
        expected = bytes.fromhex(v["utf8_hex"])
        assert expected.decode("utf-8") == v["canonical"], v["name"]
        assert canonical_json(value) == expected, v["name"]
        assert ref_canonical(value).encode("utf-8") == expected, v["name"]


_BLOCK = re.compile(r"^```(json[^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_messages() -> list[str]:
    text = DOC.read_text("utf-8")
    return [m.group(2).strip() for m in _BLOCK.finditer(text) if m.group(1).strip() == "json"]


def _decode(text: str) -> Any:
    is_reply = re.search(r'"type"\s*:\s*"(ack|status)"', text) is not None
    return (decode_reply if is_reply else decode_request)(text.encode())


def test_every_doc_example_message_is_a_vector_and_its_bytes_and_digest_agree() -> None:
    messages = vectors()["messages"]
    assert [m["input"] for m in messages] == doc_messages(), "wire-vectors.json is out of date"
    for m in messages:
        canonical = m["canonical"].encode("utf-8")
        assert _decode(m["input"]).encode() == canonical
        assert _decode(m["canonical"]).encode() == canonical  # integers where floats go, too
        assert ref_canonical(json.loads(m["input"])).encode("utf-8") == canonical
        assert hashlib.sha256(canonical).hexdigest() == m["sha256"]
        if '"command"' in m["input"]:
            assert decode_command(m["input"].encode()).digest == m["sha256"]


def test_one_line_doc_examples_are_the_exact_encoding() -> None:
    lines = [t for t in doc_messages() if "\n" not in t]
    assert len(lines) >= 7
    for text in lines:
        assert _decode(text).encode() == text.encode("utf-8"), text


def test_issuer_vectors() -> None:
    for case in vectors()["issuers"]:
        name = case["issuer"]
        assert len(name.encode("utf-8")) == case["utf8_bytes"]
        if case["valid"]:
            assert check_issuer_name(name) == name
        else:
            with pytest.raises(WireFormatError) as info:
                check_issuer_name(name)
            assert str(info.value) == case["reason"]


NODE_CHECK = r"""
const fs = require("fs"), crypto = require("crypto");
const v = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
const canon = (x) => x === null || typeof x !== "object" ? JSON.stringify(x)
  : Array.isArray(x) ? "[" + x.map(canon).join(",") + "]"
  : "{" + Object.keys(x).sort().map((k) => JSON.stringify(k) + ":" + canon(x[k])).join(",") + "}";
const bad = [];
let n = 0;
for (const c of v.numbers) {
  n++;
  const got = String(Buffer.from(c.ieee754, "hex").readDoubleBE(0));
  if (got !== c.text) bad.push(["number", c.ieee754, got]);
}
for (const c of v.values) {
  n++;
  const got = Buffer.from(canon(JSON.parse(c.input)), "utf8").toString("hex");
  if (got !== c.utf8_hex) bad.push(["value", c.name, got]);
}
for (const c of v.messages) {
  n++;
  const got = canon(JSON.parse(c.input));
  const sha = crypto.createHash("sha256").update(got, "utf8").digest("hex");
  if (got !== c.canonical || sha !== c.sha256) bad.push(["message", c.input, got]);
}
const name = /^[\p{L}\p{M}\p{N}\p{P}\p{S} ]+$/u;
for (const c of v.issuers) {
  n++;
  const ok = name.test(c.issuer) && Buffer.byteLength(c.issuer, "utf8") <= 64 && c.issuer !== "*";
  if (ok !== c.valid) bad.push(["issuer", c.issuer, ok]);
}
console.log(JSON.stringify({checked: n, bad}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_javascript_reproduces_every_vector() -> None:
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run(
        [node, "-e", NODE_CHECK, str(VECTORS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    v = vectors()
    assert result["bad"] == []
    assert result["checked"] == sum(len(v[k]) for k in ("numbers", "values", "messages", "issuers"))


# --------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-MAX_SEQ, MAX_SEQ)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=16,
)


def as_doubles(value: Any) -> Any:
    """JSON numbers are doubles: ``58823903160103420`` reads as an int in Python."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, list):
        return [as_doubles(v) for v in value]
    return {k: as_doubles(v) for k, v in value.items()}


@settings(max_examples=100)
@given(json_values)
def test_property_wire_encoder_equals_the_independent_one_and_round_trips(value: Any) -> None:
    data = canonical_json(value)
    assert data == ref_canonical(value).encode("utf-8")
    assert as_doubles(json.loads(data)) == as_doubles(value)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_property_numbers_are_the_shortest_that_read_back(x: float) -> None:
    text = format_number(x)
    assert text == ref_number(x)
    assert float(text) == x


def test_what_cannot_be_canonical_json_is_refused() -> None:
    for bad in (float("nan"), float("inf"), 2**53, -(2**53), {1: 2}, b"x", "\ud800"):
        with pytest.raises(WireFormatError):
            canonical_json(bad)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("issuer", "reason"),
    [
        ("a\tb", "U+0009 (category Cc) at byte 1 is not allowed"),
        ("a\u00a0b", "U+00A0 NO-BREAK SPACE (category Zs) at byte 1 is not allowed"),
        ("a\u00adb", "U+00AD SOFT HYPHEN (category Cf) at byte 1 is not allowed"),
        ("a\u200bb", "U+200B ZERO WIDTH SPACE (category Cf) at byte 1 is not allowed"),
        ("a\u2028b", "U+2028 LINE SEPARATOR (category Zl) at byte 1 is not allowed"),
        ("ab\ue000", "U+E000 (category Co) at byte 2 is not allowed"),
        ("\u00e9\u3000b", "U+3000 IDEOGRAPHIC SPACE (category Zs) at byte 2 is not allowed"),
        ("\N{GRINNING FACE}" * 64, "field 'issuer' is 256 UTF-8 bytes, at most 64"),
        ("x" * 65, "field 'issuer' is 65 UTF-8 bytes, at most 64"),
        ("", "field 'issuer' is empty"),
        ("*", "reserved"),
    ],
)
def test_issuer_refusals_name_the_character_its_category_and_the_byte_count(
    issuer: str, reason: str
) -> None:
    with pytest.raises(WireFormatError) as info:
        check_issuer_name(issuer)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "issuer", ["\N{GRINNING FACE}" * 16, "Zürich Süd", "e\u0301", "a b", "x" * 64, "東京/cycle"]
)
def test_issuers_of_letters_marks_numbers_punctuation_symbols_and_spaces(issuer: str) -> None:
    assert check_issuer_name(issuer) == issuer
    Command.create(
        issuer=issuer, seq=1, issued_at=0.0, valid_until=1.0, setpoints={"a.b": 1}, verdict="0" * 64
    )


def test_scenario_and_gateway_config_judge_issuers_by_the_same_rule() -> None:
    keys = {"client_secret_key": "c.secret", "gateway_public_key": "g.public"}
    assert ZmqSecurity(**keys, issuer="\N{GRINNING FACE}" * 16).issuer is not None
    for bad, reason in (("a\u00a0b", "NO-BREAK SPACE"), ("\N{GRINNING FACE}" * 17, "68 UTF-8")):
        with pytest.raises((ValidationError, ScenarioError), match=reason):
            ZmqSecurity(**keys, issuer=bad)
        with pytest.raises(ValidationError, match=reason):
            ClientEntry(name="runtime", issuer=bad, public_key="k" * 40)
        with pytest.raises(ValidationError, match=reason):
            ClientEntry(name=bad, public_key="k" * 40)
    with pytest.raises(ValidationError, match="reserved"):
        ClientEntry(name="runtime", issuer="*", public_key="k" * 40)


# --------------------------------------------------------------------------- details, digests

T0 = 1768179600.0
VERDICT = "8fae8175865026787d2687b93652945ac2d1129e79ee4b128c3baaada4c9c41b"
LIMITS = {
    "plant.T_supply_set": InputLimit("plant.T_supply_set", 50.0, 95.0, 10.0),
    "apartment.m_flow": InputLimit("apartment.m_flow", 0.02, 2.0),
}


def cmd(seq: int, setpoints: dict[str, float], at: float = T0) -> Command:
    return Command.create(
        issuer="cycle", seq=seq, issued_at=at, valid_until=at + 900, setpoints=setpoints,
        verdict=VERDICT,
    )  # fmt: skip


def test_refusal_details_print_the_digits_that_show_why() -> None:
    core = GatewayCore(LIMITS)
    d = core.decide(cmd(1, {"apartment.m_flow": 2.000002}), T0)
    assert (d.code, d.detail) == (
        RefusalCode.OUT_OF_BOUNDS,
        "apartment.m_flow = 2.000002 outside [0.02, 2]",
    )
    first = cmd(1, {"plant.T_supply_set": 72.5})
    core.record_applied(first, T0)
    d = core.decide(cmd(2, {"plant.T_supply_set": 85.0}, T0 + 900), T0 + 900)
    assert d.code is RefusalCode.RATE_LIMIT
    assert d.detail == (
        "plant.T_supply_set moves +12.5 from 72.5 in 900 s since its last write; "
        "at most 2.6666666666666665 allowed (10/h)"
    )
    d = core.decide(cmd(2, {"apartment.m_flow": 0.3}, T0 + 5.0004), T0)
    assert d.code is RefusalCode.BAD_TIME and d.detail == (
        "issued_at 1768179605.0004 is 5.000400066375732 s ahead of gateway time 1768179600 "
        "(skew allowance 5 s)"
    )
    why = Grant("limited", ranges={"plant.T_supply_set": (60.0, 80.0)}).check(
        {"plant.T_supply_set": 80.0000001}
    )
    assert why is not None and "plant.T_supply_set = 80.0000001 is outside [60, 80]" in why


def test_a_digest_stored_before_the_canonical_encoding_still_marks_a_resend_duplicate() -> None:
    c = cmd(1, {"plant.T_supply_set": 72.0})
    assert c.legacy_digest != c.digest  # 1768179600.0 and 72.0 were written the Python way
    core = GatewayCore(LIMITS)
    core.record_applied(c, T0)
    core.state.digests[c.id] = c.legacy_digest  # as loaded from an older store
    assert core.decide(c, T0 + 1).outcome.value == "duplicate"
    other = Command(c.id, "cycle", 1, T0, T0 + 900, {"plant.T_supply_set": 73.0}, VERDICT)
    assert core.decide(other, T0 + 1).code is RefusalCode.ID_CONFLICT


def test_a_long_detail_is_cut_in_utf8_bytes_at_a_character_boundary() -> None:
    cut = truncate_detail("é" * 1000)  # 2000 bytes
    data = cut.encode("utf-8")
    assert len(data) <= MAX_DETAIL_BYTES and cut.endswith("...") and cut.startswith("é")
    assert truncate_detail("x" * 1024) == "x" * 1024


def test_decode_refusals_print_the_digits_that_show_why() -> None:
    too_long = json.dumps(
        {"v": 1, "type": "command", "id": "0" * 32, "issuer": "c", "seq": 1, "issued_at": 0.5,
         "valid_until": 86400.5000001, "setpoints": {"a.b": 1}, "verdict": VERDICT}
    )  # fmt: skip
    with pytest.raises(
        WireFormatError, match=r"86400.0000001 s after issued_at; .* at most 86400 s"
    ):
        decode_command(too_long.encode())
