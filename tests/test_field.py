"""The OPC UA field stand-in (field.opcua.stand_in) against the real Mirror client.

Also unit tests of the plant simulator (parallelcity.hil.plant) and the simulated rig kind.
Async tests are plain functions running ``asyncio.run`` with a timeout each.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua
from parallelcity.hil.plant import PlantSimulator, forecast_truth, perturbed_params
from parallelcity.hil.simulated import KIND, Config

from parallelcity.clock import SimClock
from parallelcity.errors import FieldConnectionError, NodeMappingError, SecurityError
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.session import parse_node_id
from parallelcity.field.opcua.stand_in import EmbeddedField, free_port
from parallelcity.field.snapshot import Quality
from parallelcity.scenario.definition import Scenario, parse_scenario

from .conftest import lab_text

SCENARIO_PATH = Path(__file__).parents[1] / "scenarios/district_heating.toml"


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return parse_scenario(lab_text(), SCENARIO_PATH)


@pytest.fixture(scope="module")
def scenario_text() -> str:
    return lab_text()


def run(make: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    """Run ``make`` with a bound against hangs (not a speed check: servers start slowly on a
    loaded machine; what each test claims is asserted inside)."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


def sim_clock(scenario: Scenario) -> SimClock:
    return SimClock(epoch=scenario.meta.start_epoch, speed=scenario.meta.speed)


def stand_in(scenario: Scenario, clock: SimClock) -> EmbeddedField:
    field = KIND.field_stand_in(scenario.rig_config, scenario, clock)
    assert isinstance(field, EmbeddedField)
    return field


# -- the mirror against the stand-in -----------------------------------------------------------


PLAUSIBLE = {
    "T_zone": (10.0, 30.0),
    "T_supply": (40.0, 100.0),
    "Q_heat": (0.0, 500.0),
    "fuel_kw": (0.0, 2000.0),
    "pump_kw": (0.0, 50.0),
    "T_out": (-25.0, 15.0),
}


@pytest.mark.slow
def test_mirror_sees_every_point_fresh_plausible_and_on_sim_time(scenario: Scenario) -> None:
    async def body() -> None:
        clock = sim_clock(scenario)
        async with (
            stand_in(scenario, clock) as field,
            Mirror(scenario.field, clock, endpoint=field.endpoint) as mirror,
        ):
            assert field.endpoint.startswith("opc.tcp://127.0.0.1:")
            assert await mirror.wait_all_received(5.0)
            assert mirror.reader.namespace_index >= 2
            first = mirror.snapshot()
            assert set(first.points) == {p.name for p in scenario.field.points}
            assert first.stale_required == []
            for name, state in first.points.items():
                assert not state.stale, (name, state.why)
                assert state.reading is not None
                assert state.reading.quality is Quality.GOOD
                lo, hi = PLAUSIBLE[name.split(".")[-1]]
                assert lo <= state.reading.value <= hi, (name, state.reading.value)
                # source time is simulated time: close to the clock, never from the wall
                assert state.age_s is not None
                assert -1.0 <= state.age_s <= 0.5 * scenario.meta.speed, (name, state.age_s)
            assert mirror.reader.server_time_fallback == frozenset()

            # source timestamps advance with the simulated clock
            before = {n: s.reading.source_time for n, s in first.points.items() if s.reading}
            await asyncio.sleep(0.5)
            later = mirror.snapshot()
            for name, state in later.points.items():
                assert state.reading is not None
                advanced = state.reading.source_time - before[name]
                assert 0.2 * scenario.meta.speed < advanced < 1.5 * scenario.meta.speed, name
            assert mirror.notifications >= 2 * len(scenario.field.points)

            # what the plant holds is what the mirror reads from the input nodes
            applied = await mirror.read_inputs()
            assert applied == pytest.approx(field.plant.inputs)
            assert applied == pytest.approx(
                dict(zip(scenario.model.inputs, scenario.model.u0, strict=True))
            )

            # the stand-in keeps the truth for scoring
            assert len(field.trace) >= 5
            t_last, y_last = field.trace[-1]
            assert y_last.shape == (scenario.model.ny,)
            assert t_last <= clock.now()

    run(body)


