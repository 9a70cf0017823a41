"""The wire protocol: round trips, precise refusals, fuzzing, and the documented examples."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parallelcity.dispatch.wire import (
    COMMAND_FIELDS,
    HEARTBEAT_FIELDS,
    MAX_MESSAGE_BYTES,
    MAX_SEQ,
    MAX_TIME,
    MAX_VALIDITY_S,
    NULL_ID,
    OTHER_ISSUER,
    REARM_FIELDS,
    STATUS_FIELDS,
    Ack,
    AckStatus,
    Command,
    Heartbeat,
    Rearm,
    RefusalCode,
    Status,
    WatchdogState,
    decode_ack,
    decode_command,
    decode_heartbeat,
    decode_rearm,
    decode_reply,
    decode_request,
    decode_status,
    recover_id,
)
from parallelcity.errors import WireFormatError

DECODERS = (
    decode_command,
    decode_ack,
    decode_heartbeat,
    decode_rearm,
    decode_status,
    decode_request,
    decode_reply,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire-protocol.md"
VERDICT = "8fae8175865026787d2687b93652945ac2d1129e79ee4b128c3baaada4c9c41b"
ID = "913458a89c3a437caf2a60e1d9b508ba"


def command_json(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "v": 1,
        "type": "command",
        "id": ID,
        "issuer": "district-heating/cycle",
        "seq": 7,
        "issued_at": 1768179600.0,
        "valid_until": 1768180500.0,
        "setpoints": {"plant.T_supply_set": 72.5, "apartment.m_flow": 0.35},
        "verdict": VERDICT,
    }
    obj.update(changes)
    return obj


def ack_json(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "v": 1,
        "type": "ack",
        "id": ID,
        "seq": 7,
        "status": "applied",
        "code": "",
        "detail": "",
        "applied_at": 1768179611.25,
        "insecure_lab": True,
    }
    obj.update(changes)
    return obj


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --------------------------------------------------------------------------- round trips


def test_command_round_trip_and_deterministic_encoding() -> None:
    cmd = Command.create(
        issuer="district-heating/cycle",
        seq=3,
        issued_at=1768179600,
        valid_until=1768180500.5,
        setpoints={"plant.T_supply_set": 72, "apartment.m_flow": 0.35},
        verdict=VERDICT,
    )
    assert re.fullmatch(r"[0-9a-f]{32}", cmd.id)
    assert isinstance(cmd.issued_at, float) and cmd.setpoints["plant.T_supply_set"] == 72.0
    data = cmd.encode()
    assert decode_command(data) == cmd
    assert decode_command(data).encode() == data
    # Sorted keys, compact separators, no whitespace.
    assert data.startswith(b'{"id":') and b" " not in data
    assert list(json.loads(data)) == sorted(COMMAND_FIELDS)


@pytest.mark.parametrize(
    "ack",
    [
        Ack(ID, 7, AckStatus.APPLIED, applied_at=12.5, insecure_lab=True),
        Ack(ID, 7, AckStatus.DUPLICATE, None, "already applied", 12.5, True),
        Ack(ID, 0, AckStatus.REFUSED, RefusalCode.RATE_LIMIT, "too fast", None, False),
        Ack(NULL_ID, 0, AckStatus.REFUSED, RefusalCode.MALFORMED, "not JSON"),
    ],
)
def test_ack_round_trip(ack: Ack) -> None:
    data = ack.encode()
    assert decode_ack(data) == ack
    assert decode_ack(data).encode() == data
    assert json.loads(data)["code"] == ("" if ack.code is None else ack.code.value)
    assert ack.applied is (ack.status is not AckStatus.REFUSED)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"", "not JSON"),
        (b"[1, 2]", "not a JSON object: got a JSON array"),
        (b'"command"', "not a JSON object: got a JSON string"),
        (b"[" * 100_00 + b"]" * 100_00, "nested too deeply"),
        (b" " * (MAX_MESSAGE_BYTES + 1), "limit is 65536"),
        (raw({k: v for k, v in command_json().items() if k != "v"}), "missing field 'v'"),
        (raw(command_json(v=2)), "unsupported protocol version 2"),
        (raw(command_json(v=True)), "unsupported protocol version True"),
        (raw(command_json(v="1")), "unsupported protocol version '1'"),
        (raw(command_json(type="ack")), "field 'type': expected 'command', got 'ack'"),
        (raw({k: v for k, v in command_json().items() if k != "type"}), "missing field 'type'"),
        (raw({k: v for k, v in command_json().items() if k != "verdict"}), "'verdict'"),
        (raw(command_json(extra=1)), "unknown field(s): 'extra'"),
        (raw(command_json(id="ABCDEF" * 5 + "00")), "field 'id'"),
        (raw(command_json(id=ID + "\n")), "field 'id'"),
        (raw(command_json(issuer="")), "field 'issuer' is empty; a name is 1..64 UTF-8 bytes"),
        (raw(command_json(issuer="x" * 65)), "field 'issuer' is 65 UTF-8 bytes, at most 64"),
        (raw(command_json(issuer="a\nb")), "U+000A (category Cc) at byte 1 is not allowed"),
        (raw(command_json(seq=-1)), "field 'seq'"),
        (raw(command_json(seq=1.5)), "field 'seq'"),
        (raw(command_json(seq=float(MAX_SEQ + 1))), "expected an integer in 0..2**53-1"),
        (raw(command_json(v=1.5)), "unsupported protocol version 1.5"),
        (raw(command_json(v=2.0)), "unsupported protocol version 2"),
        (raw(command_json(seq=False)), "field 'seq'"),
        (raw(command_json(seq=2**63)), "field 'seq'"),
        (raw(command_json(seq=MAX_SEQ + 1)), "expected an integer in 0..2**53-1"),
        (raw(command_json(issuer="*")), "reserved"),
        (raw(command_json(issuer="a\ud800b")), "field 'issuer': lone surrogate U+D800"),
        (raw(command_json(setpoints={"x\udfff": 1.0})), "input name): lone surrogate U+DFFF"),
        (raw(command_json(valid_until=1e300)), "'valid_until': expected seconds since the epoch"),
        (raw(command_json(issued_at=-1.0)), "'issued_at': expected seconds since the epoch"),
        (raw(command_json(issued_at=0.0)), "a command is valid for at most 86400 s"),
        (raw(command_json(issued_at="1768179600")), "field 'issued_at': expected a number"),
        (raw(command_json(issued_at=None)), "field 'issued_at': expected a number"),
        (raw(command_json(valid_until=1768179600.0)), "is not after issued_at"),
        (raw(command_json(setpoints={})), "expected 1..256 entries"),
        (raw(command_json(setpoints=[["a", 1.0]])), "field 'setpoints': expected an object"),
        (raw(command_json(setpoints={f"u{i}": 1.0 for i in range(257)})), "1..256 entries"),
        (raw(command_json(setpoints={"a": True})), "setpoints.a"),
        (raw(command_json(setpoints={"": 1.0})), "(input name) is empty"),
        (raw(command_json(verdict=VERDICT[:-1])), "field 'verdict'"),
        (raw(command_json(verdict=VERDICT.upper())), "field 'verdict'"),
        (
            raw(command_json()).replace(b"72.5", b"NaN"),
            "NaN is not a JSON number",
        ),
        (
            raw(command_json()).replace(b"72.5", b"-Infinity"),
            "-Infinity is not a JSON number",
        ),
        (raw(command_json()).replace(b"72.5", b"1e400"), "expected a finite number"),
        (raw(command_json(seq=7)).replace(b'"seq": 7', b'"seq": 7, "seq": 8'), "duplicate key"),
        (raw(command_json(issued_at=10**400)), "out of range"),
    ],
)
def test_decode_command_refuses_with_a_precise_reason(data: bytes, reason: str) -> None:
    with pytest.raises(WireFormatError) as info:
        decode_command(data)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (ack_json(status="done"), "field 'status'"),
        (ack_json(status="refused"), "needs a refusal code"),
        (ack_json(status="refused", code="expired"), "applied_at null"),
        (ack_json(code="expired"), "must have an empty code"),
        (ack_json(code="late"), "field 'code'"),
        (ack_json(applied_at=None), "needs applied_at"),
        (ack_json(insecure_lab=1), "field 'insecure_lab'"),
        (ack_json(detail=None), "field 'detail'"),
        (ack_json(detail="x" * 1025), "field 'detail'"),
        (ack_json(type="command"), "expected 'ack'"),
        (ack_json(setpoints={}), "unknown field(s): 'setpoints'"),
    ],
)
def test_decode_ack_refuses_with_a_precise_reason(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(WireFormatError) as info:
        decode_ack(raw(obj))
    assert reason in str(info.value)


def test_constructing_or_encoding_an_invalid_message_fails_early() -> None:
    with pytest.raises(WireFormatError, match="finite"):
        Command(ID, "cycle", 0, 0.0, 1.0, {"a": float("nan")}, VERDICT)
    # Names are bounded in UTF-8 bytes, so the largest valid command fits in one message.
    wide = "\N{GRINNING FACE}" * 31  # 4 UTF-8 bytes each: 124
    big = {f"{wide}a{i:03d}": -1.7976931348623157e308 for i in range(256)}
    assert len(Command(ID, "c" * 64, MAX_SEQ, 0.0, 1.0, big, VERDICT).encode()) < MAX_MESSAGE_BYTES
    with pytest.raises(WireFormatError, match="403 UTF-8 bytes, at most 128"):
        Command(ID, "cycle", 0, 0.0, 1.0, {"\N{GRINNING FACE}" * 100 + "abc": 1.0}, VERDICT)
    with pytest.raises(WireFormatError, match="refusal code"):
        Ack(ID, 0, AckStatus.REFUSED)


def test_integer_fields_are_read_by_value_in_any_spelling() -> None:
    # The page: decoders accept `1.0` or `1` or `1e0`. A JavaScript end cannot tell them
    # apart (JSON.parse), and a command's digest is that of its canonical encoding, which
    # writes all three as `1`: so `v`, `seq` and `last_seq` are read by their value.
    canonical = decode_command(raw(command_json()))
    for v, seq in (("1.0", "7.0"), ("1e0", "7E0"), ("10e-1", "0.7e1")):
        spelled = (
            raw(command_json())
            .replace(b'"v": 1,', b'"v": ' + v.encode() + b",")
            .replace(b'"seq": 7,', b'"seq": ' + seq.encode() + b",")
        )
        assert spelled != raw(command_json())
        cmd = decode_command(spelled)
        assert cmd == canonical and type(cmd.seq) is int
        assert cmd.digest == canonical.digest and cmd.encode() == canonical.encode()
        assert type(decode_request(spelled).seq) is int  # type: ignore[union-attr]
        assert recover_id(spelled.replace(b'"verdict"', b'"verdict_"')) == (ID, 7)
    ack = Ack(ID, 7, AckStatus.APPLIED, applied_at=1768179611.25)
    spelled_ack = ack.encode().replace(b'"seq":7', b'"seq":7.0').replace(b'"v":1', b'"v":1.0')
    assert decode_ack(spelled_ack) == ack and type(decode_ack(spelled_ack).seq) is int
    status = Status(ID, "cycle", 42, WatchdogState.ARMED, "", {}, 1768179700.5, 1.0)
    spelled_status = status.encode().replace(b'"last_seq":42', b'"last_seq":4.2e1')
    assert decode_status(spelled_status) == status
    assert type(decode_status(spelled_status).last_seq) is int
    assert decode_reply(spelled_status) == status


def test_recover_id() -> None:
    assert recover_id(raw(command_json(verdict=None))) == (ID, 7)
    assert recover_id(raw(command_json(seq=-3))) == (ID, 0)
    assert recover_id(b"\xff") == (NULL_ID, 0)
    assert recover_id(raw({"id": "nope", "seq": 1})) == (NULL_ID, 0)
    assert recover_id(b"[]") == (NULL_ID, 0)


# --------------------------------------------------------------------------- properties

HEX = "0123456789abcdef"
finite = st.floats(allow_nan=False, allow_infinity=False)
name_chars = st.characters(categories=["L", "M", "N", "P", "S"]) | st.just(" ")


def names(max_bytes: int) -> st.SearchStrategy[str]:
    """Valid names: letters, marks, numbers, punctuation, symbols, space; bytes bounded."""
    return st.text(name_chars, min_size=1, max_size=max_bytes // 2).filter(
        lambda s: len(s.encode()) <= max_bytes
    )


issuers = names(64).filter(lambda s: s != "*")


@st.composite
def commands(draw: st.DrawFn) -> Command:
    issued = draw(st.floats(min_value=0.0, max_value=MAX_TIME - MAX_VALIDITY_S))
    until = issued + draw(st.floats(min_value=1e-3, max_value=MAX_VALIDITY_S))
    return Command(
        id=draw(st.text(HEX, min_size=32, max_size=32)),
        issuer=draw(issuers),
        seq=draw(st.integers(0, MAX_SEQ)),
        issued_at=issued,
        valid_until=until,
        setpoints=draw(st.dictionaries(names(128), finite, min_size=1, max_size=40)),
        verdict=draw(st.text(HEX, min_size=64, max_size=64)),
    )


@pytest.mark.slow
@given(commands())
def test_property_command_round_trip(cmd: Command) -> None:
    data = cmd.encode()
    back = decode_command(data)
    assert back == cmd
    assert back.encode() == data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


def _only_wire_errors(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(WireFormatError):  # anything else fails the test
            decode(data)


@given(st.binary(max_size=2048))
def test_property_arbitrary_bytes_only_raise_wire_format_error(data: bytes) -> None:
    _only_wire_errors(data)


@pytest.mark.slow
@given(json_values)
def test_property_arbitrary_json_only_raises_wire_format_error(value: Any) -> None:
    _only_wire_errors(json.dumps(value).encode())


@pytest.mark.slow
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(
        [
            command_json(),
            ack_json(),
            ack_json(status="duplicate"),
            Heartbeat(ID, "cycle", 12.5).to_json(),
            Rearm(ID, "operator", "plant inspected").to_json(),
            Status(ID, "cycle", 7, WatchdogState.ARMED, "", {"plant": "cycle"}, 1.0).to_json(),
        ]
    ),
    key=st.sampled_from(
        sorted(
            COMMAND_FIELDS
            | HEARTBEAT_FIELDS
            | REARM_FIELDS
            | STATUS_FIELDS
            | {"status", "code", "detail", "extra"}
        )
    ),
    action=st.sampled_from(["replace", "delete"]),
    value=json_values,
)
def test_property_mutated_messages_decode_or_raise_wire_format_error(
    base: dict[str, Any], key: str, action: str, value: Any
) -> None:
    obj = dict(base)
    if action == "delete":
        obj.pop(key, None)
    else:
        obj[key] = value
    _only_wire_errors(json.dumps(obj).encode())


# --------------------------------------------------------------------------- the documentation

_BLOCK = re.compile(r"^```(json[^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def doc_blocks() -> list[tuple[str, str]]:
    return [(m.group(1).strip(), m.group(2)) for m in _BLOCK.finditer(DOC.read_text("utf-8"))]


def _decoder(text: str) -> Any:
    is_reply = re.search(r'"type"\s*:\s*"(ack|status)"', text) is not None
    return decode_reply if is_reply else decode_request


def test_doc_examples_decode_or_are_refused() -> None:
    blocks = doc_blocks()
    valid = [t for info, t in blocks if info == "json"]
    invalid = [t for info, t in blocks if info == "json invalid"]
    assert len(valid) >= 4 and len(invalid) >= 4
    assert len(valid) + len(invalid) == len(blocks), "unknown info string on a json block"
    for text in valid:
        msg = _decoder(text)(text.encode())
        assert _decoder(text)(msg.encode()) == msg
    for text in invalid:
        with pytest.raises(WireFormatError):
            _decoder(text)(text.encode())


def test_doc_names_every_field_status_and_code() -> None:
    doc = DOC.read_text("utf-8")
    for name in sorted(COMMAND_FIELDS | HEARTBEAT_FIELDS | REARM_FIELDS | STATUS_FIELDS) + list(
        ack_json()
    ):
        assert f"| `{name}` |" in doc, name
    for state in WatchdogState:
        assert f"`{state.value}`" in doc
    for status in AckStatus:
        assert f"`{status.value}`" in doc
    for code in RefusalCode:
        assert f"| `{code.value}` |" in doc


# --------------------------------------------------------------------------- heartbeats, status

times = st.floats(min_value=0.0, max_value=MAX_TIME)


@st.composite
def statuses(draw: st.DrawFn) -> Status:
    return Status(
        id=draw(st.text(HEX, min_size=32, max_size=32)),
        issuer=draw(issuers),
        last_seq=draw(st.none() | st.integers(0, MAX_SEQ)),
        watchdog=draw(st.sampled_from(list(WatchdogState))),
        detail=draw(st.text(max_size=200)),
        leases=draw(st.dictionaries(names(40), issuers | st.just(OTHER_ISSUER), max_size=8)),
        gateway_time=draw(times),
        heartbeat_s=draw(st.floats(min_value=0, max_value=1e6)),
        insecure_lab=draw(st.booleans()),
    )


@given(
    st.one_of(
        commands(),
        st.builds(Heartbeat, st.text(HEX, min_size=32, max_size=32), issuers, times, st.booleans()),
        st.builds(
            Rearm,
            st.text(HEX, min_size=32, max_size=32),
            issuers,
            st.text(min_size=1, max_size=256),
        ),
    )
)
def test_property_request_round_trip(msg: Command | Heartbeat | Rearm) -> None:
    data = msg.encode()
    back = decode_request(data)
    assert back == msg and back.encode() == data


@pytest.mark.slow
@given(statuses())
def test_property_status_round_trip(status: Status) -> None:
    data = status.encode()
    back = decode_reply(data)
    assert back == status and decode_status(data) == status and back.encode() == data


@pytest.mark.parametrize(
    ("data", "decode", "reason"),
    [
        (raw(Heartbeat(ID, "c", 1.0).to_json() | {"release": 1}), decode_heartbeat, "release"),
        (raw(Heartbeat(ID, "c", 1.0).to_json() | {"sent_at": "x"}), decode_heartbeat, "sent_at"),
        (raw(Rearm(ID, "c", "r").to_json() | {"reason": ""}), decode_rearm, "'reason'"),
        (
            raw(Rearm(ID, "c", "r").to_json() | {"reason": "ok \ud800"}),
            decode_rearm,
            "field 'reason': lone surrogate U+D800 at character 3",
        ),
        (
            raw(Heartbeat(ID, "c", 1.0).to_json() | {"sent_at": 1e300}),
            decode_heartbeat,
            "'sent_at': expected seconds since the epoch",
        ),
        (
            raw(ack_json(status="refused", code="malformed", applied_at=None, detail="\udc00")),
            decode_ack,
            "field 'detail': lone surrogate",
        ),
        (raw(Rearm(ID, "c", "r").to_json() | {"reason": "x" * 257}), decode_rearm, "'reason'"),
        (raw(command_json(type="status")), decode_request, "expected 'command' or 'heartbeat'"),
        (raw(ack_json(type="heartbeat")), decode_reply, "expected 'ack' or 'status'"),
        (
            raw(Status(ID, "c", None, WatchdogState.IDLE).to_json() | {"watchdog": "asleep"}),
            decode_status,
            "field 'watchdog'",
        ),
        (
            raw(Status(ID, "c", None, WatchdogState.IDLE).to_json() | {"last_seq": -1}),
            decode_status,
            "field 'seq'",
        ),
        (
            raw(Status(ID, "c", None, WatchdogState.IDLE).to_json() | {"heartbeat_s": -1}),
            decode_status,
            "'heartbeat_s'",
        ),
        (
            raw(Status(ID, "c", None, WatchdogState.IDLE).to_json() | {"leases": {"p": 1}}),
            decode_status,
            "'issuer'",
        ),
        (
            raw(
                Status(ID, "c", None, WatchdogState.IDLE).to_json()
                | {"leases": {f"e{i}": "c" for i in range(257)}}
            ),
            decode_status,
            "at most 256",
        ),
    ],
)
def test_heartbeat_rearm_status_refusals(data: bytes, decode: Any, reason: str) -> None:
    with pytest.raises(WireFormatError) as info:
        decode(data)
    assert reason in str(info.value)


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=MAX_MESSAGE_BYTES + 10).map(lambda b: b * 3))
def test_property_large_inputs_are_bounded(data: bytes) -> None:
    """Oversized input is refused by size before parsing: no unbounded work or memory."""
    _only_wire_errors(data)


def test_a_command_digest_is_its_payload_whatever_its_bytes() -> None:
    cmd = decode_command(raw(command_json()))
    spaced = json.dumps(command_json(), indent=2).encode()  # other bytes, the same payload
    assert decode_command(spaced).digest == cmd.digest and len(cmd.digest) == 64
    for change in ({"seq": 8}, {"verdict": "00" * 32}, {"valid_until": 1768180501.0}):
        assert decode_command(raw(command_json(**change))).digest != cmd.digest
