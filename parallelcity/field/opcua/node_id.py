"""NodeIds as written in scenarios and configs, parsed without an OPC UA stack.

The one parser: validation uses it as it is (``validate`` must not need asyncua),
``opcua.parse_node_id`` turns its result into an asyncua NodeId.  A scenario names a
node inside ``field.namespace`` as ``s=<string>``, ``i=<0..2^32-1>``, ``g=<GUID>`` or
``b=<base64>``; the general OPC UA text form may carry a namespace index first
(``ns=<index>;i=<integer>``), which a scenario leaves out.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from typing import Literal

from parallelcity.errors import NodeIdError

MAX_NAMESPACE = 0xFFFF  # UInt16
MAX_NUMERIC = 0xFFFFFFFF  # UInt32
MAX_STRING = 4096

SHAPES = "'s=<string>', 'i=<integer>', 'g=<GUID>' or 'b=<base64>'"


@dataclass(frozen=True)
class NodeRef:
    namespace: int | None  # None: the scenario's field.namespace
    type: Literal["s", "i", "g", "b"]
    identifier: str | int | uuid.UUID | bytes


def parse_node_text(text: str) -> NodeRef:
    """Parse ``[ns=N;](s=|i=|g=|b=)IDENTIFIER``; raise ``NodeIdError`` (a ``ValueError``)
    saying what is wrong."""
    if not isinstance(text, str):
        raise NodeIdError(repr(text), f"a NodeId is a string such as {SHAPES}")
    shown = text if len(text) <= 60 else text[:40] + "..."
    namespace: int | None = None
    rest = text
    if text.startswith("nsu="):
        raise NodeIdError(shown, "give it without 'nsu=...;': the namespace is field.namespace")
    if text.startswith("ns="):
        head, sep, rest = text[3:].partition(";")
        if not sep:
            raise NodeIdError(shown, "'ns=<index>' must be followed by ';'")
        namespace = _integer(shown, "ns", head, MAX_NAMESPACE)
    kind, sep, ident = rest.partition("=")
    if not sep or kind not in ("s", "i", "g", "b"):
        raise NodeIdError(shown, f"must look like {SHAPES}")
    if not ident:
        raise NodeIdError(shown, f"the identifier after '{kind}=' is empty")
    if kind == "i":
        return NodeRef(namespace, "i", _integer(shown, "i", ident, MAX_NUMERIC))
    if kind == "g":
        try:
            return NodeRef(namespace, "g", uuid.UUID(ident))
        except ValueError:
            raise NodeIdError(shown, "'g=' needs a GUID (8-4-4-4-12 hex digits)") from None
    if kind == "b":
        try:
            return NodeRef(namespace, "b", base64.b64decode(ident, validate=True))
        except (binascii.Error, ValueError):
            raise NodeIdError(shown, "'b=' needs base64 text") from None
    if len(ident) > MAX_STRING:
        raise NodeIdError(shown, f"longer than {MAX_STRING} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in ident):
        raise NodeIdError(shown, "control characters are not allowed")
    return NodeRef(namespace, "s", ident)


def _integer(shown: str, key: str, digits: str, largest: int) -> int:
    if not digits.isascii() or not digits.isdigit():
        raise NodeIdError(shown, f"'{key}=' needs an integer from 0 to {largest}")
    value = int(digits)
    if value > largest:
        raise NodeIdError(shown, f"'{key}={value}' is above {largest}")
    return value


def scenario_node(text: str) -> NodeRef:
    """A scenario's NodeId: namespace-free (the namespace is ``field.namespace``)."""
    ref = parse_node_text(text)
    if ref.namespace is not None:
        raise NodeIdError(
            text,
            "leave out 'ns=...;': the namespace is field.namespace "
            "(its index is looked up on the server)",
        )
    return ref


def check_scenario_node(text: str) -> str:
    """``text`` if it is a valid scenario NodeId (a pydantic validator's shape)."""
    scenario_node(text)
    return text
