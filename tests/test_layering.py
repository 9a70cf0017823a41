"""The layering, enforced by reading the source: pure modules import no I/O library, even
through other parallelcity modules, and each stage imports only the stages below it.

Imports are found with ``ast`` (module level and inside functions), never by importing,
so a lazy ``import zmq`` inside a function of a pure module is caught too.  Imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "parallelcity"

IO_LIBRARIES = frozenset(
    {
        "asyncio",
        "zmq",
        "asyncua",
        "sqlite3",
        "socket",
        "subprocess",
        "threading",
        "pymodbus",
        "matplotlib",
    }
)
"""Top-level names a pure module may not import, directly or through parallelcity modules."""

PURE_MODULES = (
    # shared values and rules
    "parallelcity.errors",
    "parallelcity.backoff",
    "parallelcity.specs",
    # field: what the mirror believes, judged on a time passed in
    "parallelcity.field.point_table",
    "parallelcity.field.snapshot",
    "parallelcity.field.config",
    "parallelcity.field.protocol",
    "parallelcity.field.opcua.node_id",
    "parallelcity.field.opcua.config",
    "parallelcity.field.modbus.codec",
    # scenario models
    "parallelcity.scenario.definition",
    "parallelcity.scenario.text",
    # twin and the domains' models
    "parallelcity.twin.model",
    "parallelcity.twin.schedule",
    "parallelcity.twin.estimate",
    "parallelcity.twin.divergence",
    "parallelcity.twin.twin",
    "parallelcity.twin.kind",
    "parallelcity.models.district_heating",
    "parallelcity.models.pump_tank",
    "parallelcity.models.traffic.signal_controller",
    "parallelcity.hil.plant",
    # fault diagnosis
    "parallelcity.diagnose",
    "parallelcity.diagnose.config",
    "parallelcity.diagnose.detect",
    "parallelcity.diagnose.diagnoser",
    "parallelcity.diagnose.faults",
    "parallelcity.diagnose.isolate",
    # decision
    "parallelcity.decide.control",
    "parallelcity.decide.gate",
    "parallelcity.decide.cycle",
    "parallelcity.decide.choice",
    "parallelcity.decide.assemble",
    # dispatch and gateway decisions
    "parallelcity.dispatch.wire",
    "parallelcity.gateway.watchdog",
    "parallelcity.gateway.grants",
    "parallelcity.gateway.core",
    # a cycle's command times
    "parallelcity.run.validity",
    # what a run leaves behind
    "parallelcity.record.records",
    # an experiment's matrix and table
    "parallelcity.experiment.plan",
    "parallelcity.experiment.table",
)
"""Modules with no I/O: time, readings and commands are passed in.  To keep a new module
pure, add it here; the test then keeps it so."""

PENDING_PURE: dict[str, str] = {}
"""Meant to be pure, not yet: expected to fail.  When one passes (the test then fails as an
unexpected pass), move it to ``PURE_MODULES``."""


@dataclass(frozen=True)
class Rule:
    """Modules under ``importer`` never import anything under ``forbidden`` (directly)."""

    importer: str
    forbidden: tuple[str, ...]
    why: str
    exempt: tuple[str, ...] = ()


STAGE_RULES = (
    Rule(
        PACKAGE,
        ("parallelcity.controllers", "parallelcity.hil"),
        "the core reaches the built-in kinds through entry points, like any plug-in",
        exempt=("parallelcity.controllers", "parallelcity.hil"),
    ),
    Rule(
        PACKAGE,
        ("parallelcity.run",),
        "the runner is the top: only the CLI starts it",
        exempt=("parallelcity.run", "parallelcity.cli"),
    ),
    Rule(
        "parallelcity.gateway",
        (
            "parallelcity.run",
            "parallelcity.decide",
            "parallelcity.twin",
            "parallelcity.verify",
            "parallelcity.record",
            "parallelcity.field.mirror",
        ),
        "the gateway runs on its own beside the field; it writes the field, never mirrors it",
    ),
    Rule(
        "parallelcity.field",
        ("parallelcity.gateway", "parallelcity.run", "parallelcity.decide", "parallelcity.record"),
        "the field side feeds the mirror and is written by the gateway, never the other way",
    ),
    Rule(
        "parallelcity.decide",
        ("parallelcity.gateway", "parallelcity.record"),
        "a decision is made on values; sending and recording it are the shell's",
    ),
    Rule(
        "parallelcity.twin",
        ("parallelcity.gateway", "parallelcity.dispatch", "parallelcity.record"),
        "the twin predicts from values, whatever carries them",
    ),
    Rule(
        "parallelcity.diagnose",
        (
            "parallelcity.gateway",
            "parallelcity.dispatch",
            "parallelcity.decide",
            "parallelcity.record",
            "parallelcity.field.mirror",
        ),
        "a diagnosis explains residuals from values; it never changes what is dispatched",
    ),
    Rule(
        "parallelcity.specs",
        ("parallelcity.scenario",),
        "specs are values the scenario builds, never the other way",
    ),
    Rule(
        "parallelcity.scenario",
        (
            "parallelcity.gateway",
            "parallelcity.decide.cycle",
            "parallelcity.decide.gate",
            "parallelcity.record",
        ),
        "a scenario describes a site and checks its kinds' configs against the controller "
        "interface; it starts and decides nothing",
    ),
    Rule(
        "parallelcity.models",
        (
            "parallelcity.field",
            "parallelcity.gateway",
            "parallelcity.dispatch",
            "parallelcity.decide",
            "parallelcity.record",
        ),
        "a domain's model kind knows the twin's model interface only",
    ),
)


def _package_dirs() -> dict[str, Path]:
    """Import name -> folder, as the distribution installs it (package-dir mapping included)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {PACKAGE: ROOT / PACKAGE}
    dirs |= {name: ROOT / folder for name, folder in setuptools.get("package-dir", {}).items()}
    return dirs