@pytest.mark.slow
def test_frozen_point_goes_stale_after_max_age_and_bad_status_is_stale(
    scenario: Scenario,
) -> None:
    frozen, broken = "office.T_zone", "school.T_zone"
    max_age = next(p.max_age_s for p in scenario.field.points if p.name == frozen)

    async def body() -> None:
        clock = sim_clock(scenario)
        async with (
            stand_in(scenario, clock) as field,
            Mirror(scenario.field, clock, endpoint=field.endpoint) as mirror,
        ):
            assert await mirror.wait_all_received(5.0)
            field.freeze(frozen)
            await asyncio.sleep(0.2)  # let notifications already in flight arrive
            held = mirror.readings[frozen]
            snap = mirror.snapshot()
            assert not snap.points[frozen].stale  # not old yet

            await clock.sleep_until(held.source_time + max_age + 0.1 * max_age)
            snap = mirror.snapshot()
            state = snap.points[frozen]
            assert mirror.readings[frozen].source_time == held.source_time
            assert state.stale
            assert "age" in state.why and "max_age_s" in state.why
            assert frozen in snap.stale_required
            assert not snap.points["apartment.T_zone"].stale

            field.set_bad(broken)
            await asyncio.sleep(0.3)
            state = mirror.snapshot().points[broken]
            assert state.stale
            assert state.reading is not None
            assert state.reading.quality is Quality.BAD
            assert state.reading.status_code == ua.StatusCodes.BadSensorFailure
            assert math.isnan(state.reading.value)
            assert "status bad" in state.why

            field.restore(broken)
            field.restore(frozen)
            await asyncio.sleep(0.3)
            snap = mirror.snapshot()
            assert not snap.points[broken].stale, snap.points[broken].why
            assert not snap.points[frozen].stale, snap.points[frozen].why

    run(body)


@pytest.mark.slow
def test_missing_nodes_and_namespace_are_named(scenario: Scenario, scenario_text: str) -> None:
    broken = parse_scenario(
        scenario_text.replace('"s=dh/office/T_zone"', '"s=dh/office/T_room"').replace(
            '"s=dh/school/m_flow"', '"i=4242"'
        ),
        "broken-nodes.toml",
    )
    wrong_ns = parse_scenario(
        scenario_text.replace(
            'namespace = "urn:parallelcity:district-heating"',
            'namespace = "urn:example:elsewhere"',
        ),
        "wrong-namespace.toml",
    )

    async def body() -> None:
        clock = sim_clock(scenario)
        async with stand_in(scenario, clock) as field:  # the ORIGINAL scenario's nodes
            with pytest.raises(NodeMappingError) as info:
                async with Mirror(broken.field, clock, endpoint=field.endpoint):
                    pass
            msg = str(info.value)
            assert "'office.T_zone'" in msg and "s=dh/office/T_room" in msg
            assert "'school.m_flow'" in msg and "i=4242" in msg  # every missing node at once
            assert "urn:parallelcity:district-heating" in msg
            assert "apartment" not in msg

            with pytest.raises(NodeMappingError, match="urn:example:elsewhere"):
                async with Mirror(wrong_ns.field, clock, endpoint=field.endpoint):
                    pass

            # the stand-in is still healthy for a correct client afterwards
            async with Mirror(scenario.field, clock, endpoint=field.endpoint) as mirror:
                assert await mirror.wait_all_received(5.0)

    run(body)


def test_unreachable_endpoint_fails_fast(scenario: Scenario) -> None:
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}"

    async def body() -> None:
        clock = sim_clock(scenario)
        started = time.monotonic()
        with pytest.raises(FieldConnectionError) as info:
            async with Mirror(scenario.field, clock, endpoint=endpoint, timeout_s=2.0):
                pass
        assert time.monotonic() - started < 4.0
        assert endpoint in str(info.value)

    run(body, timeout_s=10.0)


