"""The dispatcher <-> field gateway wire protocol, version 1 (pure: no I/O).

One ZeroMQ frame per message, UTF-8 JSON, one object per frame.  Nothing on
the wire is ever unpickled or evaluated: ``decode_command`` and ``decode_ack``
accept exactly the documented fields with exactly the documented types and
raise ``WireFormatError`` with a precise reason for anything else.  Encoding
is deterministic (sorted keys, compact separators), so the same message
always has the same bytes.  The full description, with examples the tests
check, is ``docs/wire-protocol.md``.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NoReturn

from .errors import WireFormatError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
MAX_SETPOINTS = 256
MAX_ISSUER_CHARS = 64
MAX_INPUT_NAME_CHARS = 128
MAX_DETAIL_CHARS = 1024
MAX_SEQ = 2**63 - 1
NULL_ID = "0" * 32
"""The id of a refusal whose command id could not be recovered from the bytes received."""

_ID = re.compile(r"[0-9a-f]{32}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class AckStatus(StrEnum):
    APPLIED = "applied"
    """The setpoints were written to the field."""
    REFUSED = "refused"
    """Nothing was written; ``code`` says why."""
    DUPLICATE = "duplicate"
    """This id was applied before (at ``applied_at``); it was not written again."""


class RefusalCode(StrEnum):
    EXPIRED = "expired"
    OUT_OF_BOUNDS = "out_of_bounds"
    RATE_LIMIT = "rate_limit"
    UNKNOWN_INPUT = "unknown_input"
    MALFORMED = "malformed"
    WRITE_FAILED = "write_failed"
    STALE_SEQUENCE = "stale_sequence"


COMMAND_FIELDS = frozenset(
    {"v", "type", "id", "issuer", "seq", "issued_at", "valid_until", "setpoints", "verdict"}
)
ACK_FIELDS = frozenset(
    {"v", "type", "id", "seq", "status", "code", "detail", "applied_at", "insecure_lab"}
)


def new_command_id() -> str:
    """A fresh command id: 32 lowercase hex characters (a random UUID)."""
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- checks


def _bad(reason: str) -> NoReturn:
    raise WireFormatError(reason)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_id(value: Any, name: str = "id") -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        _bad(f"field {name!r}: expected 32 lowercase hex characters, got {_show(value)}")
    return value


def _check_seq(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        _bad(f"field 'seq': expected an integer in 0..2**63-1, got {_show(value)}")
    return value


def _check_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        _bad(f"field {name}: expected a number, got {type(value).__name__} {_show(value)}")
    try:
        out = float(value)
    except OverflowError:
        _bad(f"field {name}: number out of range")
    if not math.isfinite(out):
        _bad(f"field {name}: expected a finite number, got {out!r}")
    return out


def _check_text(value: Any, name: str, lo: int, hi: int) -> str:
    if not isinstance(value, str):
        _bad(f"field {name}: expected a string, got {type(value).__name__}")
    if not lo <= len(value) <= hi:
        _bad(f"field {name}: expected {lo}..{hi} characters, got {len(value)}")
    return value


def _check_setpoints(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        _bad(f"field 'setpoints': expected an object, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_SETPOINTS:
        _bad(f"field 'setpoints': expected 1..{MAX_SETPOINTS} entries, got {len(value)}")
    out: dict[str, float] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_INPUT_NAME_CHARS:
            _bad(
                f"field 'setpoints': input names must be strings of 1..{MAX_INPUT_NAME_CHARS} "
                f"characters, got {_show(name)}"
            )
        out[name] = _check_float(v, f"'setpoints.{name}'")
    return out


def _check_command(cmd: Command) -> None:
    _check_id(cmd.id)
    issuer = _check_text(cmd.issuer, "'issuer'", 1, MAX_ISSUER_CHARS)
    if not issuer.isprintable():
        _bad(f"field 'issuer': control characters are not allowed, got {_show(issuer)}")
    _check_seq(cmd.seq)
    issued = _check_float(cmd.issued_at, "'issued_at'")
    until = _check_float(cmd.valid_until, "'valid_until'")
    if not until > issued:
        _bad(f"field 'valid_until': {until!r} is not after issued_at {issued!r}")
    if not isinstance(cmd.verdict, str) or not _DIGEST.fullmatch(cmd.verdict):
        _bad(f"field 'verdict': expected 64 lowercase hex characters, got {_show(cmd.verdict)}")


def _check_ack(ack: Ack) -> None:
    _check_id(ack.id)
    _check_seq(ack.seq)
    if not isinstance(ack.status, AckStatus):
        _bad(f"field 'status': expected one of {[s.value for s in AckStatus]}")
    if ack.code is not None and not isinstance(ack.code, RefusalCode):
        _bad(f"field 'code': expected one of {[c.value for c in RefusalCode]} or ''")
    _check_text(ack.detail, "'detail'", 0, MAX_DETAIL_CHARS)
    if ack.applied_at is not None:
        _check_float(ack.applied_at, "'applied_at'")
    if not isinstance(ack.insecure_lab, bool):
        _bad(f"field 'insecure_lab': expected true or false, got {_show(ack.insecure_lab)}")
    if ack.status is AckStatus.REFUSED:
        if ack.code is None:
            _bad("a refused ack needs a refusal code")
        if ack.applied_at is not None:
            _bad("a refused ack must have applied_at null")
    else:
        if ack.code is not None:
            _bad(f"an ack with status {ack.status.value!r} must have an empty code")
        if ack.applied_at is None:
            _bad(f"an ack with status {ack.status.value!r} needs applied_at")


# --------------------------------------------------------------------------- messages


def _dumps(obj: dict[str, Any]) -> bytes:
    data = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        _bad(f"message is {len(data)} bytes, the limit is {MAX_MESSAGE_BYTES}")
    return data


@dataclass(frozen=True)
class Command:
    """Setpoints for the field, approved by a verdict, valid for a while.

    Constructing a ``Command`` validates it (``WireFormatError`` on any field
    outside the protocol), so an invalid command can never be sent.
    """

    id: str
    issuer: str
    seq: int
    issued_at: float
    """The control-cycle time (simulated seconds) the setpoints were computed for."""
    valid_until: float
    setpoints: Mapping[str, float] = field(hash=False)
    verdict: str
    """sha256 hex digest of the verdict that approved these setpoints."""

    def __post_init__(self) -> None:
        _check_command(self)
        # Normalise: numbers become floats; the mapping becomes our own copy.
        object.__setattr__(self, "issued_at", float(self.issued_at))
        object.__setattr__(self, "valid_until", float(self.valid_until))
        object.__setattr__(self, "setpoints", _check_setpoints(self.setpoints))

    @classmethod
    def create(
        cls,
        *,
        issuer: str,
        seq: int,
        issued_at: float,
        valid_until: float,
        setpoints: Mapping[str, float],
        verdict: str,
    ) -> Command:
        """A command with a fresh random id."""
        return cls(new_command_id(), issuer, seq, issued_at, valid_until, setpoints, verdict)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": "command",
            "id": self.id,
            "issuer": self.issuer,
            "seq": self.seq,
            "issued_at": self.issued_at,
            "valid_until": self.valid_until,
            "setpoints": dict(self.setpoints),
            "verdict": self.verdict,
        }

    def encode(self) -> bytes:
        return _dumps(self.to_json())


@dataclass(frozen=True)
class Ack:
    """The gateway's answer to one command (also to bytes it could not read)."""

    id: str
    seq: int
    status: AckStatus
    code: RefusalCode | None = None
    """Why a command was refused; ``None`` (``""`` on the wire) unless status is refused."""
    detail: str = ""
    applied_at: float | None = None
    """Gateway time the setpoints were written (for a duplicate: the first time)."""
    insecure_lab: bool = False
    """True when the gateway runs without transport security."""

    def __post_init__(self) -> None:
        _check_ack(self)
        if self.applied_at is not None:
            object.__setattr__(self, "applied_at", float(self.applied_at))

    @property
    def applied(self) -> bool:
        """The setpoints are in the field (now or from an earlier delivery of the same id)."""
        return self.status is not AckStatus.REFUSED

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": "ack",
            "id": self.id,
            "seq": self.seq,
            "status": self.status.value,
            "code": "" if self.code is None else self.code.value,
            "detail": self.detail,
            "applied_at": self.applied_at,
            "insecure_lab": self.insecure_lab,
        }

    def encode(self) -> bytes:
        return _dumps(self.to_json())


