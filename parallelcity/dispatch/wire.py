"""The dispatcher <-> field gateway wire protocol, version 1 (pure: no I/O).

One ZeroMQ frame per message, UTF-8 JSON, one object per frame.  Nothing on
the wire is ever unpickled or evaluated: ``decode_command`` and ``decode_ack``
accept exactly the documented fields with exactly the documented types and
raise ``WireFormatError`` with a precise reason for anything else.  Encoding
is canonical JSON (RFC 8785, ``canonical_json``), so a message always has the
same bytes, in any language.  The full description, with examples and test
vectors the tests check, is ``docs/wire-protocol.md`` (``docs/wire-vectors.json``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any, NoReturn

from parallelcity.errors import WireFormatError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
MAX_SETPOINTS = 256
MAX_ISSUER_BYTES = 64
"""Lengths of text on the wire are counted in UTF-8 bytes (the same in every language)."""
MAX_INPUT_NAME_BYTES = 128
MAX_DETAIL_BYTES = 1024
MAX_SEQ = 2**53 - 1
"""The largest ``seq`` (and integer anywhere on the wire): every common JSON parser reads it
exactly."""
MAX_TIME = 1e11
"""Times (``issued_at``, ``valid_until``, ``sent_at``, ``applied_at``, ``gateway_time``) are
seconds since the Unix epoch in ``0..MAX_TIME`` (about the year 5138)."""
MAX_VALIDITY_S = 86_400.0
"""``valid_until - issued_at`` is at most this: a command is valid for a day at the most."""
OTHER_ISSUER = "*"
"""In a status's ``leases``: equipment leased to an issuer other than the one asking.
Never an issuer's name."""
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
    UNAUTHORISED = "unauthorised"
    LEASE_HELD = "lease_held"
    WATCHDOG_TRIPPED = "watchdog_tripped"
    BAD_TIME = "bad_time"
    """``issued_at`` is further ahead of the gateway's clock than the skew allows, or older
    than the gateway's maximum command age."""
    ID_CONFLICT = "id_conflict"
    """The id was applied before with a different payload."""


class WatchdogState(StrEnum):
    DISABLED = "disabled"
    """The gateway has no safe values configured: no watchdog."""
    IDLE = "idle"
    """Armed, but no heartbeat or command seen yet since start or re-arm."""
    ARMED = "armed"
    """Heartbeats are arriving; missing ``missed_heartbeats`` of them trips it."""
    TRIPPED = "tripped"
    """Equipment reverted to safe values; commands are refused until re-armed."""


COMMAND_FIELDS = frozenset(
    {"v", "type", "id", "issuer", "seq", "issued_at", "valid_until", "setpoints", "verdict"}
)
ACK_FIELDS = frozenset(
    {"v", "type", "id", "seq", "status", "code", "detail", "applied_at", "insecure_lab"}
)
HEARTBEAT_FIELDS = frozenset({"v", "type", "id", "issuer", "sent_at", "release"})
REARM_FIELDS = frozenset({"v", "type", "id", "issuer", "reason"})
STATUS_FIELDS = frozenset(
    {
        "v",
        "type",
        "id",
        "issuer",
        "last_seq",
        "watchdog",
        "detail",
        "leases",
        "gateway_time",
        "heartbeat_s",
        "insecure_lab",
    }
)
_FIELDS: dict[str, frozenset[str]] = {
    "command": COMMAND_FIELDS,
    "ack": ACK_FIELDS,
    "heartbeat": HEARTBEAT_FIELDS,
    "rearm": REARM_FIELDS,
    "status": STATUS_FIELDS,
}
MAX_REASON_BYTES = 256
MAX_LEASES = 256


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
        _bad(f"field 'seq': expected an integer in 0..2**53-1, got {_show(value)}")
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


def _check_time(value: Any, name: str) -> float:
    out = _check_float(value, name)
    if not 0.0 <= out <= MAX_TIME:
        _bad(
            f"field {name}: expected seconds since the epoch in 0..{MAX_TIME:g}, got "
            f"{show_number(out)}"
        )
    return out


