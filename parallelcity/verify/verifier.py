"""The verifier: try a plan on a rig, on every uncertainty sample, and judge it by the specs.

Stages, each with the same ``SafetySpecs``:

1. the twin's screen: input bounds and ramp limits, and interlocks and temporal
   specs that involve inputs only.  A plan breaking one never reaches a rig,
   unless every break is on an input the scenario lets the verifier clip; then
   the clipped plan is what is tried (verdict ``clipped``);
2. the rig: the plan is rolled out on each of the rig's uncertainty samples
   (serially in this thread, or on a process pool), within a deadline;
3. the judgement: bands, interlocks and temporal specs on every sample's trace.
   The verdict approves only if every sample passes every spec.

A ``Verdict`` is a value carrying its evidence (the worst sample's trace, every
violation with its sample and step, each spec's worst robustness) and a digest
that the command sent to the field refers to.  Pure apart from the rig it is
handed and the pool, if any.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from parallelcity.specs import SafetySpecs, SpecResult, Violation, worst
from parallelcity.twin.model import Array
from parallelcity.verify.rig import Rig, UncertainRig

log = logging.getLogger(__name__)


class VerdictStatus(StrEnum):
    APPROVED = "approved"
    CLIPPED = "clipped"  # approved after clipping inputs the scenario lets be clipped
    REJECTED = "rejected"


@dataclass(frozen=True, eq=False)
class Verdict:
    approved: bool
    source: str  # which controller proposed the plan
    rig: str
    t0: float
    u_plan: Array  # the plan judged (clipped, if the verdict is clipped)
    y_rig: Array  # evidence: the worst sample's outputs under the plan (empty if not run)
    violations: tuple[Violation, ...]
    note: str = ""
    clipped: bool = False
    u_proposed: Array | None = None  # the controller's plan before clipping
    results: tuple[SpecResult, ...] = ()  # each spec's worst robustness over the samples
    samples: int = 0  # samples the plan was rolled out on
    worst_sample: int = 0  # the sample of y_rig
    dt: float = 0.0  # step of the trace, for the times in the evidence

    @property
    def status(self) -> VerdictStatus:
        if not self.approved:
            return VerdictStatus.REJECTED
        return VerdictStatus.CLIPPED if self.clipped else VerdictStatus.APPROVED

    @property
    def failed_samples(self) -> tuple[int, ...]:
        return tuple(sorted({v.sample for v in self.violations if v.spec not in ("bound", "rate")}))

    @property
    def digest(self) -> str:
        """sha256 of the verdict's canonical JSON; commands carry it to the field."""
        body: dict[str, Any] = {
            "approved": self.approved,
            "source": self.source,
            "rig": self.rig,
            "t0": self.t0,
            "u_plan": np.round(self.u_plan, 9).tolist(),
            "violations": [v.describe() for v in self.violations],
            "note": self.note,
            "status": self.status.value,
            "samples": self.samples,
        }
        if self.clipped and self.u_proposed is not None:
            body["u_proposed"] = np.round(self.u_proposed, 9).tolist()
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def summary(self) -> str:
        on = f"{self.rig} ({self.samples} sample{'s' if self.samples != 1 else ''})"
        if self.approved:
            return f"{self.status.value} on {on}"
        shown = "; ".join(v.describe() for v in self.violations[:3])
        more = f" (+{len(self.violations) - 3} more)" if len(self.violations) > 3 else ""
        return f"rejected on {on}: {self.note or shown}{more}"

    def evidence(self) -> dict[str, Any]:
        """What the journal keeps beside the verdict (JSON-ready, NaN and inf as None)."""
        return {
            "status": self.status.value,
            "samples": self.samples,
            "worst_sample": self.worst_sample,
            "failed_samples": list(self.failed_samples),
            "specs": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "robustness": r.robustness,
                    "margin": r.margin,
                    "step": r.step,
                    "t": self.t0 + r.step * self.dt,
                    "sample": r.sample,
                    "passed": r.passed,
                }
                for r in self.results
            ],
            "u_proposed": None if self.u_proposed is None else self.u_proposed.tolist(),
        }


# -- running samples -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Trial:
    """One plan to try: the same for every sample."""

    x0: Array
    u_prev: Array
    plan: Array
    disturbances: Array
    t0: float
    dt: float


@dataclass(frozen=True)
class Judgement:
    """One sample's trace judged: broken specs, and every spec's robustness."""

    violations: tuple[Violation, ...]
    results: tuple[SpecResult, ...]


@dataclass
class SampleRun:
    """Traces and judgements by sample; errors by sample; samples not run by the deadline."""

    traces: dict[int, Array] = field(default_factory=dict)
    judgements: dict[int, Judgement] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    missed: list[int] = field(default_factory=list)


class SampleRunner(Protocol):
    def run(self, samples: Sequence[int], trial: Trial, deadline: float | None) -> SampleRun: ...


