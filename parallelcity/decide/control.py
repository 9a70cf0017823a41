"""What a controller is: configure, ``setup`` once, then ``step`` every cycle.

A controller never raises for a failed solve: the outcome is a ``ControlResult``
whose ``status`` says what happened, so the cycle can fall back explicitly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
from pydantic import BaseModel

from parallelcity.twin.model import Array, SubsystemModel

log = logging.getLogger(__name__)


class SolveStatus(StrEnum):
    SOLVED = "solved"  # converged to the requested tolerance
    ACCEPTABLE = "acceptable"  # converged to a looser, still usable tolerance
    INFEASIBLE = "infeasible"
    TIMEOUT = "timeout"
    FAILED = "failed"  # anything else: numerical trouble, iteration limit, exception

    @property
    def usable(self) -> bool:
        return self in (SolveStatus.SOLVED, SolveStatus.ACCEPTABLE)


@dataclass(frozen=True, eq=False)
class ControlProblem:
    """Everything fixed for a run: model, sample time, horizon, input limits, banded outputs."""

    model: SubsystemModel
    dt: float  # sample period, simulated seconds
    horizon: int  # number of sample periods planned
    u_min: Array  # (nu,)
    u_max: Array  # (nu,)
    du_max: Array  # (nu,) largest move per sample period; inf where unlimited
    banded_outputs: tuple[int, ...]  # output indices that carry a comfort/safety band
    params: Array | None = None  # model parameters the controller plans with (nominal if None)
    end_t: float | None = None  # simulated time the run ends (None: not known)

    @property
    def p(self) -> Array:
        return self.model.nominal if self.params is None else self.params


@dataclass(frozen=True, eq=False)
class ControlInput:
    """What changes every cycle."""

    t0: float  # simulated time of the cycle, seconds since the epoch
    x0: Array  # (nx,) estimated state
    u_prev: Array  # (nu,) inputs currently applied in the field
    disturbances: Array  # (horizon, nd) forecast
    y_low: Array  # (horizon + 1, len(banded_outputs)) lower band per step
    y_high: Array  # (horizon + 1, len(banded_outputs)) upper band per step
    deadline_s: float = float("inf")  # wall-clock seconds the solve may take


def input_problem(problem: ControlProblem, inp: ControlInput, *, bands: bool = True) -> str:
    """Why ``inp`` does not fit ``problem`` (shapes, finite values); ``""`` when it does.

    ``bands=False`` skips the band arrays, for controllers that do not read them.
    """
    m, n, nb = problem.model, problem.horizon, len(problem.banded_outputs)
    x0 = np.asarray(inp.x0, dtype=float)
    dist = np.asarray(inp.disturbances, dtype=float)
    if x0.shape != (m.nx,) or not np.all(np.isfinite(x0)):
        return f"x0 must be {m.nx} finite values"
    if np.shape(inp.u_prev) != (m.nu,):
        return f"u_prev must have {m.nu} entries, got shape {np.shape(inp.u_prev)}"
    if dist.ndim != 2 or dist.shape[0] < n or dist.shape[1] != m.nd:
        return f"disturbances must be ({n}, {m.nd}), got {dist.shape}"
    if not np.all(np.isfinite(dist[:n])):
        return "the disturbance forecast has non-finite values"
    if not (bands and nb):
        return ""
    for what, band in (("y_low", inp.y_low), ("y_high", inp.y_high)):
        shape = np.shape(band)
        if len(shape) != 2 or shape[0] < n + 1 or shape[1] != nb:
            return f"{what} must be ({n + 1}, {nb}), got {shape}"
        if np.any(np.isnan(np.asarray(band, dtype=float)[: n + 1])):
            return f"{what} has NaN entries"
    return ""


@dataclass(frozen=True, eq=False)
class ControlResult:
    """A controller's answer: status first, then the plan it stands behind."""

    status: SolveStatus
    u_plan: Array  # (horizon, nu)
    x_pred: Array  # (horizon + 1, nx)
    y_pred: Array  # (horizon + 1, ny)
    cost: float
    iterations: int
    solve_time_s: float
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def u_first(self) -> Array:
        return np.asarray(self.u_plan[0], dtype=float)

    @classmethod
    def failure(
        cls,
        status: SolveStatus,
        problem: ControlProblem,
        message: str,
        solve_time_s: float = 0.0,
        *,
        iterations: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> ControlResult:
        """A result with no usable plan (NaN-filled, so it can never be sent by accident)."""
        m, n = problem.model, problem.horizon
        nan = float("nan")
        return cls(
            status=status,
            u_plan=np.full((n, m.nu), nan),
            x_pred=np.full((n + 1, m.nx), nan),
            y_pred=np.full((n + 1, m.ny), nan),
            cost=nan,
            iterations=iterations,
            solve_time_s=solve_time_s,
            message=message,
            extra=dict(extra or {}),
        )


def unknown_names(
    key: str,
    names: Iterable[str],
    known: Sequence[str],
    what: str,
    model: str,
    *,
    keyed: bool = True,
) -> list[str]:
    """One problem per name in a controller table that the model lacks (see
    ``ControllerKind.check``); ``keyed``: the names are keys of the table ``key``, else
    ``key`` holds the name."""
    return [
        f"{key}{f'[{name!r}]' if keyed else ''}: {name!r} is not an {what} of model {model!r} "
        f"({what}s: {', '.join(known)})"
        for name in names
        if name not in known
    ]


def require_fit(kind: str, problems: Sequence[str]) -> None:
    """``setup``'s guard: the config's ``problems`` (the lines ``validate`` shows) as one
    ``ValueError``, for a caller that did not validate first."""
    if problems:
        raise ValueError(f"{kind}: " + "; ".join(problems))


def guarded_step(
    kind: str,
    problem: ControlProblem | None,
    inp: ControlInput,
    plan: Callable[[ControlProblem, ControlInput, float], ControlResult],
    on_failure: Callable[[], None] | None = None,
    *,
    check_input: bool | None = None,
) -> ControlResult:
    """Every controller's ``step``: ``plan(problem, inp, t_start)``, with any exception
    turned into a FAILED result (a controller reports trouble, it does not raise it);
    ``on_failure`` drops state the failed step may have left half-updated.  With
    ``check_input`` the input is checked first (``input_problem``, with the band arrays
    when True, without when False) and a bad one is a FAILED result naming the problem.
    Calling before ``setup`` is the caller's bug and raises."""
    t_start = time.perf_counter()
    if problem is None:
        raise RuntimeError(f"{kind}: step called before setup")
    if check_input is not None:
        bad = input_problem(problem, inp, bands=check_input)
        if bad:
            return ControlResult.failure(
                SolveStatus.FAILED,
                problem,
                f"{kind}: bad input: {bad}",
                time.perf_counter() - t_start,
            )
    try:
        return plan(problem, inp, t_start)
    except Exception as exc:
        if on_failure is not None:
            on_failure()
        log.debug("%s: step failed", kind, exc_info=True)
        return ControlResult.failure(
            SolveStatus.FAILED,
            problem,
            f"{kind}: {type(exc).__name__}: {exc}",
            time.perf_counter() - t_start,
        )


@runtime_checkable
class Controller(Protocol):
    def setup(self, problem: ControlProblem) -> None:
        """Build solvers once for the problem; called before the first step."""
        ...

    def step(self, inp: ControlInput) -> ControlResult:
        """Plan from the current state; must not raise for solver trouble."""
        ...


class ControllerKind(Protocol):
    """What the ``parallelcity.controllers`` entry point of a kind provides."""

    Config: type[BaseModel]

    def check(self, config: BaseModel, problem: ControlProblem) -> list[str]:
        """Why ``config`` cannot control ``problem`` (the scenario's model, bands, limits,
        cycle and horizon), one line per problem, each starting with its key path inside
        the table; ``[]`` when it fits.  ``validate`` shows these lines, so ``setup`` of a
        config with none must not fail."""
        ...

    def create(self, config: BaseModel) -> Controller: ...


@runtime_checkable
class FitsProblem(Protocol):
    """A controller Config that checks itself against the problem (``KindOf.check``)."""

    def problems(self, problem: ControlProblem) -> list[str]: ...


C = TypeVar("C", bound=BaseModel)
K = TypeVar("K", bound=Controller)


class KindOf(Generic[C, K]):
    """A ready entry-point object for a controller kind: ``KindOf(Config, Controller)``.

    ``create`` accepts the kind's own ``Config`` or any model with the same fields
    (re-validated), so a caller holding a generic config gets the kind's checks;
    ``check`` asks the config's ``problems(problem)`` when the Config declares it.
    """

    def __init__(self, config: type[C], factory: Callable[[C], K]) -> None:
        self.Config = config
        self._factory = factory

    def _own(self, config: BaseModel) -> C:
        if isinstance(config, self.Config):
            return config
        return self.Config.model_validate(config.model_dump())

    def check(self, config: BaseModel, problem: ControlProblem) -> list[str]:
        own = self._own(config)
        return own.problems(problem) if isinstance(own, FitsProblem) else []

    def create(self, config: BaseModel) -> K:
        return self._factory(self._own(config))