def _check_scalars(value: str, name: str) -> bytes:
    """Unicode scalar values only (a lone surrogate, JSON ``"\\ud800"``, is not text): the
    UTF-8 bytes of ``value``."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:
        _bad(f"field {name}: lone surrogate U+{ord(value[exc.start]):04X} at character "
             f"{exc.start} (not a Unicode scalar value)")  # fmt: skip


def _check_text(value: Any, name: str, lo: int, hi: int) -> str:
    """Free text (a reason, a detail): any Unicode scalar values, ``lo..hi`` UTF-8 bytes."""
    if not isinstance(value, str):
        _bad(f"field {name}: expected a string, got {type(value).__name__}")
    size = len(value) if value.isascii() else len(_check_scalars(value, name))
    if not lo <= size <= hi:
        _bad(f"field {name}: expected {lo}..{hi} UTF-8 bytes, got {size}")
    return value


NAME_CATEGORIES = frozenset("LMNPS")
"""A name (issuer, input, equipment) holds characters of these Unicode general categories
(letters, marks, numbers, punctuation, symbols) and U+0020 SPACE; nothing else: no control
(Cc), format (Cf), private-use (Co), unassigned (Cn) or surrogate (Cs) code point, and no
separator (Zs, Zl, Zp) but the plain space."""


def name_problem(value: str, what: str, max_bytes: int) -> str | None:
    """Why ``value`` is not a valid name on the wire (``None``: it is one).

    The rule is language-neutral: 1..``max_bytes`` UTF-8 bytes of characters in
    ``NAME_CATEGORIES`` or U+0020 (categories from this Python's Unicode database,
    ``unicodedata.unidata_version``).
    """
    if value.isascii():
        size = len(value)
        if value.isprintable():  # ASCII printable: U+0020..U+007E, all allowed
            bad = None
        else:
            bad = next(i for i, c in enumerate(value) if not c.isprintable())
    else:
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{what}: lone surrogate U+{ord(value[exc.start]):04X} at character "
                    f"{exc.start} (not a Unicode scalar value)")  # fmt: skip
        size = len(data)
        bad = next(
            (
                i
                for i, c in enumerate(value)
                if c != " " and unicodedata.category(c)[0] not in NAME_CATEGORIES
            ),
            None,
        )
    if bad is not None:
        c = value[bad]
        label = unicodedata.name(c, "")
        at = len(value[:bad].encode("utf-8"))
        return (
            f"{what}: U+{ord(c):04X}{' ' + label if label else ''} "
            f"(category {unicodedata.category(c)}) at byte {at} is not allowed; a name holds "
            "letters, marks, numbers, punctuation, symbols and U+0020 SPACE only"
        )
    if size == 0:
        return f"{what} is empty; a name is 1..{max_bytes} UTF-8 bytes"
    if size > max_bytes:
        return f"{what} is {size} UTF-8 bytes, at most {max_bytes}"
    return None


def check_issuer_name(value: Any, what: str = "field 'issuer'") -> str:
    """``value`` if it may be an issuer on the wire; ``WireFormatError`` saying why not."""
    if not isinstance(value, str):
        _bad(f"{what}: expected a string, got {type(value).__name__}")
    why = name_problem(value, what, MAX_ISSUER_BYTES)
    if why is not None:
        _bad(why)
    if value == OTHER_ISSUER:
        _bad(f"{what}: {OTHER_ISSUER!r} is reserved (a lease held by another issuer)")
    return value


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str):
        _bad(f"{what}: expected a string, got {type(value).__name__} {_show(value)}")
    why = name_problem(value, what, MAX_INPUT_NAME_BYTES)
    if why is not None:
        _bad(why)
    return value


def _check_setpoints(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        _bad(f"field 'setpoints': expected an object, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_SETPOINTS:
        _bad(f"field 'setpoints': expected 1..{MAX_SETPOINTS} entries, got {len(value)}")
    out: dict[str, float] = {}
    for name, v in value.items():
        _check_name(name, "field 'setpoints' (input name)")
        out[name] = _check_float(v, f"'setpoints.{name}'")
    return out


def _check_command(cmd: Command) -> None:
    _check_id(cmd.id)
    _check_issuer(cmd.issuer)
    _check_seq(cmd.seq)
    issued = _check_time(cmd.issued_at, "'issued_at'")
    until = _check_time(cmd.valid_until, "'valid_until'")
    if not until > issued:
        _bad(
            f"field 'valid_until': {show_number(until)} is not after issued_at "
            f"{show_number(issued)}"
        )
    if until - issued > MAX_VALIDITY_S:
        _bad(
            f"field 'valid_until': {show_number(until - issued)} s after issued_at; a command "
            f"is valid for at most {MAX_VALIDITY_S:g} s"
        )
    if not isinstance(cmd.verdict, str) or not _DIGEST.fullmatch(cmd.verdict):
        _bad(f"field 'verdict': expected 64 lowercase hex characters, got {_show(cmd.verdict)}")


def _check_ack(ack: Ack) -> None:
    _check_id(ack.id)
    _check_seq(ack.seq)
    if not isinstance(ack.status, AckStatus):
        _bad(f"field 'status': expected one of {[s.value for s in AckStatus]}")
    if ack.code is not None and not isinstance(ack.code, RefusalCode):
        _bad(f"field 'code': expected one of {[c.value for c in RefusalCode]} or ''")
    _check_text(ack.detail, "'detail'", 0, MAX_DETAIL_BYTES)
    if ack.applied_at is not None:
        _check_time(ack.applied_at, "'applied_at'")
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


# --------------------------------------------------------------------------- canonical JSON

_escape = json.encoder.encode_basestring  # JCS escaping: only '"', '\\' and U+0000..U+001F


def format_number(x: float | int) -> str:
    """``x`` as ECMAScript's ``Number.prototype.toString`` writes it (RFC 8785, 3.2.2.3).

    Integers (and integral floats) print without a fraction: ``1.0`` -> ``1``;
    ``-0.0`` -> ``0``; exponent form below ``1e-6`` and from ``1e21`` (``1e+21``,
    ``1e-7``); otherwise the shortest digits that read back as the same double.
    ``WireFormatError`` for NaN, infinities and integers beyond 2**53-1.
    """
    if isinstance(x, int) and not isinstance(x, bool):
        if -MAX_SEQ <= x <= MAX_SEQ:
            return str(x)
        _bad(f"integer {_show(x)} is beyond 2**53-1, which JSON parsers do not all read exactly")
    if not isinstance(x, float):
        _bad(f"expected a number, got {type(x).__name__}")
    if -9007199254740992.0 < x < 9007199254740992.0 and x.is_integer():
        return str(int(x))  # exact, and the shortest digits of an integer below 2**53
    r = repr(x)
    if "e" not in r and "n" not in r:
        # 1e-4 <= |x| < 1e16: Python's shortest digits, positional as ES writes them
        return r[:-2] if r.endswith(".0") else r
    if not math.isfinite(x):
        _bad(f"{r} is not a JSON number")
    return _es_exponent_form(r)


def _es_exponent_form(r: str) -> str:
    """Python's repr of a finite float -> the ES form of the same shortest digits."""
    sign = ""
    if r[0] == "-":
        sign, r = "-", r[1:]
    mantissa, _, exp = r.partition("e")  # Python writes d[.ddd]e±XX, d not 0
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).rstrip("0")
    n = len(whole) + int(exp)  # x = 0.digits * 10**n
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    exp_text = f"e+{e}" if e >= 0 else f"e-{-e}"
    if k == 1:
        return sign + digits + exp_text
    return sign + digits[0] + "." + digits[1:] + exp_text


