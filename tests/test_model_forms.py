"""Model forms: ODEs and discrete maps behind one one-step map, plants that bring their
own simulator, and generic code that names no domain (the model kind declares it)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from parallelcity.controllers import nmpc
from parallelcity.hil.plant import DisturbanceError, PlantSimulator

from parallelcity import plugins
from parallelcity.errors import ScenarioError
from parallelcity.models import pump_tank
from parallelcity.scenario.definition import parse_scenario
from parallelcity.twin.estimate import ExtendedKalmanFilter
from parallelcity.twin.model import Array, FormSimulator, ModelForm, SubsystemModel

ROOT = Path(__file__).resolve().parents[1]
DT = 900.0


@pytest.fixture(scope="module")
def tank() -> SubsystemModel:
    return pump_tank.build(pump_tank.Config())


def test_a_discrete_model_composes_its_map_over_a_period(tank) -> None:
    assert tank.form is ModelForm.DISCRETE and tank.steps_in(DT) == 3
    x, u, d, p = tank.x0, np.array([1.0]), np.array([30.0, 0.1]), tank.nominal
    once = np.asarray(tank.f(x, u, d, p)).ravel()
    thrice = np.asarray(tank.f(tank.f(once, u, d, p), u, d, p)).ravel()
    np.testing.assert_allclose(np.asarray(tank.step_function(DT)(x, u, d, p)).ravel(), thrice)
    # 3 steps of 300 s, 60 m3/h in, 30 out, 50 m2: +0.15 m
    assert thrice[0] == pytest.approx(2.15, abs=1e-12)
    with pytest.raises(ValueError, match="not a whole number of its steps"):
        tank.step_function(1000.0)
    with pytest.raises(ValueError, match="discrete-time"):
        _ = tank.ode


def test_an_ode_step_is_rk4_over_the_period(dh) -> None:
    m = dh.model
    x, u, d, p = m.x0, m.u0, m.forecast(dh.meta.start_epoch, 1, DT)[0], m.nominal
    xk, h = np.array(x, dtype=float), DT / 4

    def f(z: Array) -> Array:
        return np.asarray(m.ode(z, u, d, p), dtype=float).ravel()

    for _ in range(4):
        k1 = f(xk)
        k2 = f(xk + h / 2 * k1)
        k3 = f(xk + h / 2 * k2)
        k4 = f(xk + h * k3)
        xk = xk + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    got = np.asarray(m.step_function(DT)(x, u, d, p)).ravel()
    np.testing.assert_allclose(got, xk, rtol=1e-13)


def test_a_discrete_plant_steps_at_its_own_boundaries(tank) -> None:
    sim = FormSimulator(tank, tank.nominal)
    sim.reset(np.array([2.0]), 0.0)
    u, d = np.array([1.0]), np.array([30.0, 0.1])
    sim.step(u, d, 200.0)
    assert sim.state[0] == 2.0  # no boundary crossed yet
    sim.step(u, d, 200.0)  # 400 s: one step of 300 s, 100 s carried over
    assert sim.state[0] == pytest.approx(2.05, abs=1e-12)
    sim.step(u, d, 200.0)
    assert sim.state[0] == pytest.approx(2.10, abs=1e-12)
    np.testing.assert_allclose(sim.outputs(u, d), [2.10, 30.0, 3.0])


class ClampedTank:
    """An external tank simulator: unlike the twin's linear map, it cannot go below empty."""

    def __init__(self, params: Array) -> None:
        self.area, self.flow, self.kw = (float(v) for v in params)
        self.level = float("nan")

    @property
    def state(self) -> Array:
        return np.array([self.level])

    def reset(self, x0: Array, t0: float) -> None:
        self.level = float(x0[0])

    def step(self, u: Array, d: Array, dt: float) -> None:
        self.level = max(0.0, self.level + dt * (self.flow * u[0] - d[0]) / (3600 * self.area))

    def outputs(self, u: Array, d: Array) -> Array:
        return np.array([self.level, self.kw * u[0], self.kw * u[0] * d[1]])


