"""The rig state machine, the simulated driver with uncertainty samples, and the sample pool."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from parallelcity.hil.simulated import KIND

from parallelcity.errors import RigError
from parallelcity.scenario.definition import parse_scenario
from parallelcity.verify.machine import RigMachine, RigState
from parallelcity.verify.verifier import PoolSamples, RigRecipe, SerialSamples, Verifier

DT = 900.0
UNCERTAIN = """
samples = 8
sample_forecast_error = { "weather.T_out" = 1.5, "weather.I_sol" = 40.0 }
"""


@pytest.fixture(scope="module")
def uncertain(dh_text: str):
    dh_text = re.sub(r"(?m)^(samples|sample_forecast_error) = .*\n", "", dh_text)
    text = dh_text.replace(
        'forecast_error = { "weather.T_out" = 1.0, "weather.I_sol" = 40.0 }',
        'forecast_error = { "weather.T_out" = 1.0, "weather.I_sol" = 40.0 }' + UNCERTAIN,
    )
    assert text != dh_text
    return parse_scenario(text, "uncertain.toml"), text


class FlakyDriver:
    """A driver that fails on request: for driving the state machine into FAULTED."""

    name = "flaky"
    samples = 2

    def __init__(self) -> None:
        self.fail_on: str | None = None
        self.calls: list[str] = []

    def _do(self, what: str) -> None:
        self.calls.append(what)
        if self.fail_on == what:
            raise OSError(f"bench lost power during {what}")

    def reset(self, x0, t0, sample) -> None:
        self._do("reset")

    def apply(self, u, d) -> None:
        self._do("apply")

    def advance(self, dt) -> None:
        self._do("advance")

    def read(self):
        self._do("read")
        return np.array([1.0, 2.0])

    def close(self) -> None:
        self._do("close")


def test_the_machine_enforces_the_order_without_touching_the_driver() -> None:
    drv = FlakyDriver()
    rig = RigMachine(drv)
    assert rig.state is RigState.IDLE
    for call in (lambda: rig.apply([0], [0]), rig.read, lambda: rig.advance(1.0), rig.finish):
        with pytest.raises(RigError, match="while idle"):
            call()
    assert drv.calls == []
    rig.arm(np.zeros(2), 0.0, sample=1)
    assert rig.state is RigState.ARMED and rig.sample == 1
    with pytest.raises(RigError, match="cannot advance while armed"):
        rig.advance(1.0)
    rig.read()  # initial outputs are allowed
    rig.apply([0], [0])
    assert rig.state is RigState.RUNNING
    rig.advance(1.0)
    with pytest.raises(RigError, match="dt > 0"):
        rig.advance(0.0)
    with pytest.raises(RigError, match="cannot arm while running"):
        rig.arm(np.zeros(2), 0.0)
    rig.finish()
    assert rig.state is RigState.IDLE
    with pytest.raises(RigError, match="no sample 2"):
        rig.arm(np.zeros(2), 0.0, sample=2)
    assert drv.calls == ["reset", "read", "apply", "advance"]


def test_a_driver_failure_faults_the_rig_until_recovered() -> None:
    drv = FlakyDriver()
    rig = RigMachine(drv)
    rig.arm(np.zeros(2), 0.0)
    rig.apply([0], [0])
    drv.fail_on = "advance"
    with pytest.raises(RigError, match="lost power during advance") as info:
        rig.advance(1.0)
    assert isinstance(info.value.__cause__, OSError)
    assert rig.state is RigState.FAULTED and "advance failed" in rig.fault
    with pytest.raises(RigError, match="faulted"):
        rig.read()
    with pytest.raises(RigError, match="cannot arm while faulted"):
        rig.arm(np.zeros(2), 0.0)
    rig.recover()
    assert rig.state is RigState.IDLE and rig.fault == ""
    drv.fail_on = None
    # a whole rollout recovers a faulted rig first, and leaves it idle
    drv.fail_on = "read"
    with pytest.raises(RigError):
        rig.rollout_sample(0, np.zeros(2), np.zeros((3, 1)), np.zeros((3, 1)), 0.0, 1.0)
    assert rig.state is RigState.FAULTED
    drv.fail_on = None
    ys = rig.rollout_sample(1, np.zeros(2), np.zeros((3, 1)), np.zeros((3, 1)), 0.0, 1.0)
    assert ys.shape == (4, 2) and rig.state is RigState.IDLE
    rig.close()
    assert rig.state is RigState.CLOSED and drv.calls[-1] == "close"


def test_simulated_step_path_and_trace_path_agree_on_every_sample(uncertain) -> None:
    sc, _ = uncertain
    m = sc.model
    fast = KIND.verification_rig(sc.rig_config, m)
    slow = RigMachine(KIND.driver(sc.rig_config, m), use_trace=False)
    assert fast.samples == slow.samples == 8
    n, t0 = 12, sc.meta.start_epoch + 6 * 3600
    u = np.tile([75.0, 0.4, 0.3, 0.3], (n, 1))
    d = m.forecast(t0, n, DT)
    traces = []
    for s in range(8):
        a = fast.rollout_sample(s, m.x0, u, d, t0, DT)
        b = slow.rollout_sample(s, m.x0, u, d, t0, DT)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
        traces.append(a)
    # sample 0 is the rig's own draw under the forecast as given (the rig before samples)
    single = KIND.verification_rig(sc.rig_config.model_copy(update={"samples": 1}), m)
    np.testing.assert_array_equal(traces[0], single.rollout(m.x0, u, d, t0, DT))
    # the samples differ from each other, and the draw is reproducible
    assert len({round(float(t[-1, 0]), 6) for t in traces}) == 8
    again = KIND.verification_rig(sc.rig_config, m).rollout_sample(5, m.x0, u, d, t0, DT)
    np.testing.assert_array_equal(again, traces[5])


def cooling_plan(level: float, n: int) -> np.ndarray:
    """Constant flows scaled by ``level`` from 06:00: about 0.35 is comfortable on every
    sample of the uncertain rig, much lower is too cold, much higher too warm."""
    return np.tile([75.0, 0.6 * level, 0.5 * level, 0.5 * level], (n, 1))


def test_a_verdict_holds_over_all_samples_and_names_the_failing_ones(uncertain) -> None:
    sc, _ = uncertain
    m = sc.model
    specs = sc.safety_specs()
    rig = KIND.verification_rig(sc.rig_config, m)
    ver = Verifier(specs, rig, DT)
    n, t0 = sc.meta.horizon_steps, sc.meta.start_epoch + 6 * 3600
    x0 = np.array([20.5, 20.5, 20.0, 75.0])
    d = m.forecast(t0, n, DT)

    def per_sample(plan) -> list[bool]:
        out = []
        for s in range(rig.samples):
            y = rig.rollout_sample(s, x0, plan, d, t0, DT)
            out.append(not specs.check_outputs(t0, y, DT))
        return out

    mixed = None
    for level in np.linspace(0.25, 0.5, 51):
        ok = per_sample(cooling_plan(level, n))
        if ok[0] and not all(ok):
            mixed = (level, ok)
            break
    assert mixed is not None, "no plan passes on the rig's own draw but fails on another sample"
    level, ok = mixed
    v = ver.verify(
        source="t", t0=t0, x0=x0, u_prev=cooling_plan(level, n)[0],
        u_plan=cooling_plan(level, n), disturbances=d,
    )  # fmt: skip
    assert not v.approved and v.samples == 8
    assert set(v.failed_samples) == {s for s, good in enumerate(ok) if not good}
    assert 0 not in v.failed_samples
    assert v.worst_sample in v.failed_samples
    worst_band = min((r for r in v.results if r.kind == "band"), key=lambda r: r.robustness)
    assert worst_band.robustness < 0 and worst_band.sample in v.failed_samples
    np.testing.assert_array_equal(
        v.y_rig, rig.rollout_sample(v.worst_sample, x0, cooling_plan(level, n), d, t0, DT)
    )
    safe = ver.verify(
        source="t", t0=t0, x0=x0, u_prev=cooling_plan(0.35, n)[0],
        u_plan=cooling_plan(0.35, n), disturbances=d,
    )  # fmt: skip
    assert safe.approved and safe.samples == 8 and safe.failed_samples == ()
    assert all(r.passed for r in safe.results)


class SlowRig:
    name = "slow"
    samples = 4

    def __init__(self, model) -> None:
        self.model = model

    def rollout(self, x0, inputs, d, t0, dt):
        return self.rollout_sample(0, x0, inputs, d, t0, dt)

    def rollout_sample(self, sample, x0, inputs, d, t0, dt):
        time.sleep(0.05)
        return self.model.simulate(x0, inputs, d, self.model.nominal, dt)[1]


def test_a_verification_past_its_deadline_is_a_rejection(dh) -> None:
    specs = dh.safety_specs()
    rig = SlowRig(dh.model)
    n, t0 = dh.meta.horizon_steps, dh.meta.start_epoch + 10 * 3600
    plan = np.tile([70.0, 0.3, 0.12, 0.2], (n, 1))
    kw = dict(
        source="t", t0=t0, x0=np.array([21.0, 21.5, 21.0, 70.0]), u_prev=plan[0], u_plan=plan,
        disturbances=dh.model.forecast(t0, n, DT),
    )  # fmt: skip
    late = Verifier(specs, rig, DT, deadline_s=0.08).verify(**kw)
    assert not late.approved and "deadline missed" in late.note
    assert late.samples < 4
    assert Verifier(specs, rig, DT).verify(**kw, deadline_s=0.01).approved is False
    assert Verifier(specs, rig, DT, deadline_s=30.0).verify(**kw).approved


@pytest.mark.slow
def test_the_process_pool_gives_the_serial_verdicts(uncertain) -> None:
    sc, text = uncertain
    m = sc.model
    specs = sc.safety_specs()
    rig = KIND.verification_rig(sc.rig_config, m)
    n, t0 = sc.meta.horizon_steps, sc.meta.start_epoch + 6 * 3600
    x0 = np.array([20.5, 20.5, 20.0, 75.0])
    d = m.forecast(t0, n, DT)
    serial = Verifier(specs, rig, DT, runner=SerialSamples(rig, specs))
    with PoolSamples(RigRecipe.from_scenario(sc, text=text), workers=2) as pool:
        parallel = Verifier(specs, rig, DT, runner=pool)
        for level in (0.35, 0.33, 0.1):
            plan = cooling_plan(level, n)
            a = serial.verify(source="t", t0=t0, x0=x0, u_prev=plan[0], u_plan=plan, disturbances=d)
            b = parallel.verify(
                source="t", t0=t0, x0=x0, u_prev=plan[0], u_plan=plan, disturbances=d
            )
            assert a.digest == b.digest and a.approved == b.approved
            assert a.failed_samples == b.failed_samples and b.samples == 8
            np.testing.assert_array_equal(a.y_rig, b.y_rig)
        # a deadline the pool cannot meet is a rejection, not a wait
        plan = cooling_plan(1.0, n)
        late = parallel.verify(
            source="t", t0=t0, x0=x0, u_prev=plan[0], u_plan=plan, disturbances=d, deadline_s=0.0
        )
        assert not late.approved and "deadline missed" in late.note
