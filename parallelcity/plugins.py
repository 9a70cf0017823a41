"""Plug-in kinds found through entry points, so built-in and user kinds install alike.

Groups: ``parallelcity.models``, ``parallelcity.controllers``, ``parallelcity.rigs``.
Each entry point names an object with a pydantic ``Config`` class and the
factory method of its group (``build``, ``create``, or the rig methods).
``parallelcity.protocols`` holds field protocols (``parallelcity.field.protocol``),
loaded typed by ``load_protocol``.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from parallelcity.errors import PluginError
from parallelcity.field.protocol import GROUP as PROTOCOL_GROUP
from parallelcity.field.protocol import FieldProtocol

GROUPS = {
    "model": "parallelcity.models",
    "controller": "parallelcity.controllers",
    "rig": "parallelcity.rigs",
    "protocol": PROTOCOL_GROUP,
}
_registered_protocols: dict[str, FieldProtocol] = {}


@cache
def available(role: str) -> dict[str, Any]:
    """Kinds installed for ``role`` ("model", "controller", "rig"), loaded, by name."""
    group = GROUPS[role]
    kinds: dict[str, Any] = {}
    for ep in entry_points(group=group):
        try:
            kinds[ep.name] = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            kinds[ep.name] = PluginError(
                f"{group} entry point {ep.name!r} ({ep.value}) failed to load: {exc}"
            )
    return kinds


def load(role: str, kind: str) -> Any:
    """The kind ``kind`` of ``role``, importing only its own entry point (a command that
    needs one kind does not pay for importing every installed one)."""
    found = [ep for ep in entry_points(group=GROUPS[role]) if ep.name == kind]
    if not found:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=GROUPS[role])))
        raise PluginError(f"unknown {role} kind {kind!r} (installed: {known or 'none installed'})")
    return _load_one(role, kind, found[0].value)


@cache
def _load_one(role: str, kind: str, value: str) -> Any:
    for ep in entry_points(group=GROUPS[role]):
        if ep.name == kind and ep.value == value:
            try:
                return ep.load()
            except Exception as exc:
                raise PluginError(
                    f"{GROUPS[role]} entry point {kind!r} ({value}) failed to load: {exc}"
                ) from exc
    raise PluginError(f"unknown {role} kind {kind!r}")


def register_protocol(protocol: FieldProtocol) -> None:
    """Make ``protocol`` loadable by its name without an installed entry point (embedding
    applications, tests); it wins over an installed one of the same name."""
    if not isinstance(protocol, FieldProtocol):
        raise PluginError(f"{protocol!r} is not a FieldProtocol")
    _registered_protocols[protocol.name] = protocol


def unregister_protocol(name: str) -> None:
    _registered_protocols.pop(name, None)


def protocol_names() -> list[str]:
    """Field protocols installed or registered, sorted."""
    names = {ep.name for ep in entry_points(group=PROTOCOL_GROUP)} | set(_registered_protocols)
    return sorted(names)


def load_protocol(name: str) -> FieldProtocol:
    """The field protocol ``name`` (``[field] protocol``), checked to be a ``FieldProtocol``."""
    found = _registered_protocols.get(name)
    if found is not None:
        return found
    try:
        kind = load("protocol", name)
    except PluginError:
        known = ", ".join(protocol_names())
        raise PluginError(
            f"unknown field protocol {name!r} (installed: {known or 'none installed'})"
        ) from None
    if not isinstance(kind, FieldProtocol):
        raise PluginError(
            f"{PROTOCOL_GROUP} entry point {name!r} is a {type(kind).__name__}, "
            "not a parallelcity.field.protocol.FieldProtocol"
        )
    return kind
