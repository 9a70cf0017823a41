"""The EKF (parallelcity.twin.estimate) against the pure plant simulator with a model mismatch.

The plant has its own parameters (each building's UA, capacity and heat exchanger
within +-15 % of the twin's), a disturbance truth that departs from the forecast,
and internal gains the forecast does not know about.  Measurements carry seeded
noise.  Bounds stated here are the ones the tests assert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from parallelcity.hil.plant import PlantSimulator, forecast_truth, perturbed_params

from parallelcity.field.snapshot import PointSpec, Reading, Snapshot, assess
from parallelcity.scenario.definition import Scenario
from parallelcity.twin.estimate import ExtendedKalmanFilter
from parallelcity.twin.model import Array, SubsystemModel

NOISE = {"T_zone": 0.1, "T_supply": 0.2, "Q_heat": 0.5, "T_out": 0.1, "fuel_kw": 2.0}
NOISE["pump_kw"] = 0.05
SPREAD = ["ua_kw_per_k", "c_mj_per_k", "ua_hx_kw_per_k"]

# A fault: (t, true value) -> reported value, or None for "no fresh value".
Fault = Callable[[float, float], float | None]


def noise_of(name: str) -> float:
    return NOISE[name.split(".")[-1]]


@dataclass
class Sim:
    """The plant under a simple heating law, measured through faultable, noisy points."""

    scenario: Scenario
    extra_gains: dict[str, float] = field(default_factory=dict)  # building -> kW, unforecast
    gains_from: float = 0.0  # seconds after the start
    seed: int = 5
    params: Array | None = None

    def __post_init__(self) -> None:
        model = self.scenario.model
        self.model: SubsystemModel = model
        self.dt = self.scenario.meta.cycle_s
        self.t0 = self.scenario.meta.start_epoch
        base = forecast_truth(model, {"weather.T_out": 1.0, "weather.I_sol": 40.0}, 11)
        extra = np.zeros(model.nd)
        for b, kw in self.extra_gains.items():
            extra[model.index("disturbances", f"{b}.Q_int")] = kw

        def truth(t: float) -> Array:
            d = base(t)
            return d + extra if t >= self.t0 + self.gains_from else d

        params = self.params
        if params is None:
            params = perturbed_params(model, 0.15, SPREAD, seed=11)
        self.plant = PlantSimulator(model, params, truth, model.x0, model.u0, self.t0, 300.0)
        self.specs = {
            p.name: PointSpec(p.name, p.max_age_s, p.required) for p in self.scenario.field.points
        }
        self.rng = np.random.default_rng(self.seed)
        self.faults: dict[str, Fault] = {}
        self.u = np.array(model.u0, dtype=float)
        self.reported: dict[str, Reading] = {}
        self.k = 0

    @property
    def t(self) -> float:
        return self.plant.t

    def snapshot(self) -> Snapshot:
        y = self.plant.outputs()
        t = self.t
        for name in self.specs:
            true = float(y[self.model.index("outputs", name)])
            value: float | None = true + float(self.rng.normal(0.0, noise_of(name)))
            fault = self.faults.get(name)
            if fault is not None:
                value = fault(t, value)
            if value is not None:
                self.reported[name] = Reading(value, t)
        return assess(self.specs, self.reported, t)

    def control(self, snap: Snapshot) -> Array:
        """Zones to 21 C by day, 19 C at night; supply temperature from the outdoor one."""
        hour = ((self.t % 86400.0) / 3600.0 + 1.0) % 24.0  # an hour ahead of the band
        target = 21.0 if 6.0 <= hour < 23.0 else 19.0
        u = self.u.copy()
        for i, name in enumerate(self.model.inputs):
            if name.endswith(".m_flow"):
                zone = snap.points[name.replace("m_flow", "T_zone")]
                if not zone.stale and zone.reading is not None:
                    u[i] = float(np.clip(0.4 + 0.6 * (target - zone.reading.value), 0.02, 1.5))
            elif name == "plant.T_supply_set":
                out = snap.points["weather.T_out"]
                if not out.stale and out.reading is not None:
                    u[i] = float(np.clip(75.0 - out.reading.value, 60.0, 95.0))
        return u

    def advance(self, u: Array) -> None:
        self.u = np.asarray(u, dtype=float)
        self.plant.set_inputs(dict(zip(self.model.inputs, self.u, strict=True)))
        self.plant.advance(self.t + self.dt)
        self.k += 1


def ekf_for(model: SubsystemModel, dt: float) -> ExtendedKalmanFilter:
    buildings = [s.split(".")[0] for s in model.states if s.endswith(".T_zone")]
    return ExtendedKalmanFilter(
        model,
        dt,
        biases=[f"{b}.Q_int" for b in buildings],
        state_std={s: (0.05 if s.endswith("T_zone") else 0.5) for s in model.states},
        bias_std=0.3,  # kW per cycle: gains that drift over hours
        measurement_std={n: noise_of(n) for n in model.outputs if n.split(".")[-1] in NOISE},
        initial_std=1.0,
        initial_bias_std=3.0,
    )


def run_ekf(
    sim: Sim, ekf: ExtendedKalmanFilter, cycles: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Errors (estimate - truth) per cycle and state, raw measurement errors, bias estimates."""
    errors, raw, biases = [], [], []
    for _ in range(cycles):
        snap = sim.snapshot()
        est = ekf.step(sim.t, sim.u, snap)
        truth = sim.plant.state
        errors.append(est.x - truth)
        raw.append(
            [
                (snap.value(s) - truth[i]) if not snap.points[s].stale else np.nan
                for i, s in enumerate(sim.model.states)
            ]
        )
        biases.append(dict(est.biases))
        sim.advance(sim.control(snap))
    return np.array(errors), np.array(raw), biases