@pytest.mark.slow
def test_client_write_to_input_is_recorded_and_applied(scenario: Scenario) -> None:
    async def body() -> None:
        clock = sim_clock(scenario)
        async with stand_in(scenario, clock) as field:
            setpoint = field.nodeid("plant.T_supply_set")
            flow = field.nodeid("apartment.m_flow")
            before = clock.now()
            async with Client(field.endpoint, timeout=5) as client:
                await client.get_node(setpoint).write_value(ua.Variant(82.5, ua.VariantType.Double))
                await client.get_node(flow).write_value(ua.Variant(0.9, ua.VariantType.Double))
                await client.get_node(flow).write_value(ua.Variant(0.9, ua.VariantType.Double))
            after = clock.now()
            assert [(a.name, a.value) for a in field.applied] == [
                ("plant.T_supply_set", 82.5),
                ("apartment.m_flow", 0.9),
                ("apartment.m_flow", 0.9),  # every write, even an unchanged value
            ]
            assert all(before <= a.time <= after for a in field.applied)
            assert field.plant.inputs["plant.T_supply_set"] == 82.5
            assert field.plant.inputs["apartment.m_flow"] == 0.9

            # the plant responds: supply temperature climbs towards the new setpoint
            t_supply = scenario.model.index("outputs", "plant.T_supply")
            start = field.plant.outputs()[t_supply]
            await asyncio.sleep(0.5)
            assert field.plant.outputs()[t_supply] > start + 1.0

            async with Mirror(scenario.field, clock, endpoint=field.endpoint) as mirror:
                inputs = await mirror.read_inputs()
            assert inputs["plant.T_supply_set"] == 82.5
            assert inputs["apartment.m_flow"] == 0.9

    run(body)


def test_stand_in_without_certificates_refuses_a_scenario_that_is_not_insecure_lab(
    scenario_text: str,
) -> None:
    secure = parse_scenario(
        scenario_text.replace("insecure_lab = true", "insecure_lab = false"), "secure.toml"
    )
    clock = sim_clock(secure)
    field = stand_in(secure, clock)

    async def body() -> None:
        with pytest.raises(SecurityError, match="insecure_lab = true") as info:
            await field.start()
        assert "use_opcua_security" in str(info.value)
        with pytest.raises(RuntimeError, match="not running"):
            _ = field.endpoint

    run(body)


def test_parse_node_id() -> None:
    assert parse_node_id("s=dh/plant/T_supply", 3) == ua.NodeId("dh/plant/T_supply", 3)
    assert parse_node_id("i=1001", 2) == ua.NodeId(1001, 2)
    for bad in ("dh/plant", "x=1", "i=abc", "s="):
        with pytest.raises(ValueError):
            parse_node_id(bad, 2)


# -- the plant simulator -----------------------------------------------------------------------


def nominal_truth(scenario: Scenario) -> Callable[[float], np.ndarray]:
    model = scenario.model
    return lambda t: model.forecast(t, 1, 1.0)[0]


