"""An offline HIL campaign: a controller in closed loop with a rig, on every uncertainty sample.

For each sample the rig is armed at the scenario's start in the model's initial
state; every cycle the twin reads the state from the rig's outputs, the
controller plans, and its first move is applied to the rig for one cycle (a
failed solve holds the previous inputs and is counted).  The closed-loop trace
of each sample is then judged by the scenario's specs, the same objects the
runtime uses, and summarised with KPIs.  The controller runs without the gate,
so the campaign measures the controller itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from parallelcity.decide.control import Controller
from parallelcity.errors import PluginError
from parallelcity.scenario.definition import Scenario
from parallelcity.specs import SpecResult, worst
from parallelcity.twin.model import Array
from parallelcity.twin.twin import Twin


@runtime_checkable
class SteppedRig(Protocol):
    """A rig driven step by step through its state machine (what ``verify`` needs of
    ``RigKind.verification_rig``).

    ``parallelcity.verify.machine.RigMachine`` is one."""

    name: str

    @property
    def samples(self) -> int: ...

    def arm(self, x0: Array, t0: float, sample: int = 0) -> None: ...

    def apply(self, u: Array, d: Array) -> None: ...

    def advance(self, dt: float) -> None: ...

    def read(self) -> Array: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class CampaignResult:
    scenario: Scenario
    rig: str
    controller: str
    samples: list[int]
    t0: float
    dt: float
    u: Array  # (samples, cycles, nu)
    y: Array  # (samples, cycles + 1, ny)
    per_sample: list[list[SpecResult]]
    solve_s: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def results(self) -> list[SpecResult]:
        return worst(self.per_sample)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def band_violation(self) -> list[float]:
        """Per sample: the model kind's band KPI, the time integral (hours) of the distance
        outside the bands (no margin), over the whole run."""
        specs = self.scenario.safety_specs()
        out = []
        for y in self.y:
            total = 0.0
            for band in specs.bands:
                j = specs.output_names.index(band.output)
                for k in range(y.shape[0] - 1):
                    lo, hi = band.limits(self.t0 + k * self.dt)
                    v = float(y[k, j])
                    excess = max(0.0, lo - v, v - hi) if math.isfinite(v) else 0.0
                    total += excess * self.dt / 3600.0
            out.append(total)
        return out

    def totals(self) -> dict[str, list[float]]:
        """Per total the model kind declares that the rig reports: its value per sample."""
        model = self.scenario.model
        out: dict[str, list[float]] = {}
        for total in model.report.totals:
            j = model.index("outputs", total.output)
            scale = self.dt / 3600.0 if total.per_hour else self.dt
            if np.isfinite(self.y[:, :-1, j]).all():
                out[total.label] = [float(np.sum(y[:-1, j]) * scale) for y in self.y]
        return out


ProgressFn = Callable[[int, int], None]


def run_campaign(
    scenario: Scenario,
    rig: SteppedRig,
    controller: Controller,
    controller_name: str,
    *,
    cycles: int,
    samples: Sequence[int],
    progress: ProgressFn | None = None,
) -> CampaignResult:
    model, meta = scenario.model, scenario.meta
    specs = scenario.safety_specs()
    dt, horizon = meta.cycle_s, meta.horizon_steps
    twin = Twin(model, specs, dt, horizon)
    controller.setup(specs.control_problem(model, dt, horizon))
    t0 = meta.start_epoch
    state_cols = [model.outputs.index(model.state_outputs[s]) for s in model.states]
    us = np.empty((len(samples), cycles, model.nu))
    ys = np.empty((len(samples), cycles + 1, model.ny))
    solve_s: list[float] = []
    failures = 0
    per_sample: list[list[SpecResult]] = []
    for i, s in enumerate(samples):
        rig.arm(model.x0, t0, s)
        u_prev = np.array(model.u0, dtype=float)
        try:
            for k in range(cycles):
                t = t0 + k * dt
                y_now = rig.read()
                x = y_now[state_cols]
                inp = twin.control_input(t, x, u_prev)
                started = time.perf_counter()
                result = controller.step(inp)
                solve_s.append(time.perf_counter() - started)
                if result.status.usable and np.all(np.isfinite(result.u_plan[0])):
                    u = np.asarray(result.u_plan[0], dtype=float)
                else:
                    failures += 1
                    u = u_prev
                rig.apply(u, model.forecast(t, 1, dt)[0])
                ys[i, k] = rig.read()
                us[i, k] = u
                rig.advance(dt)
                u_prev = u
                if progress:
                    progress(i * cycles + k + 1, len(samples) * cycles)
            ys[i, cycles] = rig.read()
        finally:
            rig.finish()
        per_sample.append(specs.robustness(t0, model.u0, us[i], ys[i], dt, s))
    return CampaignResult(
        scenario,
        rig.name,
        controller_name,
        list(samples),
        t0,
        dt,
        us,
        ys,
        per_sample,
        solve_s,
        failures,
    )


def report_lines(res: CampaignResult) -> list[str]:
    meta = res.scenario.meta
    lines = [
        f"verify {meta.name}: controller {res.controller} on {res.rig}, "
        f"{len(res.samples)} sample(s) x {res.u.shape[1]} cycles of {res.dt:g} s",
        "",
        f"{'spec':<44} {'result':<6} {'robustness':>11} {'margin':>7}  worst at",
    ]
    for r in res.results:
        at = time.strftime("%a %H:%M", time.gmtime(res.t0 + r.step * res.dt))
        rob = "never decided" if math.isinf(r.robustness) else f"{r.robustness:+11.3f}"
        lines.append(
            f"{r.name:<44} {'pass' if r.passed else 'FAIL':<6} {rob:>11} {r.margin:7.3g}  "
            f"sample {r.sample}, {at}"
        )
    spec = res.scenario.model.report
    band, unit = res.band_violation(), spec.band_unit
    solve = np.array(res.solve_s) * 1000.0 if res.solve_s else np.array([math.nan])
    lines += [
        "",
        f"{spec.band_kpi:<18} mean {np.mean(band):.2f} {unit}, worst {np.max(band):.2f} {unit} "
        f"(sample {res.samples[int(np.argmax(band))]})",
    ]
    units = {t.label: t.unit for t in spec.totals}
    for label, v in res.totals().items():
        u = units[label]
        lines.append(f"{label:<18} mean {np.mean(v):.0f} {u}, max {np.max(v):.0f} {u}")
    lines += [
        f"solver failures    {res.failures} of {len(res.solve_s)} solves",
        f"solve time         p50 {np.percentile(solve, 50):.1f} ms   "
        f"p99 {np.percentile(solve, 99):.1f} ms",
        f"verdict            {'PASS' if res.passed else 'FAIL'}: "
        f"{sum(r.passed for r in res.results)} of {len(res.results)} specs hold on every sample",
    ]
    return lines


def plot(res: CampaignResult, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = res.scenario.safety_specs()
    model = res.scenario.model
    n = res.u.shape[1]
    hours = np.arange(n + 1) * res.dt / 3600.0
    rows = len(specs.bands) + 2
    fig = plt.figure(figsize=(10, 2.2 * rows))
    axes = [fig.add_subplot(rows, 1, 1)]
    for i in range(2, rows):
        axes.append(fig.add_subplot(rows, 1, i, sharex=axes[0]))
    axes.append(fig.add_subplot(rows, 1, rows))  # robustness: its own x axis
    for ax, band in zip(axes, specs.bands, strict=False):
        j = model.outputs.index(band.output)
        lo, hi = np.array([band.limits(res.t0 + k * res.dt) for k in range(n + 1)]).T
        ax.fill_between(hours, lo, hi, color="tab:green", alpha=0.15, step="post", label="band")
        for i, s in enumerate(res.samples):
            ax.plot(hours, res.y[i, :, j], lw=1, alpha=0.8, label=f"sample {s}" if i < 8 else None)
        ax.set_ylabel(band.output, fontsize=8)
    ax_u = axes[-2]
    for c, name in enumerate(model.inputs):
        ax_u.step(hours[:-1], res.u[0, :, c], where="post", lw=1, label=name)
    ax_u.set_ylabel("inputs (sample 0)", fontsize=8)
    ax_u.set_yscale("symlog")
    ax_u.legend(fontsize=6, ncol=2)
    ax_r = axes[-1]
    rs = res.results
    finite = [r for r in rs if math.isfinite(r.robustness)]
    ax_r.barh(
        [r.name for r in finite],
        [r.robustness - r.margin for r in finite],
        color=["tab:green" if r.passed else "tab:red" for r in finite],
    )
    ax_r.axvline(0, color="k", lw=0.8)
    ax_r.tick_params(axis="y", labelsize=5)
    ax_r.set_xlabel("robustness above margin (worst sample)")
    ax_u.set_xlabel("hours from start")
    axes[0].legend(fontsize=6, ncol=4)
    fig.suptitle(f"{res.scenario.meta.name}: {res.controller} on {res.rig}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


EXIT_PASS, EXIT_FAIL = 0, 5


def rig_config_for(
    scenario: Scenario, kind: str, config_file: Path | None, samples: int | None
) -> BaseModel:
    """The rig configuration: the scenario's ``[rig]`` if it is of ``kind``, else the file's
    (a TOML table of the kind's keys), else the kind's defaults; ``samples`` overrides."""

    from pydantic import ValidationError

    from parallelcity import plugins
    from parallelcity.errors import ScenarioError
    from parallelcity.scenario.definition import describe_error
    from parallelcity.toml_file import parse_toml, read_text_bounded
    from parallelcity.verify.rig import BASE_DIR

    rig_kind = plugins.rig_kind(kind)
    where = str(config_file or scenario.path)
    try:
        if config_file is not None:
            data = parse_toml(read_text_bounded(config_file))
            data.setdefault("kind", kind)
            cfg = rig_kind.Config.model_validate(data, context={BASE_DIR: config_file.parent})
        elif kind == scenario.file.rig.kind:
            cfg = scenario.rig_config
        else:
            base = {BASE_DIR: scenario.path.parent}
            cfg = rig_kind.Config.model_validate({"kind": kind}, context=base)
    except ValidationError as exc:  # before ValueError: it is one
        raise ScenarioError(where, [describe_error(e, ("rig",)) for e in exc.errors()]) from exc
    except (OSError, ValueError) as exc:
        raise ScenarioError(where, [f"cannot read the rig config: {exc}"]) from exc
    if samples is not None:
        if "samples" not in type(cfg).model_fields:
            raise ScenarioError(where, [f"rig kind {kind!r} has no uncertainty samples"])
        cfg = cfg.model_copy(update={"samples": samples})
    problems = rig_kind.check(cfg, scenario.model)
    if problems:
        raise ScenarioError(where, problems)
    return cfg


def verify_command(
    scenario_path: Path,
    kind: str,
    *,
    rig_config: Path | None = None,
    samples: int | None = None,
    cycles: int | None = None,
    controller_kind: str | None = None,
    out_dir: Path = Path("runs"),
    echo: Callable[[str], None] = print,
) -> int:
    """``parallelcity verify``: run the campaign, print the report, write the plot."""
    from parallelcity import plugins
    from parallelcity.decide.choice import controller_settings
    from parallelcity.scenario.definition import load_scenario

    scenario = load_scenario(scenario_path)
    ckind, ccfg = controller_settings(scenario, controller_kind)
    cfg = rig_config_for(scenario, kind, rig_config, samples)
    rig = plugins.rig_kind(kind).verification_rig(cfg, scenario.model)
    if not isinstance(rig, SteppedRig):
        raise PluginError(
            f"rig kind {kind!r} cannot be stepped through a campaign: its rig lacks "
            + ", ".join(plugins.missing_members(rig, SteppedRig))
        )
    try:
        controller = plugins.controller_kind(ckind).create(ccfg)
        res = run_campaign(
            scenario,
            rig,
            controller,
            ckind,
            cycles=cycles or scenario.meta.horizon_steps,
            samples=range(rig.samples),
        )
    finally:
        rig.close()
    for line in report_lines(res):
        echo(line)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = plot(res, out_dir / f"verify-{scenario.meta.name}-{kind}-{stamp}.png")
    echo(f"plot               {path}")
    return EXIT_PASS if res.passed else EXIT_FAIL