def show_number(x: float | None) -> str:
    """``x`` for a person (a refusal's detail): the shortest digits that read back as ``x``,
    written as on the wire (``2.000002``, ``2``, ``1e-7``)."""
    try:
        return format_number(x)  # type: ignore[arg-type]  # None and the like: repr below
    except WireFormatError:
        return repr(x)


def _utf16_order(key: str) -> bytes:
    return key.encode("utf-16-be", "surrogatepass")


def _encode_value(value: Any, out: list[str]) -> None:
    kind = type(value)
    if kind is str:
        out.append(_escape(value))
    elif kind is float:
        out.append(format_number(value))
    elif kind is dict or isinstance(value, Mapping):
        _encode_object(value, out)
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int | float):
        out.append(format_number(value))
    elif isinstance(value, str):
        out.append(_escape(value))
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode_value(item, out)
        out.append("]")
    else:
        _bad(f"{type(value).__name__} is not a JSON value")


def _encode_object(value: Mapping[Any, Any], out: list[str]) -> None:
    keys = list(value)
    for key in keys:
        if not isinstance(key, str):
            _bad(f"object keys must be strings, got {type(key).__name__}")
    if all(k.isascii() for k in keys):
        keys.sort()
    else:
        keys.sort(key=_utf16_order)  # RFC 8785: by UTF-16 code units, not code points
    sep = "{"
    for key in keys:
        out.append(sep)
        out.append(_escape(key))
        out.append(":")
        _encode_value(value[key], out)
        sep = ","
    out.append("}" if keys else "{}")