def rig_samples(rig: Rig) -> int:
    return int(rig.samples) if isinstance(rig, UncertainRig) else 1


def _rollout_one(rig: Rig, sample: int, t: Trial) -> Array:
    if isinstance(rig, UncertainRig):
        y = rig.rollout_sample(sample, t.x0, t.plan, t.disturbances, t.t0, t.dt)
    else:
        y = rig.rollout(t.x0, t.plan, t.disturbances, t.t0, t.dt)
    return np.asarray(y, dtype=float)


def judge(specs: SafetySpecs, t: Trial, y: Array, sample: int) -> Judgement:
    """Bands, interlocks and temporal specs on one sample's trace, and all robustness."""
    violations = [dataclasses.replace(v, sample=sample) for v in specs.check_outputs(t.t0, y, t.dt)]
    violations += specs.check_logic(t.plan, y, t.dt, sample)
    results = specs.robustness(t.t0, t.u_prev, t.plan, y, t.dt, sample)
    return Judgement(tuple(violations), tuple(results))


def _run_samples(
    rig: Rig, specs: SafetySpecs, samples: Sequence[int], t: Trial, deadline: float | None
) -> SampleRun:
    out = SampleRun()
    shape = (t.plan.shape[0] + 1, len(specs.output_names))
    for i, s in enumerate(samples):
        if deadline is not None and time.monotonic() >= deadline:
            out.missed.extend(samples[i:])
            break
        try:
            y = _rollout_one(rig, s, t)
        except Exception as exc:  # any rig failure means the plan is untried on it
            out.errors[s] = f"{type(exc).__name__}: {exc}"
            continue
        out.traces[s] = y
        if y.shape != shape:
            out.errors[s] = f"rig returned an unusable trace of shape {y.shape}"
            continue
        out.judgements[s] = judge(specs, t, y, s)
    return out


class SerialSamples:
    """Samples one after another on the verifier's own rig, in the calling thread."""

    def __init__(self, rig: Rig, specs: SafetySpecs) -> None:
        self.rig = rig
        self.specs = specs

    def run(self, samples: Sequence[int], trial: Trial, deadline: float | None) -> SampleRun:
        return _run_samples(self.rig, self.specs, samples, trial, deadline)


@dataclass(frozen=True)
class RigRecipe:
    """What a worker process needs to build the same rig and specs: plain, picklable values."""

    scenario_text: str
    scenario_path: str
    kind: str
    config: dict[str, Any]

    @classmethod
    def from_scenario(
        cls,
        scenario: Any,
        *,
        kind: str | None = None,
        config: dict[str, Any] | None = None,
        text: str | None = None,
    ) -> RigRecipe:
        rig_kind = kind or scenario.file.rig.kind
        if config is None:
            config = scenario.rig_config.model_dump(mode="json")
        src = text if text is not None else Path(scenario.path).read_text(encoding="utf-8")
        return cls(src, str(scenario.path), rig_kind, dict(config))

    def build(self) -> tuple[Rig, SafetySpecs]:
        from parallelcity import plugins
        from parallelcity.scenario.definition import parse_scenario

        scenario = parse_scenario(self.scenario_text, self.scenario_path)
        kind = plugins.rig_kind(self.kind)
        cfg = kind.Config.model_validate(self.config)
        rig: Rig = kind.verification_rig(cfg, scenario.model)
        return rig, scenario.safety_specs()


_WORKER: tuple[Rig, SafetySpecs] | None = None


def _worker_init(recipe: RigRecipe) -> None:
    global _WORKER
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    _WORKER = recipe.build()


def _worker_ready() -> int:
    return rig_samples(_WORKER[0]) if _WORKER is not None else -1


def _worker_run(samples: list[int], trial: Trial) -> SampleRun:
    assert _WORKER is not None, "worker started without its rig"
    return _run_samples(_WORKER[0], _WORKER[1], samples, trial, None)