def test_a_plant_with_its_own_simulator_drives_the_rigs_not_the_twin(tank) -> None:
    backed = dataclasses.replace(tank, simulator=ClampedTank)
    n = 16  # four hours with the pump off: 30 m3/h drains 2 m in under 3.5 h
    plan, dist = np.zeros((n, 1)), np.tile([30.0, 0.1], (n, 1))
    _, twin_y = backed.simulate(backed.x0, plan, dist, backed.nominal, DT)
    assert twin_y[-1, 0] < -0.3  # the twin's CasADi form plans on, below empty
    rig_kind = plugins.rig_kind("simulated")
    cfg = rig_kind.Config(seed=1, field_seed=2)
    for whole_trace in (True, False):
        rig = rig_kind.verification_rig(cfg.model_copy(update={"whole_trace": whole_trace}), backed)
        ys = rig.rollout(backed.x0, plan, dist, 0.0, DT)
        assert ys.shape == (n + 1, 3) and ys[-1, 0] == 0.0
        np.testing.assert_allclose(ys[:7, 0], twin_y[:7, 0], atol=1e-12)  # until it empties
    plant = PlantSimulator(backed, backed.nominal, lambda t: np.array([30.0, 0.1]), [2.0], [0.0], 0)
    plant.advance(5 * 3600.0)
    assert plant.outputs()[0] == 0.0
    # the estimator and the controllers still get the CasADi form
    ExtendedKalmanFilter(backed, DT)


def test_collocation_needs_an_ode(tank) -> None:
    from parallelcity.scenario.definition import validation_problem

    problem = validation_problem(None, tank)
    problems = nmpc.Config(method="collocation").problems(problem)
    assert any("collocation needs an ODE model" in p for p in problems)
    assert not any("collocation" in p for p in nmpc.Config().problems(problem))


def test_validate_refuses_a_cycle_that_is_not_whole_model_steps() -> None:
    text = (ROOT / "scenarios" / "pump_tank.toml").read_text()
    bad = text.replace("cycle_s = 900 ", "cycle_s = 1000 ", 1)
    assert bad != text
    with pytest.raises(ScenarioError) as err:
        parse_scenario(bad, "bad.toml")
    assert any(p.startswith("scenario.cycle_s: ") for p in err.value.problems), err.value.problems


def test_the_rig_truth_clips_what_the_model_declares_nonnegative(dh, tank) -> None:
    m = dh.model
    err = DisturbanceError(m, {"weather.I_sol": 500.0, "weather.T_out": 5.0}, seed=3)
    assert err.clip == {m.index("disturbances", n) for n in m.nonnegative}
    assert "weather.T_out" not in m.nonnegative
    assert set(tank.nonnegative) == {"tank.demand", "tariff.price"}


# Modules that serve every model kind: none may name a district-heating signal or KPI.
GENERIC = [
    "parallelcity/cli.py",
    "parallelcity/record/report.py",
    "parallelcity/record/plot.py",
    "parallelcity/verify/campaign.py",
    "hil/plant.py",
    "hil/simulated.py",
    *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "parallelcity" / "twin").glob("*.py"))),
]
SIGNALS = re.compile(r"[\"'`]plant\.|T_supply|T_zone|T_out\b|I_sol|Q_int|K·h|kWh")
WORDS = re.compile(
    r"comfort|fuel|weather|kelvin|district|heating|building|irradiance|solar|zone temp",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", GENERIC)
def test_generic_modules_name_no_domain(path: str) -> None:
    hits = [
        f"{path}:{i}: {line.strip()}"
        for i, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if SIGNALS.search(line) or WORDS.search(line)
    ]
    assert not hits, "\n".join(hits)


def test_each_kind_declares_its_kpis_and_baseline(dh, tank) -> None:
    for m, band_kpi, total, baseline in (
        (dh.model, "comfort violation", "energy", "pi"),
        (tank, "level violation", "cost", "hysteresis"),
    ):
        spec = m.report
        assert spec.band_kpi == band_kpi and baseline == spec.baseline
        assert total in [t.label for t in spec.totals]
        plugins.controller_kind(spec.baseline)  # an installed kind
