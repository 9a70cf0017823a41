"""The FMU rig (an FMU built here with pythonfmu, run through FMPy) and the OPC UA bench rig
(a bench server in another process): each catches a planted unsafe plan and approves a safe one."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from parallelcity.hil.field import free_port

from parallelcity.errors import RigError, ScenarioError
from parallelcity.plugins import rig_kind
from parallelcity.scenario.definition import parse_scenario
from parallelcity.verify.verifier import Verifier

from .conftest import ROOT

DT = 900.0
SLAVE = Path(__file__).parent / "fmu_src" / "districtheating.py"
FMU_RIG = """[rig]
kind = "fmu"
path = "{path}"
samples = {samples}
seed = 5

[rig.inputs]
"plant.T_supply_set" = "T_set"
"apartment.m_flow" = "m_apartment"
"office.m_flow" = "m_office"
"school.m_flow" = "m_school"

[rig.disturbances]
"weather.T_out" = "T_out"
"weather.I_sol" = "I_sol"
"apartment.Q_int" = "Q_int_apartment"
"office.Q_int" = "Q_int_office"
"school.Q_int" = "Q_int_school"

[rig.outputs]
"apartment.T_zone" = "T_apartment"
"office.T_zone" = "T_office"
"school.T_zone" = "T_school"
"plant.T_supply" = "T_supply"

[rig.states]
"apartment.T_zone" = "T_apartment_0"
"office.T_zone" = "T_office_0"
"school.T_zone" = "T_school_0"
"plant.T_supply" = "T_supply_0"

[rig.parameter_ranges]
ua_apartment = [2.2, 2.8]
c_office = [50.0, 70.0]
hx_school = [10.0, 14.0]

"""


def with_rig(dh_text: str, rig: str) -> str:
    out, n = re.subn(r"\[rig\]\n.*?(?=\n\[\[specs\.inputs\]\])", rig, dh_text, flags=re.S)
    assert n == 1
    return out


@pytest.fixture(scope="module")
def fmu_path(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmu")
    proc = subprocess.run(
        [sys.executable, "-m", "pythonfmu", "build", "-f", str(SLAVE), "-d", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    path = out / "DistrictHeating.fmu"
    assert path.exists(), proc.stdout + proc.stderr
    return path


def plans(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A comfortable plan from 06:00, and the planted unsafe one: substations nearly shut."""
    safe = np.tile([75.0, 0.21, 0.175, 0.175], (n, 1))
    unsafe = safe.copy()
    unsafe[2:, 1:] = 0.02
    return safe, unsafe


def judge(scenario, rig):
    specs = scenario.safety_specs()
    ver = Verifier(specs, rig, DT)
    n, t0 = scenario.meta.horizon_steps, scenario.meta.start_epoch + 6 * 3600
    x0 = np.array([20.5, 20.5, 20.0, 75.0])
    d = scenario.model.forecast(t0, n, DT)
    safe, unsafe = plans(n)
    return [
        ver.verify(source="t", t0=t0, x0=x0, u_prev=p[0], u_plan=p, disturbances=d)
        for p in (safe, unsafe)
    ]


def test_fmu_rig_runs_the_fmu_and_judges_plans(dh_text: str, fmu_path: Path) -> None:
    sc = parse_scenario(with_rig(dh_text, FMU_RIG.format(path=fmu_path, samples=3)), "fmu.toml")
    rig = rig_kind("fmu").verification_rig(sc.rig_config, sc.model)
    try:
        assert rig.samples == 3 and rig.name == "fmu(DistrictHeating.fmu)"
        m = sc.model
        n, t0 = 8, sc.meta.start_epoch + 6 * 3600
        u = plans(n)[0]
        d = m.forecast(t0, n, DT)
        x0 = np.array([20.5, 20.5, 20.0, 75.0])
        y = rig.rollout_sample(0, x0, u, d, t0, DT)
        # an independent implementation of the same physics: the states agree closely
        _, ref = m.simulate(x0, u, d, m.nominal, DT)
        cols = [m.outputs.index(s) for s in m.states]
        np.testing.assert_allclose(y[:, cols], ref[:, cols], atol=0.02)
        assert np.isnan(y[:, m.outputs.index("plant.fuel_kw")]).all(), "unmapped output"
        # reset really resets: a second rollout gives the same numbers
        np.testing.assert_array_equal(y, rig.rollout_sample(0, x0, u, d, t0, DT))
        # samples draw their parameters: the apartment sample differs
        y2 = rig.rollout_sample(2, x0, u, d, t0, DT)
        assert not np.allclose(y2[:, 0], y[:, 0])
        safe, unsafe = judge(sc, rig)
        assert safe.approved and safe.samples == 3, safe.summary()
        assert not unsafe.approved
        kinds = {v.spec for v in unsafe.violations}  # the scenario's temporal spec fires too
        assert "band" in kinds and kinds <= {"band", "temporal"}
        assert any(v.value < v.limit for v in unsafe.violations), "too cold, not too warm"
        assert unsafe.failed_samples == (0, 1, 2)
    finally:
        rig.close()


