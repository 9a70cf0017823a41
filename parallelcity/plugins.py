"""Plug-in kinds found through entry points, so built-in and user kinds install alike.

Groups: ``parallelcity.models``, ``parallelcity.controllers``, ``parallelcity.rigs``.
Each entry point names an object with a pydantic ``Config`` class and the
factory method of its group (``build``, ``create``, or the rig methods).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from parallelcity.errors import PluginError

GROUPS = {
    "model": "parallelcity.models",
    "controller": "parallelcity.controllers",
    "rig": "parallelcity.rigs",
}


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
