"""Scenario NodeIds as text, parsed without an OPC UA stack (validation must not need one).

A scenario names a node inside ``field.namespace`` as ``s=<string>`` or ``i=<integer>``;
the general OPC UA form may carry a namespace index first, ``ns=<index>;i=<integer>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_NAMESPACE = 0xFFFF  # UInt16
MAX_NUMERIC = 0xFFFFFFFF  # UInt32
MAX_STRING = 4096


@dataclass(frozen=True)
class NodeRef:
    namespace: int | None  # None: the scenario's field.namespace
    type: Literal["s", "i"]
    identifier: str | int


def parse_node_text(text: str) -> NodeRef:
    """Parse ``[ns=N;](s=STRING | i=INTEGER)``; raise ``ValueError`` saying what is wrong."""
    namespace: int | None = None
    rest = text
    if text.startswith("ns="):
        head, sep, rest = text[3:].partition(";")
        if not sep:
            raise ValueError(f"NodeId {text!r}: 'ns=<index>' must be followed by ';'")
        namespace = _integer(text, "ns", head, MAX_NAMESPACE)
    kind, sep, ident = rest.partition("=")
    if not sep or kind not in ("s", "i"):
        raise ValueError(f"NodeId {text!r} must look like 's=<string>' or 'i=<integer>'")
    if not ident:
        raise ValueError(f"NodeId {text!r}: the identifier after '{kind}=' is empty")
    if kind == "i":
        return NodeRef(namespace, "i", _integer(text, "i", ident, MAX_NUMERIC))
    if len(ident) > MAX_STRING:
        raise ValueError(f"NodeId {text[:40]!r}...: longer than {MAX_STRING} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in ident):
        raise ValueError(f"NodeId {text!r}: control characters are not allowed")
    return NodeRef(namespace, "s", ident)


def _integer(text: str, key: str, digits: str, largest: int) -> int:
    if not digits.isascii() or not digits.isdigit():
        raise ValueError(f"NodeId {text!r}: '{key}=' needs an integer from 0 to {largest}")
    value = int(digits)
    if value > largest:
        raise ValueError(f"NodeId {text!r}: '{key}={value}' is above {largest}")
    return value


def check_scenario_node(text: str) -> str:
    """A scenario NodeId: namespace-free (the namespace is ``field.namespace``)."""
    ref = parse_node_text(text)
    if ref.namespace is not None:
        raise ValueError(
            f"NodeId {text!r}: leave out 'ns=': the namespace is field.namespace "
            "(its index is looked up on the server)"
        )
    return text