class PoolSamples:
    """Samples in chunks on a pool of processes, each holding its own rig and specs.

    Processes are spawned (never forked: the runtime has sockets and threads) and
    build their rig and specs from a ``RigRecipe`` once; per verification only the
    plan goes out and traces with their judgements come back.  A chunk still running
    when the deadline passes is abandoned: its samples count as missed.
    """

    def __init__(self, recipe: RigRecipe, workers: int, *, start_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"a pool needs at least one worker, got {workers}")
        self.workers = workers
        self._pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(recipe,),
        )
        # start every worker now, so the first cycle does not pay for the imports
        ready = [self._pool.submit(_worker_ready) for _ in range(workers)]
        for f in ready:
            f.result(timeout=start_timeout_s)

    def run(self, samples: Sequence[int], trial: Trial, deadline: float | None) -> SampleRun:
        out = SampleRun()
        futures = {
            self._pool.submit(_worker_run, c, trial): c
            for c in _chunks(list(samples), self.workers)
        }
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = cf.wait(futures, timeout=timeout)
        for f in pending:
            f.cancel()
            out.missed.extend(futures[f])
        for f in done:
            try:
                part: SampleRun = f.result()
            except Exception as exc:  # a worker died: its samples are untried
                for s in futures[f]:
                    out.errors[s] = f"worker failed: {type(exc).__name__}: {exc}"
                continue
            out.traces.update(part.traces)
            out.judgements.update(part.judgements)
            out.errors.update(part.errors)
        out.missed.sort()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PoolSamples:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chunks(items: list[int], n: int) -> list[list[int]]:
    """``n`` contiguous runs of samples (one per worker: each task costs a round trip)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, at = [], 0
    for i in range(n):
        step = size + (1 if i < extra else 0)
        out.append(items[at : at + step])
        at += step
    return out


# -- the verifier --------------------------------------------------------------------------


class Verifier:
    """Judges plans: input specs in the twin, then every spec on every rig sample."""

    def __init__(
        self,
        specs: SafetySpecs,
        rig: Rig,
        dt: float,
        *,
        runner: SampleRunner | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.specs = specs
        self.rig = rig
        self.dt = dt
        self.samples = rig_samples(rig)
        self.runner: SampleRunner = runner or SerialSamples(rig, specs)
        self.deadline_s = deadline_s  # wall seconds one verification may take (None: no limit)

    def _verdict(self, approved: bool, **kw: Any) -> Verdict:
        return Verdict(approved, dt=self.dt, **kw)

    def verify(
        self,
        *,
        source: str,
        t0: float,
        x0: Array,
        u_prev: Array,
        u_plan: Array,
        disturbances: Array,
        deadline_s: float | None = None,
    ) -> Verdict:
        """Judge ``u_plan``; ``deadline_s`` (wall seconds from now) tightens the verifier's own."""
        started = time.monotonic()
        limits = [s for s in (self.deadline_s, deadline_s) if s is not None]
        deadline = started + min(limits) if limits else None
        specs, dt = self.specs, self.dt
        proposed = np.atleast_2d(np.asarray(u_plan, dtype=float))
        plan = proposed
        empty = np.empty((0, len(specs.output_names)))
        common: dict[str, Any] = {"source": source, "rig": self.rig.name, "t0": t0}
        violations = specs.check_inputs(u_prev, plan, dt)
        clipped = False
        if violations and np.all(np.isfinite(plan)) and any(lim.clip for lim in specs.inputs):
            candidate = specs.clip_plan(u_prev, plan, dt)
            if not specs.check_inputs(u_prev, candidate, dt):
                plan, violations, clipped = candidate, [], True
        if not np.all(np.isfinite(plan)):
            return self._verdict(
                False,
                u_plan=plan,
                y_rig=empty,
                violations=tuple(violations),
                note="plan contains non-finite inputs",
                **common,
            )
        violations += specs.check_logic(plan, None, dt)
        extra: dict[str, Any] = {"clipped": clipped, "u_proposed": proposed if clipped else None}
        if violations:
            return self._verdict(
                False,
                u_plan=plan,
                y_rig=empty,
                violations=tuple(violations),
                note="",
                results=tuple(specs.robustness(t0, u_prev, plan, None, dt)),
                **common,
                **extra,
            )
        d = np.atleast_2d(np.asarray(disturbances, dtype=float))
        trial = Trial(np.asarray(x0, dtype=float), np.asarray(u_prev, dtype=float), plan, d, t0, dt)
        run = self.runner.run(list(range(self.samples)), trial, deadline)
        if run.missed:
            took = time.monotonic() - started
            return self._verdict(
                False,
                u_plan=plan,
                y_rig=empty,
                violations=(),
                note=f"verification deadline missed: {len(run.traces) + len(run.errors)} of "
                f"{self.samples} samples done in {took:.3f} s",
                samples=len(run.traces),
                **common,
                **extra,
            )
        if run.errors:
            s, why = min(run.errors.items())
            return self._verdict(
                False,
                u_plan=plan,
                y_rig=run.traces.get(s, empty),
                violations=(),
                note=f"rig failed on sample {s}: {why}",
                samples=len(run.traces),
                worst_sample=s,
                **common,
                **extra,
            )
        per_sample: list[list[SpecResult]] = []
        for s in sorted(run.judgements):
            violations += run.judgements[s].violations
            per_sample.append(list(run.judgements[s].results))
        results = worst(per_sample)
        if violations:
            worst_v = max(violations, key=lambda v: (v.excess, -v.sample))
            worst_s = worst_v.sample
        else:
            slack = [
                min((r.robustness - r.margin for r in rs), default=math.inf) for rs in per_sample
            ]
            worst_s = sorted(run.traces)[int(np.argmin(slack))] if slack else 0
        return self._verdict(
            not violations,
            u_plan=plan,
            y_rig=run.traces[worst_s],
            violations=tuple(violations),
            results=tuple(results),
            samples=len(run.traces),
            worst_sample=worst_s,
            **common,
            **extra,
        )
