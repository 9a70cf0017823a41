"""Plug-in kinds found through entry points, so built-in and user kinds install alike.

Groups: ``parallelcity.models``, ``parallelcity.controllers``, ``parallelcity.rigs``.
Each entry point names an object with a pydantic ``Config`` class and the
factory method of its group (``build``, ``create``, or the rig methods).
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from .errors import PluginError

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
    kinds = available(role)
    if kind not in kinds:
        known = ", ".join(sorted(kinds)) or "none installed"
        raise PluginError(f"unknown {role} kind {kind!r} (installed: {known})")
    obj = kinds[kind]
    if isinstance(obj, PluginError):
        raise obj
    return obj
