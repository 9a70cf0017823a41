"""Safety specs as plain values, and the pure checks every stage shares.

The spec values (``InputSpec``, ``BandSpec``, ``InterlockSpec``, ``TemporalSpec``)
are the tables of a scenario's ``[specs]``; the scenario builds its ``SafetySpecs``
from them (``Scenario.safety_specs``), and nothing here knows the scenario.

The same ``SafetySpecs`` object bounds the controller's problem and screens its
plan in the twin, judges every rig trace, and is checked once more on the
action about to be dispatched (and the field gateway guards its ``limits``), so
the stages can never disagree.

Kinds of spec, each with a robustness (how far inside, > 0, or outside, < 0,
the spec a trace is; in the signal's own unit):

* ``bound``: an input within [min, max];
* ``rate``: an input's move per step within its ramp limit;
* ``band``: an output within its band by time of day, widened by ``margin_k``;
* ``interlock``: if predicate A holds then predicate B must not (``max(-rA, -rB)``);
* ``temporal`` over the horizon, for a predicate P with robustness r(k):
  ``always`` ``min_k r(k)``; ``eventually`` within T ``max_{k*dt <= T} r(k)``;
  ``never_longer`` than T: every window of consecutive steps spanning more than
  T holds P somewhere, ``min_windows max_{k in window} r(k)``.

A trace sample at step k is at ``t0 + k*dt``; inputs at step k are the plan's
row k, the last row held for the final sample.  A spec is broken when its
robustness is below its margin by more than ``TOLERANCE``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from parallelcity.decide.control import ControlProblem
from parallelcity.twin.model import Array, SubsystemModel
from parallelcity.twin.schedule import Period

TOLERANCE = 1e-6


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InputSpec(_Spec):
    name: str
    min: float
    max: float
    max_rate_per_h: float | None = Field(None, gt=0, description="largest change per hour")
    clip: bool = Field(
        False,
        description="the verifier may clip this input into its bounds and ramp limit "
        "(verdict 'clipped') instead of rejecting the plan",
    )

    @model_validator(mode="after")
    def _ordered(self) -> InputSpec:
        if not self.min <= self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class BandPeriod(Period):
    low: float
    high: float


class BandSpec(_Spec):
    output: str
    low: float = Field(description="band outside every listed period")
    high: float
    periods: list[BandPeriod] = Field(default_factory=list, description="first match wins")
    margin_k: float = Field(
        1.0, ge=0, description="excursion beyond the band the verifier still approves"
    )
    enforce_after_s: float = Field(
        3600.0, ge=0, description="the verifier checks the band from this far into the horizon"
    )

    @model_validator(mode="after")
    def _ordered(self) -> BandSpec:
        for lo, hi, where in [(self.low, self.high, "")] + [
            (p.low, p.high, f" in period {p.start}-{p.end}") for p in self.periods
        ]:
            if not lo <= hi:
                raise ValueError(f"low {lo} is above high {hi}{where}")
        return self


class Predicate(_Spec):
    """A signal (model input or output) above and/or below a threshold."""

    signal: str = Field(description="model input or output name")
    above: float | None = Field(None, description="holds while the signal is at least this")
    below: float | None = Field(None, description="holds while the signal is at most this")

    @model_validator(mode="after")
    def _some_threshold(self) -> Predicate:
        if self.above is None and self.below is None:
            raise ValueError("a predicate needs 'above', 'below' or both")
        if self.above is not None and self.below is not None and self.above > self.below:
            raise ValueError(f"above {self.above} is over below {self.below}: never holds")
        return self


class InterlockSpec(_Spec):
    """If ``when`` holds then ``forbid`` must not, at every step of the horizon."""

    name: str = Field(min_length=1)
    when: Predicate
    forbid: Predicate
    margin: float = Field(0.0, ge=0, description="robustness the plan must keep")


class TemporalSpec(_Spec):
    """A temporal property of one predicate over the verified horizon.

    ``always``: holds at every step from ``from_s``; ``eventually``: holds at some step
    within ``within_s`` after ``from_s``; ``never_longer``: never fails for longer than
    ``longer_than_s``.  Passes when its robustness is at least ``margin``.
    """

    name: str = Field(min_length=1)
    kind: Literal["always", "eventually", "never_longer"]
    require: Predicate
    from_s: float = Field(0.0, ge=0, description="seconds into the horizon it applies from")
    within_s: float | None = Field(None, ge=0, description="eventually: deadline after from_s")
    longer_than_s: float | None = Field(None, ge=0, description="never_longer: longest lapse")
    margin: float = Field(0.0, ge=0, description="robustness the plan must keep")

    @model_validator(mode="after")
    def _needs(self) -> TemporalSpec:
        if self.kind == "eventually" and self.within_s is None:
            raise ValueError("kind 'eventually' needs within_s")
        if self.kind == "never_longer" and self.longer_than_s is None:
            raise ValueError("kind 'never_longer' needs longer_than_s")
        return self


@dataclass(frozen=True)
class InputLimit:
    name: str
    min: float
    max: float
    max_rate_per_h: float | None = None
    clip: bool = False  # the verifier may clip this input instead of rejecting the plan

    def max_step(self, seconds: float) -> float:
        """Largest allowed change over ``seconds``; inf when the input has no rate limit."""
        if self.max_rate_per_h is None:
            return math.inf
        return self.max_rate_per_h * seconds / 3600.0


@dataclass(frozen=True)
class Band:
    output: str
    spec: BandSpec

    def limits(self, t: float) -> tuple[float, float]:
        for period in self.spec.periods:
            if period.contains(t):
                return period.low, period.high
        return self.spec.low, self.spec.high


@dataclass(frozen=True)
class Violation:
    """One broken spec: which, where in the plan, by how much, on which rig sample."""

    spec: str  # "bound" | "rate" | "band" | "interlock" | "temporal"
    signal: str  # the signal, or the spec's name for interlocks and temporal specs
    step: int
    value: float  # the signal's value, or the robustness for interlocks and temporal specs
    limit: float  # the limit crossed, or the margin required
    sample: int = 0  # uncertainty sample of the rig trace (0 for input checks)

    @property
    def excess(self) -> float:
        return abs(self.value - self.limit) if math.isfinite(self.value) else math.inf

    def describe(self) -> str:
        where = f" on sample {self.sample}" if self.sample else ""
        return (
            f"{self.spec} on {self.signal} at step {self.step}{where}: "
            f"{self.value:.4g} vs limit {self.limit:.4g} (by {self.excess:.3g})"
        )


@dataclass(frozen=True)
class SpecResult:
    """One spec's robustness over a trace (or the worst over several samples)."""

    name: str  # "bound:<input>", "rate:<input>", "band:<output>", or the spec's own name
    kind: str
    robustness: float  # +inf when the horizon cannot decide it
    margin: float
    step: int  # where the robustness is attained (the worst step)
    sample: int = 0

    @property
    def passed(self) -> bool:
        return self.robustness >= self.margin - TOLERANCE