DAY = 96  # cycles of 15 minutes


def test_ekf_converges_under_model_mismatch_and_estimates_an_unmeasured_zone(
    dh: Scenario,
) -> None:
    """Bound: over the third day, RMS error < 0.15 K on the measured zones, < 0.3 K on the
    zone that has no temperature point at all and on the supply; the unforecast 4 kW of
    gains show up in that zone's offset."""
    sim = Sim(dh, extra_gains={"apartment": 4.0}, gains_from=6 * 3600.0)
    sim.faults["apartment.T_zone"] = lambda t, v: None  # never measured
    ekf = ekf_for(dh.model, sim.dt)
    errors, raw, biases = run_ekf(sim, ekf, 3 * DAY)
    last = errors[2 * DAY :]
    rms = np.sqrt(np.mean(last**2, axis=0))
    states = dict(zip(dh.model.states, rms, strict=True))
    assert states["apartment.T_zone"] < 0.3, states
    assert states["office.T_zone"] < 0.15 and states["school.T_zone"] < 0.15, states
    assert states["plant.T_supply"] < 0.3, states
    # where the model fits well the estimate beats reading the sensor directly (the office,
    # with its large window and small capacity, gets no better than its sensor)
    school = dh.model.index("states", "school.T_zone")
    raw_rms = np.sqrt(np.mean(raw[2 * DAY :, school] ** 2))
    assert states["school.T_zone"] < 0.7 * raw_rms, (states, raw_rms)
    # the unforecast 4 kW in the apartment shows up in its offset (the +-15 % UA and
    # capacity mismatch is folded in too, hence the tolerance)
    apartment = np.mean([b["apartment.Q_int"] for b in biases[2 * DAY :]])
    assert 3.0 < apartment < 5.0 + 0.15 * 2.5 * 22, apartment


def test_ekf_rides_through_a_missing_and_a_stale_point(dh: Scenario) -> None:
    """Bound: the office zone's point is gone for 6 h: the error stays < 1 K during the
    gap and is back < 0.2 K (RMS over the following 12 h) once it returns."""
    gap = (DAY + 32, DAY + 56)  # 08:00 to 14:00 on day two

    def gone(t: float, v: float) -> float | None:
        k = round((t - dh.meta.start_epoch) / dh.meta.cycle_s)
        return None if gap[0] <= k < gap[1] else v

    sim = Sim(dh)
    sim.faults["office.T_zone"] = gone
    ekf = ekf_for(dh.model, sim.dt)
    errors, raw, _ = run_ekf(sim, ekf, gap[1] + 48)
    office = dh.model.index("states", "office.T_zone")
    during = np.abs(errors[gap[0] : gap[1], office])
    assert np.all(np.isnan(raw[gap[0] + 8 : gap[1], office]))  # it really was stale
    assert during.max() < 1.0, during.max()
    after = errors[gap[1] : gap[1] + 48, office]
    assert np.sqrt(np.mean(after**2)) < 0.2


def test_ekf_rejects_unknown_names(dh: Scenario) -> None:
    with pytest.raises(ValueError, match="not a disturbance"):
        ExtendedKalmanFilter(dh.model, 900.0, biases=["apartment.T_zone"])
    with pytest.raises(ValueError, match="unknown names"):
        ExtendedKalmanFilter(dh.model, 900.0, measurement_std={"nope": 1.0})


def test_twin_with_an_estimator_has_a_state_where_a_point_is_stale(dh: Scenario) -> None:
    from parallelcity.twin.twin import Twin

    specs = dh.safety_specs()
    sim = Sim(dh)
    twin = Twin(dh.model, specs, sim.dt, 4, estimator=ekf_for(dh.model, sim.dt))
    plain = Twin(dh.model, specs, sim.dt, 4)
    for _ in range(DAY):
        snap = sim.snapshot()
        twin.estimate(snap)
        u = sim.control(snap)
        twin.control_input(sim.t, twin.estimator.x, u)  # what the cycle does: the inputs applied
        sim.advance(u)
    sim.faults["school.T_zone"] = lambda t, v: None
    for _ in range(8):  # two hours without the school's temperature
        snap = sim.snapshot()
        x = twin.estimate(snap)
        u = sim.control(snap)
        twin.control_input(sim.t, x, u)
        sim.advance(u)
    snap = sim.snapshot()
    assert snap.points["school.T_zone"].stale
    with pytest.raises(ValueError, match=r"school\.T_zone"):
        plain.estimate(snap)
    x = twin.estimate(snap)
    school = dh.model.index("states", "school.T_zone")
    assert abs(x[school] - sim.plant.state[school]) < 0.5
