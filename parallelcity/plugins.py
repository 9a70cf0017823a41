"""Plug-in kinds found through entry points, so built-in and user kinds install alike.

One entry point group per role; each entry point names an object satisfying the role's
Protocol, checked when it is loaded so a plug-in that lacks a member is a ``PluginError``
naming it (exit 2 for the user), never an ``AttributeError`` in the middle of a run:

==========  ============================  ===============================
Field protocols may also be registered in-process (``register_protocol``: embedding
applications, tests).
"""

from __future__ import annotations

import inspect
from functools import cache
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from parallelcity.errors import PluginError
from parallelcity.field.protocol import GROUP as PROTOCOL_GROUP
from parallelcity.field.protocol import FieldProtocol

if TYPE_CHECKING:
    from parallelcity.decide.control import ControllerKind
    from parallelcity.twin.kind import ModelKind
    from parallelcity.verify.rig import RigKind

GROUPS = {
    "model": "parallelcity.models",
    "controller": "parallelcity.controllers",
    "rig": "parallelcity.rigs",
    "protocol": PROTOCOL_GROUP,
}
_registered_protocols: dict[str, FieldProtocol] = {}


def model_kind(name: str) -> ModelKind:
    """The installed model kind ``name``."""
    from parallelcity.twin.kind import ModelKind

    kind: ModelKind = _typed("model", name, ModelKind)
    return kind


def controller_kind(name: str) -> ControllerKind:
    """The installed controller kind ``name``."""
    from parallelcity.decide.control import ControllerKind

    kind: ControllerKind = _typed("controller", name, ControllerKind)
    return kind


def rig_kind(name: str) -> RigKind:
    """The installed rig kind ``name``."""
    from parallelcity.verify.rig import RigKind

    kind: RigKind = _typed("rig", name, RigKind)
    return kind


def names(role: str) -> list[str]:
    """Names of the kinds installed for ``role``, sorted, without importing any."""
    return sorted({ep.name for ep in entry_points(group=GROUPS[role])})


def available(role: str) -> dict[str, object]:
    """Kinds installed for ``role``, loaded and checked, by name; a kind that does not load
    or does not satisfy its Protocol is its ``PluginError`` (it must not hide the others)."""
    loader = {
        "model": model_kind,
        "controller": controller_kind,
        "rig": rig_kind,
        "protocol": load_protocol,
    }[role]
    kinds: dict[str, object] = {}
    for name in names(role):
        try:
            kinds[name] = loader(name)
        except PluginError as exc:
            kinds[name] = exc
    return kinds


def missing_members(obj: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks or gets wrong, in declaration order
    (a method must be callable; a ``Config`` must be a pydantic model class)."""
    missing = []
    for name, is_method in _members(protocol):
        value = getattr(obj, name, _ABSENT)
        if value is _ABSENT:
            missing.append(name)
        elif is_method and not callable(value):
            missing.append(f"{name} (not callable)")
        elif name == "Config" and not (inspect.isclass(value) and issubclass(value, BaseModel)):
            missing.append("Config (not a pydantic model class)")
    return missing


_ABSENT = object()


@cache
def _members(protocol: type) -> tuple[tuple[str, bool], ...]:
    """``(name, is_method)`` of every public member a Protocol class declares."""
    found: dict[str, bool] = {}
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        for name in getattr(cls, "__annotations__", {}):
            found.setdefault(name, False)
        for name, value in vars(cls).items():
            if not name.startswith("_") and (callable(value) or isinstance(value, property)):
                found[name] = callable(value) and not isinstance(value, property)
    return tuple(found.items())


def _typed(role: str, name: str, protocol: type) -> Any:
    """The loaded object, once it has every member of ``protocol`` (the typed loaders
    above give it the Protocol's type: its signatures are the plug-in's contract)."""
    obj = _load(role, name)
    missing = missing_members(obj, protocol)
    if missing:
        raise PluginError(
            f"{GROUPS[role]} entry point {name!r} is not a {protocol.__name__}: "
            f"it lacks {', '.join(missing)}"
        )
    return obj


def _load(role: str, name: str) -> Any:
    """The object entry point ``name`` of ``role`` names, importing only that entry point
    (a command that needs one kind does not pay for importing every installed one)."""
    found = [ep for ep in entry_points(group=GROUPS[role]) if ep.name == name]
    if not found:
        known = ", ".join(names(role))
        raise PluginError(f"unknown {role} kind {name!r} (installed: {known or 'none installed'})")
    return _load_one(role, name, found[0].value)


@cache
def _load_one(role: str, name: str, value: str) -> Any:
    for ep in entry_points(group=GROUPS[role]):
        if ep.name == name and ep.value == value:
            try:
                return ep.load()
            except Exception as exc:
                raise PluginError(
                    f"{GROUPS[role]} entry point {name!r} ({value}) failed to load: {exc}"
                ) from exc
    raise PluginError(f"unknown {role} kind {name!r}")


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
        kind = _load("protocol", name)
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
