"""What a test rig is to the runtime: something a plan can be tried on, and a field stand-in.

Rig kinds are found through the ``parallelcity.rigs`` entry point group
(``parallelcity.hil`` ships the built-in ones).  A kind needs only this module and
``parallelcity.verify.machine`` (the rig state machine a driver runs behind).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationInfo

from parallelcity.twin.model import Array, SubsystemModel

if TYPE_CHECKING:
    from parallelcity.clock import Clock
    from parallelcity.field.protocol import PlantFactory
    from parallelcity.scenario.definition import Scenario


BASE_DIR = "base_dir"
"""Validation context key of a rig config: the folder its relative paths are relative to
(the scenario file's folder for ``[rig]``, the file's own for ``verify --rig-config``)."""


def resolve_path(value: str, info: ValidationInfo) -> str:
    """``value`` (``~`` expanded) made absolute against the context's ``BASE_DIR``; a path
    validated without that context is left relative to the current directory."""
    path = Path(value).expanduser()
    base = (info.context or {}).get(BASE_DIR)
    if path.is_absolute() or base is None:
        return str(path)
    return os.path.abspath(Path(base) / path)


def value_error_lines(check: Callable[[], object]) -> list[str]:
    """``RigKind.check`` from a check that raises: its ``ValueError`` as the one line."""
    try:
        check()
    except ValueError as exc:
        return [str(exc)]
    return []


class Rig(Protocol):
    """A plant a plan is tried on before it may reach the field."""

    name: str

    def rollout(self, x0: Array, inputs: Array, disturbances: Array, t0: float, dt: float) -> Array:
        """Apply ``inputs`` (n, nu) from state ``x0``; return outputs (n + 1, ny)."""
        ...


@runtime_checkable
class UncertainRig(Rig, Protocol):
    """A rig with ``samples`` seeded draws of its uncertainty (parameters, disturbances).

    ``rollout`` is sample 0; a verdict must hold on every sample.
    """

    @property
    def samples(self) -> int: ...

    def rollout_sample(
        self, sample: int, x0: Array, inputs: Array, disturbances: Array, t0: float, dt: float
    ) -> Array: ...


class RigDriver(Protocol):
    """How one kind of rig does things (simulated, FMU, OPC UA bench).

    What a rig can do, whatever drives it: be reset to a state at a time on one
    uncertainty sample, take inputs (and the disturbances forecast for this
    step), advance, and report its outputs.  The order is enforced by the rig
    state machine (``parallelcity.verify.machine``), never by the driver.
    """

    name: str

    @property
    def samples(self) -> int: ...

    def reset(self, x0: Array, t0: float, sample: int) -> None:
        """Put the rig in state ``x0`` at simulated time ``t0`` with sample ``sample``'s draw."""
        ...

    def apply(self, u: Array, d: Array) -> None:
        """Hold inputs ``u`` (nu,) under forecast disturbances ``d`` (nd,) from now on."""
        ...

    def advance(self, dt: float) -> None:
        """Let ``dt`` simulated seconds pass."""
        ...

    def read(self) -> Array:
        """Outputs (ny,) now, in model output order (NaN for outputs the rig lacks)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReceivedWrite:
    """One value the field stand-in's plant actually received on an input node."""

    time: float  # simulated epoch seconds
    name: str  # model input name
    value: float


class FieldStandIn(Protocol):
    """A running plant simulator served over OPC UA on loopback."""

    @property
    def endpoint(self) -> str: ...

    @property
    def applied(self) -> list[ReceivedWrite]:
        """Every value written to an input node, in order."""
        ...


@runtime_checkable
class ServedStandIn(Protocol):
    """A field stand-in that can be served on its own (``parallelcity field``)."""

    def listen_on(self, host: str, port: int) -> None:
        """Serve on ``host:port`` instead of a free loopback port."""
        ...

    def allow_insecure_lab(self) -> None:
        """Serve without OPC UA security (``--insecure-lab``) whatever the scenario says."""
        ...


class RigKind(Protocol):
    """What the ``parallelcity.rigs`` entry point of a kind provides."""

    Config: type[BaseModel]

    def check(self, config: BaseModel, model: SubsystemModel) -> list[str]:
        """Why ``config`` does not fit ``model``, one line per problem starting with its key
        path (``rig.…``); ``[]`` when it fits.  ``validate`` shows these lines, so neither
        method below may fail for a config with none."""
        ...

    def verification_rig(self, config: BaseModel, model: SubsystemModel) -> Rig:
        """The rig plans are tried on (``run``, ``verify``)."""
        ...

    def field_stand_in(
        self, config: BaseModel, scenario: Scenario, clock: Clock
    ) -> AbstractAsyncContextManager[FieldStandIn]:
        """The plant served as the field for an embedded run; ``ValueError`` if this kind
        cannot stand in for the field (it then only verifies)."""
        ...


@runtime_checkable
class PlantRigKind(RigKind, Protocol):
    """A rig kind whose field plant can run without any field protocol (``parallelcity
    experiment`` closes the loop on it directly); optional, a kind without it only serves."""

    def field_plant(
        self, config: BaseModel, scenario: Scenario, seed: int | None = None
    ) -> PlantFactory:
        """``make_plant(t0)``: the plant ``field_stand_in`` serves; ``seed`` replaces the
        kind's own draw of the field (None: the config's), so runs differ only by it."""
        ...


@runtime_checkable
class DrivenRigKind(RigKind, Protocol):
    """A rig kind built on a ``RigDriver`` (which an OPC UA bench can serve)."""

    def driver(self, config: BaseModel, model: SubsystemModel) -> RigDriver: ...
