"""The diagnoser: residuals each cycle, a CUSUM to detect, a fit of every hypothesis to
isolate and size, and alarms carrying their evidence.

Each cycle: the twin's one-cycle-ahead prediction of the field (``twin.divergence.Predictor``)
gives a residual per diagnosed output; the detector (``detect.CusumDetector``) watches
them.  When a channel crosses its threshold the change is *detected*; once the window
from the change's estimated start holds ``window`` cycles, every (fault kind, component)
hypothesis is fitted to it (``isolate.Isolator``) and the best one is the *alarm*.  The
detector then learns the new normal, so only a further change raises another alarm; the
same (kind, component) again is not a new alarm.

Pure: simulated times, readings and inputs are passed in; nothing here changes what the
runtime dispatches.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from parallelcity.twin.divergence import Prediction, Predictor
from parallelcity.twin.model import Array, FaultEffect, FaultKind, FaultTarget, SubsystemModel

from .detect import CusumDetector, Detection, DetectorSettings, FrozenDetector
from .faults import ActiveFault, FaultSpec
from .isolate import Fit, Hypothesis, Isolator, Window, hypotheses
from .visibility import VISIBLE_ALLOWANCES

MAX_WINDOW_FACTOR = 4  # a window never holds more than this many times ``window`` cycles
HISTORY_CYCLES = 5000  # cycles kept to judge afterwards where a planted fault showed
LEAD_CYCLES = 2  # the window starts this many cycles before the detector's change estimate
# components of the best fit's kind whose fits cost less than this more than the best
# cannot be told from it by the window (a likelihood-ratio test at 95 %, one degree of
# freedom): the alarm names them as alike, one isolation class
ALIKE_MARGIN = 3.84


@dataclass(frozen=True)
class DiagnosisSettings:
    detector: DetectorSettings
    kinds: tuple[FaultKind, ...]
    window: int = 12  # cycles fitted before the alarm (half of them after the detection)
    input_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    # an alarm needs a hypothesis explaining at least this share of the window's residuals
    min_explained: float = 0.5
    # output -> the smallest change its reading shows (a register's scale; 0: a float)
    resolution: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError("the isolation window needs at least 2 cycles")
        if not 0 <= self.min_explained < 1:
            raise ValueError("min_explained must be in [0, 1)")


@dataclass(frozen=True)
class Alarm:
    kind: str
    component: str
    size: float | None  # the estimate (a stuck fault's: the value it froze at)
    unit: str
    start: float  # estimated start, simulated epoch seconds
    detected_at: float  # when the change was detected
    raised_at: float  # when the window was full and the fault isolated
    channel: str  # the residual that crossed first
    evidence: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "component": self.component,
            "size": self.size,
            "unit": self.unit,
            "start": self.start,
            "detected_at": self.detected_at,
            "raised_at": self.raised_at,
            "channel": self.channel,
            "evidence": dict(self.evidence),
        }

    def describe(self) -> str:
        size = "" if self.size is None else f" size {self.size:.3g} {self.unit}".rstrip()
        ev, up = self.evidence, self.evidence["runner_up"]
        why = (
            "its reading repeats bit for bit"
            if ev["frozen_reading"]
            else f"margin {ev['margin']:.1f}"
        )
        alike = ev.get("alike") or []
        where = " or ".join([self.component, *alike])
        return (
            f"{self.kind} on {where}{size} (explains {ev['explained']:.0%}, {why} "
            f"over {up['kind']} on {up['component']}); detected on {self.channel}"
        )


@dataclass(frozen=True)
class Event:
    """What one cycle of diagnosis has to say: ``kind`` is "detected", "alarm" or
    "dismissed" (a change no fault kind explains well enough)."""

    kind: str
    t: float
    detail: str
    data: Mapping[str, Any]
    alarm: Alarm | None = None


@dataclass
class _Cycle:
    pred: Prediction
    readings: dict[str, float]
    t_from: float


class Diagnoser:
    """Detect, isolate and size faults from the twin's residuals (state: the predictor,
    the detector, the recent cycles, a pending detection and the alarms raised)."""

    def __init__(
        self,
        model: SubsystemModel,
        dt: float,
        settings: DiagnosisSettings,
        params: Array | None = None,
    ) -> None:
        self.model = model
        self.settings = settings
        self.channels = tuple(settings.detector.sigma)
        self.sigma = np.array([settings.detector.sigma[c] for c in self.channels])
        self.predictor = Predictor(model, dt, self.channels, 1, params)
        self.detector = CusumDetector(settings.detector)
        self.frozen = FrozenDetector(settings.detector.sigma, settings.resolution)
        self.isolator = Isolator(model, dt, params, settings.resolution)
        self.hypotheses = hypotheses(model, settings.kinds, self.channels, settings.input_bounds)
        self.cycles: deque[_Cycle] = deque(maxlen=MAX_WINDOW_FACTOR * settings.window)
        self.history: deque[_Cycle] = deque(maxlen=HISTORY_CYCLES)
        self.k = 0
        # the detection waiting for its window: (detection, estimated start, baselines, when)
        self.pending: tuple[Detection, float, dict[str, float], float] | None = None
        self.alarms: list[Alarm] = []
        self.adopted: list[tuple[Hypothesis, Alarm]] = []
        self._unseen: dict[str, float] = {}  # frozen state sensor -> the state as predicted
        self._last_t: float | None = None

    def observe(
        self, t: float, readings: Mapping[str, float], x: Array | None, u: Array
    ) -> list[Event]:
        """Cycle ``t``: fresh ``readings``, the twin's state ``x``, inputs ``u`` from now on."""
        readings, x, u = self._explained(t, readings, x, np.asarray(u, dtype=float))
        pred = self.predictor.observe(t, readings, x, u)
        t_from, self._last_t = self._last_t, t
        if pred is None or t_from is None:
            return []
        for name in self._unseen:  # a frozen sensor's state goes on as the twin predicts it
            self._unseen[name] = float(pred.y_pred[self.model.index("outputs", name)])
        k = self.k
        self.k += 1
        self.cycles.append(_Cycle(pred, dict(readings), t_from))
        self.history.append(self.cycles[-1])
        events: list[Event] = []
        det = self.detector.update(k, pred.residuals) if self.pending is None else None
        expected = {c: float(pred.y_pred[self.model.index("outputs", c)]) for c in self.channels}
        stuck = self.frozen.update(k, readings, expected)
        warm = (
            stuck is not None
            and self.detector.channels[stuck.channel].n >= self.detector.settings.warmup
        )
        if self.pending is None:
            det = det or (stuck if warm else None)
            if det is not None:
                start_k = max(det.start_k - LEAD_CYCLES, k - len(self.cycles) + 1)
                start_t = self.cycles[start_k - k - 1].t_from
                self.pending = (det, start_t, self.detector.baseline(), t)
                r = pred.residuals.get(det.channel, math.nan)
                events.append(
                    Event(
                        "detected",
                        t,
                        f"{det.channel} departs from the twin ({r:+.3g} after its baseline "
                        f"{self.detector.baseline()[det.channel]:+.3g})",
                        {"channel": det.channel, "direction": det.direction, "start": start_t},
                    )
                )
        if self.pending is not None:
            events.extend(self._isolate_when_ready(t))
        return events

    def _isolate_when_ready(self, t: float) -> list[Event]:
        assert self.pending is not None
        det, start_t, baseline, detected_at = self.pending
        window = [c for c in self.cycles if c.t_from >= start_t]
        after = sum(1 for c in window if c.pred.t > detected_at)
        if len(window) < self.settings.window or after < self.settings.window // 2:
            return []
        self.pending = None
        alarm = self._isolate(window, det, (detected_at, t), baseline)
        explained = float(alarm.evidence["explained"])
        if explained < self.settings.min_explained:
            # unexplained: only the channel that crossed learns its baseline again, so a
            # fault starting meanwhile is not learnt into the others' baselines
            self.detector.reset([det.channel])
            self.frozen.runs.pop(det.channel, None)
            why = (
                f"no fault explains it: the best, {alarm.kind} on {alarm.component}, "
                f"explains {explained:.0%} (at least {self.settings.min_explained:.0%} needed)"
            )
            return [Event("dismissed", t, why, alarm.as_dict())]
        self.detector.reset()
        self.frozen.runs.clear()
        if any((a.kind, a.component) == (alarm.kind, alarm.component) for a in self.alarms):
            return []
        self.alarms.append(alarm)
        self._adopt(alarm)
        return [Event("alarm", t, alarm.describe(), alarm.as_dict(), alarm)]

    def visible_cycles(self, spec: FaultSpec) -> int | None:
        """Cycles from ``spec.start`` on at which the fault as planted moves some residual
        channel by at least ``VISIBLE_ALLOWANCES`` CUSUM allowances (its one-cycle-ahead
        signature at the run's own operating points, against the twin as it was then);
        None for a sensor fault (not judged: a drift always grows, a stuck reading shows
        once the true value moves)."""
        kind = self.model.fault_kind(spec.kind)
        if kind.applies_to is FaultTarget.SENSOR:
            return None
        cycles = [c for c in self.history if c.t_from >= spec.start]
        if not cycles:
            return 0
        hyp = hypotheses(self.model, [kind], self.channels, self.settings.input_bounds)
        one = next(h for h in hyp if h.component == spec.component)
        w = self._window(cycles, {})
        size = 0.0 if spec.size is None else float(spec.size)
        z = np.abs(self.isolator.patterns(w, one, [size], spec.start)[0]) / self.sigma[None, :]
        k = self.settings.detector.k
        return int(np.sum(np.nanmax(z, axis=1) >= VISIBLE_ALLOWANCES * k))

    def _adopt(self, alarm: Alarm) -> None:
        """From now on the diagnosis twin has the fault as diagnosed, so only a further
        change shows in its residuals (the runtime's twin is left as it is)."""
        kind = self.model.fault_kind(alarm.kind)
        hyp = next(
            h for h in self.hypotheses if (h.kind.name, h.component) == (kind.name, alarm.component)
        )
        if kind.applies_to is FaultTarget.PARAMETER:
            spec = FaultSpec(kind.name, alarm.component, alarm.size, alarm.start)
            p = ActiveFault(self.model, spec).params(self.predictor.params, alarm.start)
            self.predictor.params = self.isolator.params = p
        if kind.effect is FaultEffect.STUCK and hyp.state is not None:
            self._unseen[alarm.component] = alarm.size or 0.0
        self.adopted.append((hyp, alarm))

    def _explained(
        self, t: float, readings: Mapping[str, float], x: Array | None, u: Array
    ) -> tuple[dict[str, float], Array | None, Array]:
        """Readings, state and inputs with the adopted sensor and actuator faults taken out."""
        out, x_out, u_out = dict(readings), None if x is None else np.array(x), np.array(u)
        for hyp, alarm in self.adopted:
            kind, size = hyp.kind, alarm.size or 0.0
            if kind.applies_to is FaultTarget.INPUT:
                u_out[list(hyp.index)] = size
            elif kind.applies_to is FaultTarget.SENSOR and kind.effect is FaultEffect.STUCK:
                out.pop(hyp.component, None)
                if x_out is not None and hyp.state is not None:
                    x_out[hyp.state] = self._unseen.get(hyp.component, size)
            elif kind.applies_to is FaultTarget.SENSOR:
                bias = size * max(0.0, t - alarm.start) / 3600.0
                if hyp.component in out:
                    out[hyp.component] -= bias
                if x_out is not None and hyp.state is not None:
                    x_out[hyp.state] -= bias
        return out, x_out, u_out

    def _isolate(
        self,
        window: Sequence[_Cycle],
        det: Detection,
        times: tuple[float, float],
        baseline: Mapping[str, float],
    ) -> Alarm:
        w = self._window(window, baseline)
        fits, j0 = self.isolator.rank(w, self.hypotheses)
        best = fits[0]
        frozen = best.cost > min(f.cost for f in fits)  # put first by its frozen reading
        kind = self.model.fault_kind(best.kind)
        if kind.applies_to is FaultTarget.SENSOR and kind.effect is FaultEffect.STUCK:
            # fitted on residuals less their baseline: the reading itself is the sum
            best = replace(best, size=best.size + baseline.get(best.component, 0.0))
        runner = fits[1] if len(fits) > 1 else Fit("none", "", 0.0, j0, best.start)
        alike = (
            []
            if frozen
            else [
                f.component
                for f in fits
                if f.kind == best.kind
                and f.component != best.component
                and f.cost - fits[0].cost < ALIKE_MARGIN
            ]
        )
        z = w.r / self.sigma[None, :]
        evidence = {
            "window": [float(w.t_from[0]), float(w.t[-1])],
            "cycles": len(window),
            "residuals": {
                c: {
                    "mean": _finite(np.nanmean(w.r[:, i])),
                    "max_abs_z": _finite(np.nanmax(np.abs(z[:, i]))),
                }
                for i, c in enumerate(self.channels)
                if np.any(np.isfinite(w.r[:, i]))
            },
            "best": best.as_dict(),
            "runner_up": runner.as_dict(),
            "margin": runner.cost - best.cost,
            "no_fault_cost": j0,
            "explained": 1.0 - best.cost / j0 if j0 > 0 else 0.0,
            "frozen_reading": frozen,
            "alike": sorted(alike),
            "statistic": det.statistic,
            "threshold": self.detector.h,
        }
        return Alarm(
            kind=best.kind,
            component=best.component,
            size=best.size,
            unit=kind.unit,
            start=best.start,
            detected_at=times[0],
            raised_at=times[1],
            channel=det.channel,
            evidence=evidence,
        )

    def _window(self, window: Sequence[_Cycle], baseline: Mapping[str, float]) -> Window:
        nan = math.nan
        r = np.array(
            [
                [c.pred.residuals.get(ch, nan) - baseline.get(ch, 0.0) for ch in self.channels]
                for c in window
            ]
        )
        return Window(
            t=np.array([c.pred.t for c in window]),
            t_from=np.array([c.t_from for c in window]),
            x_from=np.array([c.pred.x_from for c in window]),
            u=np.array([c.pred.steps[0][1] for c in window]),
            d0=np.array([c.pred.steps[0][2] for c in window]),
            d1=np.array([c.pred.d_now for c in window]),
            y_pred=np.array([c.pred.y_pred for c in window]),
            r=r,
            y_meas=np.array([[c.readings.get(ch, nan) for ch in self.channels] for c in window]),
            channels=self.channels,
            sigma=self.sigma,
        )


def _finite(v: float | np.floating[Any]) -> float | None:
    return float(v) if math.isfinite(v) else None