def canonical_json(value: Any) -> bytes:
    """``value`` in the JSON Canonicalization Scheme (RFC 8785): the bytes every message,
    and every digest of one, is made of.

    Keys sorted by UTF-16 code units, no whitespace, strings escaped only where JSON
    must (``"``, ``\\``, U+0000..U+001F) and otherwise raw UTF-8, numbers as ECMAScript
    writes them (``format_number``).  ``WireFormatError`` for anything JSON cannot hold.
    """
    out: list[str] = []
    _encode_value(value, out)
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise WireFormatError(f"text that is not UTF-8: {exc.reason}") from exc


# --------------------------------------------------------------------------- messages


def _dumps(obj: dict[str, Any]) -> bytes:
    data = canonical_json(obj)
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

    @cached_property
    def digest(self) -> str:
        """sha256 hex of the canonical encoding: what identifies this command's payload.

        A resend has the same digest; a reused id with another issuer, seq,
        times, setpoints or verdict does not.
        """
        return hashlib.sha256(self.encode()).hexdigest()

    @cached_property
    def legacy_digest(self) -> str:
        """The digest gateways stored before messages were canonical JSON (Python's
        ``json.dumps``, sorted keys, floats as Python writes them).  Only to recognise a
        resend of a command such a gateway applied; never sent."""
        data = json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
        return hashlib.sha256(data).hexdigest()


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


def _check_issuer(value: Any) -> str:
    return check_issuer_name(value)


@dataclass(frozen=True)
class Heartbeat:
    """The runtime is alive (runtime -> gateway); answered with a ``Status``.

    A heartbeat also renews the issuer's equipment leases, or gives them up
    when ``release`` is true (a clean shutdown).
    """

    id: str
    issuer: str
    sent_at: float
    release: bool = False

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_issuer(self.issuer)
        object.__setattr__(self, "sent_at", _check_time(self.sent_at, "'sent_at'"))
        if not isinstance(self.release, bool):
            _bad(f"field 'release': expected true or false, got {_show(self.release)}")

    @classmethod
    def create(cls, issuer: str, sent_at: float, *, release: bool = False) -> Heartbeat:
        return cls(new_command_id(), issuer, sent_at, release)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": "heartbeat",
            "id": self.id,
            "issuer": self.issuer,
            "sent_at": self.sent_at,
            "release": self.release,
        }

    def encode(self) -> bytes:
        return _dumps(self.to_json())