def test_fmu_mapping_errors_name_the_key(dh_text: str, fmu_path: Path) -> None:
    rig = FMU_RIG.format(path=fmu_path, samples=1).replace('"T_set"', '"T_sett"')
    with pytest.raises(ScenarioError, match=r"rig\.inputs\['plant\.T_supply_set'\]: the FMU has "):
        parse_scenario(with_rig(dh_text, rig), "fmu.toml")
    rig = FMU_RIG.format(path=fmu_path, samples=1).replace('"T_office"', '"c_office"')
    with pytest.raises(ScenarioError, match="is a parameter Real, expected a Real output"):
        parse_scenario(with_rig(dh_text, rig), "fmu.toml")
    rig = FMU_RIG.format(path=fmu_path.with_name("missing.fmu"), samples=1)
    with pytest.raises(ScenarioError, match=r"rig\.path: cannot read FMU"):
        parse_scenario(with_rig(dh_text, rig), "fmu.toml")


@pytest.fixture(scope="module")
def bench(dh_text: str, tmp_path_factory):
    """A bench process serving the scenario's simulated rig with four uncertainty samples."""
    text = re.sub(r"(?m)^(samples|sample_forecast_error) = .*\n", "", dh_text).replace(
        "field_seed = 11",
        'field_seed = 11\nsamples = 4\nsample_forecast_error = { "weather.T_out" = 1.0 }',
    )
    path = tmp_path_factory.mktemp("bench") / "bench.toml"
    path.write_text(text)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "parallelcity.hil.bench", str(path), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()  # blocks until the server is listening or the process dies
        assert line.startswith("bench listening on"), (line, proc.poll())
        yield parse_scenario(text, str(path)), line.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_rig(endpoint: str, insecure: bool = True) -> str:
    return (
        f'[rig]\nkind = "bench"\nendpoint = "{endpoint}"\ninsecure_lab = {str(insecure).lower()}\n'
    )


@pytest.mark.slow
def test_bench_in_another_process_judges_plans_like_the_local_rig(dh_text: str, bench) -> None:
    local_sc, endpoint = bench
    sc = parse_scenario(with_rig(dh_text, bench_rig(endpoint)), "bench-client.toml")
    rig = rig_kind("bench").verification_rig(sc.rig_config, sc.model)
    try:
        assert rig.samples == 4
        local = rig_kind("simulated").verification_rig(local_sc.rig_config, local_sc.model)
        remote_v = judge(sc, rig)
        local_v = judge(local_sc, local)
        safe, unsafe = remote_v
        assert safe.approved and safe.samples == 4, safe.summary()
        assert not unsafe.approved
        assert {v.spec for v in unsafe.violations} <= {"band", "temporal"}
        # the same plan gives the same traces over OPC UA as in this process
        for a, b in zip(remote_v, local_v, strict=True):
            assert a.approved == b.approved and a.failed_samples == b.failed_samples
            np.testing.assert_allclose(a.y_rig, b.y_rig, rtol=1e-12, atol=1e-9)
    finally:
        rig.close()


@pytest.mark.slow
def test_the_bench_advances_only_on_the_expected_step(dh_text: str, bench) -> None:
    from asyncua import ua

    _, endpoint = bench
    sc = parse_scenario(with_rig(dh_text, bench_rig(endpoint)), "bench-client.toml")
    drv = rig_kind("bench").driver(sc.rig_config, sc.model)
    try:
        m = sc.model
        drv.reset(m.x0, sc.meta.start_epoch, 0)
        drv.apply(m.u0, m.forecast(sc.meta.start_epoch, 1, DT)[0])
        before = drv.read()
        drv.advance(DT)
        after = drv.read()
        assert not np.allclose(before, after)
        # a replayed advance (the step count already used) is refused and moves nothing
        with pytest.raises(RigError, match="Advance failed"):
            drv._method(
                "Advance",
                ua.Variant(DT, ua.VariantType.Double),
                ua.Variant(drv._step - 1, ua.VariantType.UInt32),
            )
        time.sleep(0.05)
        np.testing.assert_array_equal(drv.read(), after)
    finally:
        drv.close()


@pytest.mark.slow
def test_bench_refuses_without_insecure_lab(dh_text: str, bench) -> None:
    from parallelcity.errors import SecurityError

    _, endpoint = bench
    sc = parse_scenario(with_rig(dh_text, bench_rig(endpoint, insecure=False)), "b.toml")
    with pytest.raises(SecurityError, match="insecure_lab"):
        rig_kind("bench").driver(sc.rig_config, sc.model)