def predicate_robustness(pred: Predicate, values: Array) -> Array:
    """r(k) >= 0 exactly where the predicate holds; NaN counts as -inf (never holds)."""
    v = np.asarray(values, dtype=float)
    r = np.full(v.shape, np.inf)
    if pred.above is not None:
        r = np.minimum(r, v - pred.above)
    if pred.below is not None:
        r = np.minimum(r, pred.below - v)
    return np.where(np.isnan(r), -np.inf, r)


def _argworst(r: Array, first: int = 0) -> tuple[float, int]:
    if r.size == 0:
        return math.inf, first
    k = int(np.argmin(r))
    return float(r[k]), first + k


def temporal_robustness(
    kind: str,
    r: Array,
    dt: float,
    *,
    from_s: float = 0.0,
    within_s: float | None = None,
    longer_than_s: float | None = None,
) -> tuple[float, int]:
    """Robustness of a temporal spec over a predicate's robustness trace ``r`` (n + 1,).

    Returns the robustness and the step that decides it.  +inf when nothing in
    the trace can decide it (no step in range, or a horizon shorter than the lapse).
    """
    r = np.asarray(r, dtype=float)
    first = math.ceil(from_s / dt - 1e-9)
    tail = r[first:]
    if kind == "always":
        return _argworst(tail, first)
    if kind == "eventually":
        assert within_s is not None
        last = first + math.floor(within_s / dt + 1e-9)
        window = r[first : last + 1]
        if window.size == 0:
            return -math.inf, first  # the deadline lies beyond the horizon: unproven
        k = int(np.argmax(window))
        return float(window[k]), first + k
    if kind == "never_longer":
        assert longer_than_s is not None
        span = math.floor(longer_than_s / dt + 1e-9) + 1  # intervals strictly longer than T
        if tail.size < span + 1:
            return math.inf, first
        windows = np.lib.stride_tricks.sliding_window_view(tail, span + 1)
        best = windows.max(axis=1)
        k = int(np.argmin(best))
        return float(best[k]), first + k
    raise ValueError(f"unknown temporal kind {kind!r}")