@cache
def modules() -> dict[str, Path]:
    """Every module of the distribution by its installed import name."""
    found: dict[str, Path] = {}
    for name, folder in _package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name, *parts))] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: all of them, except the bodies of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _names_in(tree: ast.AST, module: str, *, is_package: bool) -> set[str]:
    """Absolute names imported anywhere in ``tree`` (module ``module``) that can run."""
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


@cache
def imports_of(module: str) -> frozenset[str]:
    """What a module of the distribution imports at run time (for ``from a import b``: ``a``
    and ``a.b``; the latter only matters when it is a module)."""
    path = modules()[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    return frozenset(_names_in(tree, module, is_package=path.name == "__init__.py"))


def _own(name: str) -> str | None:
    """The distribution's module an imported name refers to (a module or its package)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules():
            return candidate
        parts.pop()
    return None


def _with_parents(module: str) -> Iterable[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = module.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts) + 1))


def io_paths(start: str) -> dict[str, list[str]]:
    """I/O library -> one import chain from ``start`` that reaches it."""
    chains: dict[str, list[str]] = {}
    seen = set(_with_parents(start))  # a package's __init__ runs before its module
    frontier = [[m] for m in seen if m in modules()]
    while frontier:  # breadth first: the shortest chain is the one reported
        nxt: list[list[str]] = []
        for chain in frontier:
            for name in sorted(imports_of(chain[-1])):
                top = name.split(".")[0]
                if top in IO_LIBRARIES:
                    chains.setdefault(top, [*chain, name])
                    continue
                own = _own(name)
                if own is None:
                    continue
                for step in _with_parents(own):
                    if step in modules() and step not in seen:
                        seen.add(step)
                        nxt.append([*chain, step])
        frontier = nxt
    return chains


def test_the_scanner_sees_the_tree() -> None:
    found = modules()
    assert "parallelcity.gateway.server" in found
    assert "parallelcity.controllers.nmpc" in found
    assert "parallelcity.hil.field" in found
    # known I/O shells are found to be ones
    assert "zmq" in io_paths("parallelcity.gateway.server")
    assert "asyncua" in io_paths("parallelcity.hil.field")


def test_every_declared_pure_module_exists() -> None:
    missing = [m for m in (*PURE_MODULES, *PENDING_PURE) if m not in modules()]
    assert not missing, f"declared pure but not in the tree (renamed?): {missing}"


_NOW_PURE = "passing now? move it from PENDING_PURE to PURE_MODULES"


def _pure_cases() -> list[object]:
    cases: list[object] = list(PURE_MODULES)
    cases += [
        pytest.param(m, marks=pytest.mark.xfail(reason=f"{why}; {_NOW_PURE}", strict=True))
        for m, why in PENDING_PURE.items()
    ]
    return cases


@pytest.mark.parametrize("module", _pure_cases())
def test_pure_module_imports_no_io(module: str) -> None:
    if module not in modules():
        pytest.skip(f"{module} is not in the tree")
    chains = io_paths(module)
    assert not chains, "\n".join(
        f"{module} reaches {lib}: {' -> '.join(chain)}" for lib, chain in sorted(chains.items())
    )


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _rule_id(rule: Rule) -> str:
    return f"{rule.importer} not " + ",".join(f.removeprefix(PACKAGE + ".") for f in rule.forbidden)


@pytest.mark.parametrize("rule", STAGE_RULES, ids=_rule_id)
def test_stage_rule(rule: Rule) -> None:
    broken = sorted(
        {
            f"{module} imports {_own(name) or name}"
            for module in modules()
            if _under(module, rule.importer) and not any(_under(module, e) for e in rule.exempt)
            for name in imports_of(module)
            if any(_under(name, f) for f in rule.forbidden)
        }
    )
    assert not broken, f"{rule.why}:\n" + "\n".join(broken)


def test_the_scanner_reads_every_kind_of_import() -> None:
    source = """
import os
from . import sibling
from ..up import thing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import zmq
else:
    import json

def lazy():
    import asyncio
    from socket import socket
"""
    tree = ast.parse(source)
    got = _names_in(tree, "parallelcity.stage.mod", is_package=False)
    assert {"os", "parallelcity.stage", "parallelcity.up", "json", "asyncio", "socket"} <= got
    assert "zmq" not in got  # type-checking only: never runs


if __name__ == "__main__":  # a quick listing while moving code around
    for m in sys.argv[1:] or PURE_MODULES:
        if m in modules():
            for lib, chain in sorted(io_paths(m).items()):
                print(f"{m}: {lib}: {' -> '.join(chain)}")