def test_plant_matches_model_simulate_when_truth_is_the_forecast(scenario: Scenario) -> None:
    model = scenario.model
    t0, dt, n = scenario.meta.start_epoch, 60.0, 240
    u = np.tile(model.u0, (n, 1))
    u[n // 2 :, 0] = 85.0  # a setpoint step half way
    u[n // 2 :, 1] = 0.8
    d = model.forecast(t0, n, dt)
    xs, ys = model.simulate(model.x0, u, d, model.nominal, dt)

    plant = PlantSimulator(model, model.nominal, nominal_truth(scenario), model.x0, model.u0, t0)
    assert np.allclose(plant.outputs(), ys[0])
    for k in range(n):
        if k == n // 2:
            plant.set_input("plant.T_supply_set", 85.0)
            plant.set_input("apartment.m_flow", 0.8)
        plant.advance(t0 + (k + 1) * dt)
    assert plant.t == pytest.approx(t0 + n * dt)
    assert np.allclose(plant.state, xs[-1], rtol=1e-6, atol=1e-5)
    # simulate's last output reuses the last period's disturbances; the plant uses the truth now
    same_d = [i for i, name in enumerate(model.outputs) if not name.startswith("weather.")]
    assert np.allclose(plant.outputs()[same_d], ys[-1, same_d], rtol=1e-6, atol=1e-5)

    # irregular advances (as the tick loop makes them) stay close to the reference
    ragged = PlantSimulator(model, model.nominal, nominal_truth(scenario), model.x0, model.u0, t0)
    t = t0
    rng = np.random.default_rng(0)
    while t < t0 + n * dt:
        t = min(t0 + n * dt, t + float(rng.uniform(1.0, 150.0)))
        if t >= t0 + (n // 2) * dt and ragged.inputs["plant.T_supply_set"] != 85.0:
            ragged.advance(t0 + (n // 2) * dt)
            ragged.set_input("plant.T_supply_set", 85.0)
            ragged.set_input("apartment.m_flow", 0.8)
        ragged.advance(t)
    assert np.allclose(ragged.state, plant.state, atol=0.02)

    # the past is not re-simulated
    state = ragged.state
    ragged.advance(t0)
    assert np.array_equal(ragged.state, state)


def test_perturbed_params_within_spread_and_seeded(scenario: Scenario) -> None:
    model = scenario.model
    suffixes = ["ua_kw_per_k", "c_mj_per_k"]
    p = perturbed_params(model, 0.15, suffixes, seed=3)
    ratio = p / model.nominal
    for name, r in zip(model.parameters, ratio, strict=True):
        if any(name.endswith(s) for s in suffixes):
            assert 0.85 <= r <= 1.15, name
        else:
            assert r == 1.0, name
    assert not np.allclose(ratio, 1.0)
    assert np.array_equal(p, perturbed_params(model, 0.15, suffixes, seed=3))
    assert not np.array_equal(p, perturbed_params(model, 0.15, suffixes, seed=4))
    assert np.array_equal(perturbed_params(model, 0.0, suffixes, seed=3), model.nominal)
    with pytest.raises(ValueError, match="no_such_parameter"):
        perturbed_params(model, 0.1, ["no_such_parameter"], seed=3)


def test_forecast_truth_is_seeded_smooth_and_physical(scenario: Scenario) -> None:
    model = scenario.model
    errors = {"weather.T_out": 1.0, "weather.I_sol": 40.0}
    a = forecast_truth(model, errors, seed=11)
    b = forecast_truth(model, errors, seed=11)
    c = forecast_truth(model, errors, seed=12)
    t0 = scenario.meta.start_epoch
    times = t0 + 600.0 * np.arange(30 * 144)  # 30 days every 10 minutes
    da = np.array([a(t) for t in times])
    forecast = model.forecast(t0, len(times), 600.0)
    assert np.array_equal(da[::97], np.array([b(t) for t in times[::97]]))
    assert not np.allclose(da[::97], np.array([c(t) for t in times[::97]]))

    i_out = model.index("disturbances", "weather.T_out")
    i_sol = model.index("disturbances", "weather.I_sol")
    err = da[:, i_out] - forecast[:, i_out]
    assert 0.6 < err.std() < 1.4
    assert np.corrcoef(err[:-1], err[1:])[0, 1] > 0.95  # smooth: hours, not minutes
    assert np.all(da[:, i_sol] >= 0.0)
    night = forecast[:, i_sol] == 0.0
    assert night.any() and np.all(da[night, i_sol] == 0.0)
    assert np.abs(da[~night, i_sol] - forecast[~night, i_sol]).max() > 5.0
    untouched = [i for i in range(model.nd) if i not in (i_out, i_sol)]
    assert np.array_equal(da[:, untouched], forecast[:, untouched])

    exact = forecast_truth(model, {}, seed=1)
    assert np.array_equal(exact(t0 + 1234.0), model.forecast(t0 + 1234.0, 1, 1.0)[0])
    with pytest.raises(ValueError, match=r"weather\.wind"):
        forecast_truth(model, {"weather.wind": 1.0}, seed=1)


# -- the simulated rig kind --------------------------------------------------------------------


def test_verification_rig_uses_its_own_parameters(scenario: Scenario) -> None:
    model = scenario.model
    cfg = scenario.rig_config
    assert isinstance(cfg, Config)
    rig = KIND.verification_rig(cfg, model)
    n, dt, t0 = 24, 900.0, scenario.meta.start_epoch
    u = np.tile(model.u0, (n, 1))
    d = model.forecast(t0, n, dt)
    ys = rig.rollout(model.x0, u, d, t0, dt)
    assert ys.shape == (n + 1, model.ny)
    _, nominal = model.simulate(model.x0, u, d, model.nominal, dt)
    assert np.allclose(ys[0, : model.nx], nominal[0, : model.nx])  # same start state
    assert not np.allclose(ys, nominal)  # deliberately not the twin's parameters
    again = KIND.verification_rig(cfg, model).rollout(model.x0, u, d, t0, dt)
    assert np.array_equal(ys, again)

    bad = cfg.model_copy(update={"forecast_error": {"weather.wind": 1.0}})
    with pytest.raises(ValueError, match=r"weather\.wind"):
        KIND.verification_rig(bad, model)
    with pytest.raises(ValueError, match=r"weather\.wind"):
        KIND.field_stand_in(bad, scenario, sim_clock(scenario))