@dataclass(frozen=True)
class Rearm:
    """Re-arm a tripped watchdog (runtime or operator -> gateway); answered with a ``Status``."""

    id: str
    issuer: str
    reason: str

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_issuer(self.issuer)
        _check_text(self.reason, "'reason'", 1, MAX_REASON_BYTES)

    @classmethod
    def create(cls, issuer: str, reason: str) -> Rearm:
        return cls(new_command_id(), issuer, reason)

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": "rearm",
            "id": self.id,
            "issuer": self.issuer,
            "reason": self.reason,
        }

    def encode(self) -> bytes:
        return _dumps(self.to_json())


@dataclass(frozen=True)
class Status:
    """The gateway's answer to a heartbeat or a re-arm."""

    id: str
    """The id of the heartbeat or re-arm this answers."""
    issuer: str
    last_seq: int | None
    """Highest ``seq`` the gateway applied for ``issuer`` (durably), or ``None``."""
    watchdog: WatchdogState
    detail: str = ""
    """Why the watchdog is in its state (e.g. when and why it tripped)."""
    leases: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Equipment -> holder of its lease now: the asking issuer's name, or ``OTHER_ISSUER``."""
    gateway_time: float = 0.0
    heartbeat_s: float = 0.0
    """How often the gateway expects heartbeats (gateway clock seconds); 0: no watchdog."""
    insecure_lab: bool = False

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_issuer(self.issuer)
        if self.last_seq is not None:
            _check_seq(self.last_seq)
        if not isinstance(self.watchdog, WatchdogState):
            _bad(f"field 'watchdog': expected one of {[w.value for w in WatchdogState]}")
        _check_text(self.detail, "'detail'", 0, MAX_DETAIL_BYTES)
        leases = self.leases
        if not isinstance(leases, Mapping) or len(leases) > MAX_LEASES:
            _bad(f"field 'leases': expected an object of at most {MAX_LEASES} entries")
        clean: dict[str, str] = {}
        for name, holder in leases.items():
            _check_name(name, "field 'leases' (equipment name)")
            clean[name] = OTHER_ISSUER if holder == OTHER_ISSUER else _check_issuer(holder)
        object.__setattr__(self, "leases", clean)
        object.__setattr__(self, "gateway_time", _check_time(self.gateway_time, "'gateway_time'"))
        beat = _check_float(self.heartbeat_s, "'heartbeat_s'")
        if not 0 <= beat <= MAX_TIME:
            _bad(
                f"field 'heartbeat_s': expected a number in 0..{MAX_TIME:g}, got "
                f"{show_number(beat)}"
            )
        object.__setattr__(self, "heartbeat_s", beat)
        if not isinstance(self.insecure_lab, bool):
            _bad(f"field 'insecure_lab': expected true or false, got {_show(self.insecure_lab)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "type": "status",
            "id": self.id,
            "issuer": self.issuer,
            "last_seq": self.last_seq,
            "watchdog": self.watchdog.value,
            "detail": self.detail,
            "leases": dict(self.leases),
            "gateway_time": self.gateway_time,
            "heartbeat_s": self.heartbeat_s,
            "insecure_lab": self.insecure_lab,
        }

    def encode(self) -> bytes:
        return _dumps(self.to_json())


Request = Command | Heartbeat | Rearm
"""What a dispatcher sends."""
Reply = Ack | Status
"""What a gateway answers."""


# --------------------------------------------------------------------------- decoding


