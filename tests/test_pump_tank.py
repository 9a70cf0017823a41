"""The discrete-time ``pump_tank`` model kind from a scenario: `validate` accepts it, the
``milp_pump`` scheduler plans on it, and `run` drives it to the end as a user runs it, with
the kind's own KPIs in the summary, the metrics and the plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parallelcity import plugins
from parallelcity.cli import main
from parallelcity.record.journal_read import read_journal, run_result, scenario_of
from parallelcity.record.plot import plot_figure
from parallelcity.scenario.definition import load_scenario
from parallelcity.twin.model import ModelForm
from parallelcity.twin.twin import Twin
from parallelcity.verify.campaign import report_lines, run_campaign

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "scenarios" / "pump_tank.toml"
RUN_TIMEOUT_S = 240  # 4 cycles of 3 wall seconds, plus start-up on a loaded machine


@pytest.fixture(scope="module")
def pt():
    return load_scenario(SCENARIO)


def test_validate_accepts_the_scenario(capsys) -> None:
    assert main(["validate", str(SCENARIO)]) == 0
    out = capsys.readouterr().out
    assert "model pump_tank" in out and "controller milp_pump" in out


def test_the_kind_is_discrete_and_milp_pump_plans_on_it(pt) -> None:
    m = pt.model
    assert m.form is ModelForm.DISCRETE and m.step_s == 300.0
    specs = pt.safety_specs()
    dt, n = pt.meta.cycle_s, pt.meta.horizon_steps
    ctrl = plugins.controller_kind("milp_pump").create(pt.controller_config)
    ctrl.setup(specs.control_problem(m, dt, n))
    inp = Twin(m, specs, dt, n).control_input(pt.meta.start_epoch, m.x0, m.u0)
    res = ctrl.step(inp)
    assert res.status.usable, res.message
    assert set(np.unique(res.u_plan)) <= {0.0, 1.0}
    # the prediction is the model's own discrete map, three steps per cycle
    xs, _ = m.simulate(m.x0, res.u_plan, inp.disturbances, m.nominal, dt)
    np.testing.assert_allclose(res.x_pred, xs, rtol=0, atol=1e-12)
    lo, hi = 1.0, 4.5
    assert np.all(xs[1:, 0] >= lo - 1e-6) and np.all(xs[1:, 0] <= hi + 1e-6)


@pytest.mark.slow
def test_run_drives_it_to_the_end_and_reports_its_own_kpis(pt, tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "parallelcity", "run", str(SCENARIO), "--cycles", "4"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "level violation" in done.stdout and "comfort" not in done.stdout + done.stderr
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cycles"] == 4 and summary["exit_code"] == 0
    assert (summary["band_kpi"], summary["band_unit"]) == ("level violation", "m·h")
    assert set(summary["totals"]) == {"energy", "cost"}
    assert all(math.isfinite(v) and v >= 0 for v in summary["totals"].values())
    metrics = (folder / "metrics.prom").read_text()
    assert 'parallelcity_total{scenario="pump-tank",kpi="cost",unit=""}' in metrics
    # the plot from the journal alone: the kind's level band and panels, nothing else
    journal = read_journal(folder)
    axes = plot_figure(run_result(journal, scenario_of(journal), folder)).axes
    labels = [ax.get_ylabel() for ax in axes[:-1]]
    assert labels == ["tank level [m]", "pump", "demand [m³/h]", "tariff [per kWh]"]
    assert axes[0].get_legend_handles_labels()[1] == ["level band", "tank.level"]


def test_the_hysteresis_baseline_controls_it(pt) -> None:
    m = pt.model
    specs = pt.safety_specs()
    dt, n = pt.meta.cycle_s, pt.meta.horizon_steps
    ctrl = plugins.controller_kind(m.report.baseline).create(pt.fallback_config)
    ctrl.setup(specs.control_problem(m, dt, n))
    twin = Twin(m, specs, dt, n)
    low = ctrl.step(twin.control_input(pt.meta.start_epoch, np.array([0.9]), np.array([0.0])))
    assert low.status.usable and low.u_plan[0, 0] == 1.0  # below the band: the pump starts


def test_verify_reports_the_kinds_own_kpis(pt) -> None:
    rig = plugins.rig_kind("simulated").verification_rig(pt.rig_config, pt.model)
    ctrl = plugins.controller_kind("milp_pump").create(pt.controller_config)
    try:
        res = run_campaign(pt, rig, ctrl, "milp_pump", cycles=4, samples=range(rig.samples))
    finally:
        rig.close()
    text = "\n".join(report_lines(res))
    assert res.passed, text
    assert "level violation    mean 0.00 m·h" in text
    assert "energy             mean" in text and "cost               mean" in text
    assert "comfort" not in text and "kWh, max" in text