# --------------------------------------------------------------------------- decoding


def _reject_constant(name: str) -> NoReturn:
    _bad(f"not JSON: {name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            _bad(f"duplicate key {_show(key)} in a JSON object")
        out[key] = value
    return out


def _parse(data: bytes, kind: str) -> dict[str, Any]:
    """Bytes -> the JSON object of one message of type ``kind``, version and fields checked."""
    if not isinstance(data, bytes | bytearray | memoryview):
        _bad(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        _bad(f"message is {len(data)} bytes, the limit is {MAX_MESSAGE_BYTES}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"not UTF-8: {exc.reason} at byte {exc.start}") from exc
    try:
        obj = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise WireFormatError(
            f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise WireFormatError("not JSON this end accepts: nested too deeply") from exc
    except ValueError as exc:  # e.g. an integer literal with too many digits
        raise WireFormatError(f"not JSON this end accepts: {exc}") from exc
    if not isinstance(obj, dict):
        _bad(f"not a JSON object: got a JSON {_json_kind(obj)}")
    if "v" not in obj:
        _bad("missing field 'v' (protocol version)")
    v = obj["v"]
    if isinstance(v, bool) or not isinstance(v, int) or v != PROTOCOL_VERSION:
        _bad(f"unsupported protocol version {_show(v)}: this end speaks v={PROTOCOL_VERSION}")
    if "type" not in obj:
        _bad("missing field 'type'")
    if obj["type"] != kind:
        _bad(f"field 'type': expected {kind!r}, got {_show(obj['type'])}")
    expected = COMMAND_FIELDS if kind == "command" else ACK_FIELDS
    extra = sorted(set(obj) - expected)
    if extra:
        _bad(f"unknown field(s): {', '.join(map(repr, extra))}")
    missing = sorted(expected - set(obj))
    if missing:
        _bad(f"missing field(s): {', '.join(map(repr, missing))}")
    return obj


def _json_kind(obj: Any) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, int | float):
        return "number"
    if isinstance(obj, str):
        return "string"
    return "array"


def decode_command(data: bytes) -> Command:
    """One wire frame -> ``Command``; ``WireFormatError`` saying exactly what is wrong."""
    obj = _parse(data, "command")
    return Command(  # the constructor checks every field
        id=obj["id"],
        issuer=obj["issuer"],
        seq=obj["seq"],
        issued_at=obj["issued_at"],
        valid_until=obj["valid_until"],
        setpoints=obj["setpoints"],
        verdict=obj["verdict"],
    )


def decode_ack(data: bytes) -> Ack:
    """One wire frame -> ``Ack``; ``WireFormatError`` saying exactly what is wrong."""
    obj = _parse(data, "ack")
    status_raw = obj["status"]
    try:
        status = AckStatus(status_raw)
    except (ValueError, TypeError):
        _bad(
            f"field 'status': expected one of {[s.value for s in AckStatus]}, "
            f"got {_show(status_raw)}"
        )
    code_raw = obj["code"]
    code: RefusalCode | None
    if code_raw == "":
        code = None
    else:
        try:
            code = RefusalCode(code_raw)
        except (ValueError, TypeError):
            _bad(
                f"field 'code': expected '' or one of {[c.value for c in RefusalCode]}, "
                f"got {_show(code_raw)}"
            )
    return Ack(  # the constructor checks every field
        id=obj["id"],
        seq=obj["seq"],
        status=status,
        code=code,
        detail=obj["detail"],
        applied_at=obj["applied_at"],
        insecure_lab=obj["insecure_lab"],
    )


def recover_id(data: bytes) -> tuple[str, int]:
    """Best effort: the id and seq of a message that failed to decode; never raises.

    Returns ``(NULL_ID, 0)`` when the bytes do not carry a well-formed id, so
    a refusal can always be sent back.
    """
    try:
        if len(data) > MAX_MESSAGE_BYTES:
            return NULL_ID, 0
        obj = json.loads(bytes(data).decode("utf-8"))
    except Exception:  # anything unreadable: there is no id to recover
        return NULL_ID, 0
    if not isinstance(obj, dict):
        return NULL_ID, 0
    msg_id = obj.get("id")
    if not isinstance(msg_id, str) or not _ID.fullmatch(msg_id):
        return NULL_ID, 0
    seq = obj.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        seq = 0
    return msg_id, seq


def truncate_detail(text: str) -> str:
    """``text`` cut to fit an ack's ``detail`` field."""
    if len(text) <= MAX_DETAIL_CHARS:
        return text
    return text[: MAX_DETAIL_CHARS - 3] + "..."