def _wire_int(value: Any) -> Any:
    """An integer field (``v``, ``seq``, ``last_seq``) read by its value, as every JSON
    parser reads it: ``6.0`` and ``6e0`` are the number 6 (JavaScript's ``JSON.parse``
    cannot tell them apart, and the canonical encoding writes all three as ``6``). Anything
    else is returned as it is, for the field's own check to refuse."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _reject_constant(name: str) -> NoReturn:
    _bad(f"not JSON: {name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            _bad(f"duplicate key {_show(key)} in a JSON object")
        out[key] = value
    return out


def _parse(data: bytes, *kinds: str) -> dict[str, Any]:
    """Bytes -> the JSON object of one message of a type in ``kinds``, version and fields
    checked."""
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
    v = _wire_int(obj["v"])
    if isinstance(v, bool) or not isinstance(v, int) or v != PROTOCOL_VERSION:
        _bad(f"unsupported protocol version {_show(v)}: this end speaks v={PROTOCOL_VERSION}")
    if "type" not in obj:
        _bad("missing field 'type'")
    kind = obj["type"]
    if not isinstance(kind, str) or kind not in kinds:
        wanted = " or ".join(map(repr, kinds))
        _bad(f"field 'type': expected {wanted}, got {_show(kind)}")
    expected = _FIELDS[kind]
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
    return _command(_parse(data, "command"))


def _command(obj: dict[str, Any]) -> Command:
    return Command(  # the constructor checks every field
        id=obj["id"],
        issuer=obj["issuer"],
        seq=_wire_int(obj["seq"]),
        issued_at=obj["issued_at"],
        valid_until=obj["valid_until"],
        setpoints=obj["setpoints"],
        verdict=obj["verdict"],
    )


def decode_ack(data: bytes) -> Ack:
    """One wire frame -> ``Ack``; ``WireFormatError`` saying exactly what is wrong."""
    return _ack(_parse(data, "ack"))


def _ack(obj: dict[str, Any]) -> Ack:
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
        seq=_wire_int(obj["seq"]),
        status=status,
        code=code,
        detail=obj["detail"],
        applied_at=obj["applied_at"],
        insecure_lab=obj["insecure_lab"],
    )


def _heartbeat(obj: dict[str, Any]) -> Heartbeat:
    return Heartbeat(obj["id"], obj["issuer"], obj["sent_at"], obj["release"])


def _rearm(obj: dict[str, Any]) -> Rearm:
    return Rearm(obj["id"], obj["issuer"], obj["reason"])


def _status(obj: dict[str, Any]) -> Status:
    raw = obj["watchdog"]
    try:
        state = WatchdogState(raw)
    except (ValueError, TypeError):
        _bad(
            f"field 'watchdog': expected one of {[w.value for w in WatchdogState]}, "
            f"got {_show(raw)}"
        )
    last_seq = obj["last_seq"]
    if last_seq is not None:
        last_seq = _check_seq(_wire_int(last_seq))
    return Status(
        id=obj["id"],
        issuer=obj["issuer"],
        last_seq=last_seq,
        watchdog=state,
        detail=obj["detail"],
        leases=obj["leases"],
        gateway_time=obj["gateway_time"],
        heartbeat_s=obj["heartbeat_s"],
        insecure_lab=obj["insecure_lab"],
    )


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat(_parse(data, "heartbeat"))


def decode_rearm(data: bytes) -> Rearm:
    return _rearm(_parse(data, "rearm"))


def decode_status(data: bytes) -> Status:
    return _status(_parse(data, "status"))


def decode_request(data: bytes) -> Request:
    """What a gateway receives: a command, a heartbeat or a re-arm."""
    obj = _parse(data, "command", "heartbeat", "rearm")
    if obj["type"] == "command":
        return _command(obj)
    if obj["type"] == "heartbeat":
        return _heartbeat(obj)
    return _rearm(obj)


def decode_reply(data: bytes) -> Reply:
    """What a dispatcher receives: an ack or a status."""
    obj = _parse(data, "ack", "status")
    return _ack(obj) if obj["type"] == "ack" else _status(obj)


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
    seq = _wire_int(obj.get("seq"))
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        seq = 0
    return msg_id, seq


def truncate_detail(text: str) -> str:
    """``text`` cut to fit an ack's ``detail`` field (a lone surrogate shown escaped)."""
    if text.isascii():
        return text if len(text) <= MAX_DETAIL_BYTES else text[: MAX_DETAIL_BYTES - 3] + "..."
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_DETAIL_BYTES:
        return data.decode("utf-8")
    # cut at a character boundary: drop a partial UTF-8 sequence at the end
    return data[: MAX_DETAIL_BYTES - 3].decode("utf-8", "ignore") + "..."