@dataclass(frozen=True, eq=False)
class SafetySpecs:
    inputs: tuple[InputLimit, ...]  # in model input order
    bands: tuple[Band, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    interlocks: tuple[InterlockSpec, ...] = ()
    temporal: tuple[TemporalSpec, ...] = ()
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def _band_table(self, t0: float, n: int, dt: float) -> tuple[Array, Array]:
        """``band_arrays`` for the trace at ``t0``, kept: every sample of a plan shares it."""
        key = ("bands", t0, n, dt)
        table: tuple[Array, Array] | None = self._cache.get(key)
        if table is None:
            if len(self._cache) > 256:
                self._cache.clear()
            table = self._cache[key] = self.band_arrays(t0, n, dt)
        return table

    @classmethod
    def build(
        cls,
        input_names: Sequence[str],
        output_names: Sequence[str],
        inputs: Sequence[InputSpec],
        bands: Sequence[BandSpec] = (),
        interlocks: Sequence[InterlockSpec] = (),
        temporal: Sequence[TemporalSpec] = (),
    ) -> SafetySpecs:
        """Specs on a model's signals; ``inputs`` must limit every one of ``input_names``."""
        by_name = {s.name: s for s in inputs}
        limits = tuple(
            InputLimit(
                n, by_name[n].min, by_name[n].max, by_name[n].max_rate_per_h, by_name[n].clip
            )
            for n in input_names
        )
        return cls(
            limits,
            tuple(Band(b.output, b) for b in bands),
            tuple(input_names),
            tuple(output_names),
            tuple(interlocks),
            tuple(temporal),
        )

    def control_problem(
        self, model: SubsystemModel, dt: float, horizon: int, end_t: float | None = None
    ) -> ControlProblem:
        """The controllers' problem bounded by these specs (``end_t``: when the run ends)."""
        return ControlProblem(
            model=model,
            dt=dt,
            horizon=horizon,
            u_min=self.u_min,
            u_max=self.u_max,
            du_max=self.du_max(dt),
            banded_outputs=self.banded_outputs,
            end_t=end_t,
        )

    @property
    def limits(self) -> Mapping[str, InputLimit]:
        return {lim.name: lim for lim in self.inputs}

    @property
    def u_min(self) -> Array:
        return np.array([lim.min for lim in self.inputs])

    @property
    def u_max(self) -> Array:
        return np.array([lim.max for lim in self.inputs])

    def du_max(self, dt: float) -> Array:
        return np.array([lim.max_step(dt) for lim in self.inputs])

    @property
    def banded_outputs(self) -> tuple[int, ...]:
        return tuple(self.output_names.index(b.output) for b in self.bands)

    def band_arrays(self, t0: float, n: int, dt: float) -> tuple[Array, Array]:
        """Lower and upper band per step for ``n`` points starting at ``t0``: shape (n, bands)."""
        lo = np.empty((n, len(self.bands)))
        hi = np.empty_like(lo)
        for k in range(n):
            for j, band in enumerate(self.bands):
                lo[k, j], hi[k, j] = band.limits(t0 + k * dt)
        return lo, hi

    # -- which specs need a rig ------------------------------------------------------------

    def _on_inputs_only(self, signals: Sequence[str]) -> bool:
        return all(s in self.input_names for s in signals)

    @property
    def input_interlocks(self) -> tuple[InterlockSpec, ...]:
        """Interlocks between inputs only: judged without a rig, also at dispatch."""
        return tuple(
            il for il in self.interlocks if self._on_inputs_only([il.when.signal, il.forbid.signal])
        )

    @property
    def input_temporal(self) -> tuple[TemporalSpec, ...]:
        return tuple(ts for ts in self.temporal if ts.require.signal in self.input_names)

    # -- input checks: plans, and the action at dispatch ------------------------------------

    def check_inputs(self, u_prev: Array, plan: Array, dt: float) -> list[Violation]:
        """Bounds on every planned input, and rate limits from ``u_prev`` onwards."""
        out: list[Violation] = []
        plan = np.atleast_2d(np.asarray(plan, dtype=float))
        prev = np.asarray(u_prev, dtype=float)
        for k, u in enumerate(plan):
            for i, lim in enumerate(self.inputs):
                v = float(u[i])
                if not math.isfinite(v):
                    out.append(Violation("bound", lim.name, k, v, lim.min))
                    continue
                if v < lim.min - TOLERANCE:
                    out.append(Violation("bound", lim.name, k, v, lim.min))
                elif v > lim.max + TOLERANCE:
                    out.append(Violation("bound", lim.name, k, v, lim.max))
                step = lim.max_step(dt)
                if math.isfinite(step) and math.isfinite(prev[i]):
                    move = v - float(prev[i])
                    if abs(move) > step + TOLERANCE:
                        limit = float(prev[i]) + math.copysign(step, move)
                        out.append(Violation("rate", lim.name, k, v, limit))
            prev = u
        return out

    def check_dispatch(self, u_prev: Array, action: Array, dt: float) -> list[Violation]:
        """The last check before a command leaves: bounds, ramp, and interlocks between inputs."""
        row = np.atleast_2d(np.asarray(action, dtype=float))
        out = self.check_inputs(u_prev, row, dt)
        for res in self._interlock_results(self.input_interlocks, row, None):
            if not res.passed:
                out.append(Violation("interlock", res.name, 0, res.robustness, res.margin))
        return out

    def clip_plan(self, u_prev: Array, plan: Array, dt: float) -> Array:
        """The plan with every clip-allowed input pulled into its bounds and ramp, in order.

        Inputs that may not be clipped, and non-finite values, are left as they are.
        """
        out = np.array(np.atleast_2d(plan), dtype=float)
        prev = np.array(u_prev, dtype=float)
        for k in range(out.shape[0]):
            for i, lim in enumerate(self.inputs):
                v = out[k, i]
                if not lim.clip or not math.isfinite(v):
                    continue
                lo, hi = lim.min, lim.max
                step = lim.max_step(dt)
                if math.isfinite(step) and math.isfinite(prev[i]):
                    lo, hi = max(lo, prev[i] - step), min(hi, prev[i] + step)
                    if lo > hi:  # the ramp cannot reach the bounds from here: bounds win
                        lo, hi = lim.min, lim.max
                out[k, i] = min(max(v, lo), hi)
            prev = out[k]
        return out

    # -- trace checks: rig outputs --------------------------------------------------------

    def check_outputs(self, t0: float, y: Array, dt: float) -> list[Violation]:
        """Bands (widened by their margin) on outputs ``y`` (n + 1, ny), from enforce_after_s on."""
        out: list[Violation] = []
        lo, hi = self._band_table(t0, y.shape[0], dt)
        for b, band in enumerate(self.bands):
            j = self.output_names.index(band.output)
            first = math.ceil(band.spec.enforce_after_s / dt - 1e-9)
            m = band.spec.margin_k
            v = np.asarray(y[first:, j], dtype=float)
            low, high = lo[first:, b] - m, hi[first:, b] + m
            finite = np.isfinite(v)
            below = ~finite | (v < low - TOLERANCE)
            above = finite & (v > high + TOLERANCE)
            for i in np.flatnonzero(below | above):
                limit = low[i] if below[i] else high[i]
                out.append(
                    Violation("band", band.output, first + int(i), float(v[i]), float(limit))
                )
        return out

    def series(self, signal: str, plan: Array, y: Array | None) -> Array:
        """One signal over the trace's n + 1 samples (inputs: last row held)."""
        if signal in self.input_names:
            u = np.atleast_2d(plan)
            col = u[:, self.input_names.index(signal)]
            n = u.shape[0] if y is None else y.shape[0] - 1
            return np.concatenate([col[:n], col[-1:]]) if n >= 1 else col[:1]
        if y is None:
            raise ValueError(f"{signal!r} is an output: it needs a trace")
        return np.asarray(y[:, self.output_names.index(signal)], dtype=float)

    def _interlock_results(
        self, interlocks: Sequence[InterlockSpec], plan: Array, y: Array | None
    ) -> list[SpecResult]:
        out = []
        for il in interlocks:
            ra = predicate_robustness(il.when, self.series(il.when.signal, plan, y))
            rb = predicate_robustness(il.forbid, self.series(il.forbid.signal, plan, y))
            rho, k = _argworst(np.maximum(-ra, -rb))
            out.append(SpecResult(il.name, "interlock", rho, il.margin, k))
        return out

    def _temporal_results(
        self, specs: Sequence[TemporalSpec], plan: Array, y: Array | None, dt: float
    ) -> list[SpecResult]:
        out = []
        for ts in specs:
            r = predicate_robustness(ts.require, self.series(ts.require.signal, plan, y))
            rho, k = temporal_robustness(
                ts.kind,
                r,
                dt,
                from_s=ts.from_s,
                within_s=ts.within_s,
                longer_than_s=ts.longer_than_s,
            )
            out.append(SpecResult(ts.name, "temporal", rho, ts.margin, k))
        return out

    def robustness(
        self, t0: float, u_prev: Array, plan: Array, y: Array | None, dt: float, sample: int = 0
    ) -> list[SpecResult]:
        """Every spec's robustness on one trace; with ``y`` None, only input-side specs."""
        u = np.atleast_2d(np.asarray(plan, dtype=float))
        prev = np.vstack([np.asarray(u_prev, dtype=float)[None, :], u])
        out: list[SpecResult] = []
        for i, lim in enumerate(self.inputs):
            col = u[:, i]
            r = np.minimum(col - lim.min, lim.max - col)
            rho, k = _argworst(np.where(np.isnan(r), -np.inf, r))
            out.append(SpecResult(f"bound:{lim.name}", "bound", rho, 0.0, k, sample))
            step = lim.max_step(dt)
            if math.isfinite(step):
                moves = np.abs(np.diff(prev[:, i]))
                r = step - moves
                rho, k = _argworst(np.where(np.isnan(r), -np.inf, r))
                out.append(SpecResult(f"rate:{lim.name}", "rate", rho, 0.0, k, sample))
        if y is not None:
            lo, hi = self._band_table(t0, y.shape[0], dt)
            for b, band in enumerate(self.bands):
                j = self.output_names.index(band.output)
                first = math.ceil(band.spec.enforce_after_s / dt - 1e-9)
                m = band.spec.margin_k
                v = np.asarray(y[first:, j], dtype=float)
                r = np.minimum(v - (lo[first:, b] - m), (hi[first:, b] + m) - v)
                rho, k = _argworst(np.where(np.isfinite(v), r, -np.inf), first)
                out.append(SpecResult(f"band:{band.output}", "band", rho, 0.0, k, sample))
        interlocks = self.interlocks if y is not None else self.input_interlocks
        temporal = self.temporal if y is not None else self.input_temporal
        out += [
            SpecResult(r.name, r.kind, r.robustness, r.margin, r.step, sample)
            for r in self._interlock_results(interlocks, u, y)
            + self._temporal_results(temporal, u, y, dt)
        ]
        return out

    def check_logic(
        self, plan: Array, y: Array | None, dt: float, sample: int = 0
    ) -> list[Violation]:
        """Interlocks and temporal specs on one trace (input-side ones only when ``y`` is None)."""
        u = np.atleast_2d(np.asarray(plan, dtype=float))
        interlocks = self.interlocks if y is not None else self.input_interlocks
        temporal = self.temporal if y is not None else self.input_temporal
        out = []
        for r in self._interlock_results(interlocks, u, y) + self._temporal_results(
            temporal, u, y, dt
        ):
            if not r.passed:
                out.append(Violation(r.kind, r.name, r.step, r.robustness, r.margin, sample))
        return out


def worst(results: Sequence[Sequence[SpecResult]]) -> list[SpecResult]:
    """Per spec, the lowest robustness over several samples' results (same spec order)."""
    if not results:
        return []
    out = []
    for per_spec in zip(*results, strict=True):
        out.append(min(per_spec, key=lambda r: (r.robustness - r.margin, r.sample)))
    return out
