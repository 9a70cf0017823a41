"""[diagnosis] and [[rig.faults]] in a scenario: validated with key paths, and a real run
of the district-heating scenario with a fouled exchanger planted in its field plant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from parallelcity.hil.simulated import simulated_driver

from parallelcity.cli import main
from parallelcity.errors import ScenarioError
from parallelcity.record.journal_read import read_journal, run_result
from parallelcity.scenario.definition import parse_scenario

DIAGNOSIS = """
[diagnosis]
window_cycles = 6
warmup_cycles = 4
noise = { "apartment.T_zone" = 0.15, "office.T_zone" = 0.15, "school.T_zone" = 0.15, \
"plant.T_supply" = 0.5, "apartment.Q_heat" = 2.0, "office.Q_heat" = 2.0, \
"school.Q_heat" = 2.0, "plant.fuel_kw" = 4.0 }
"""
FOULING = """
[[rig.faults]]
kind = "fouled_exchanger"
component = "apartment"
size = 0.9
start_s = 7200
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text, "x.toml")
    return err.value.problems


def test_diagnosis_table_problems_name_their_keys(dh_text: str) -> None:
    bad = dh_text + DIAGNOSIS.replace(
        '"plant.fuel_kw" = 4.0', '"plant.fuel_kw" = 4.0, "weather.T_out" = 1.0, "x" = 1.0'
    ).replace("window_cycles = 6", 'faults = ["valve_stuck", "leak"]')
    assert problems(bad) == [
        "diagnosis.noise: 'weather.T_out' is a measured disturbance: the twin takes it as "
        "read, so its residual is always zero",
        "diagnosis.noise: 'x' is not an output of the model",
        "diagnosis.faults[1]: 'leak' is not a fault kind of model 'district_heating' "
        "(kinds: fouled_exchanger, valve_stuck, sensor_drift, sensor_stuck)",
    ]
    assert problems(dh_text + DIAGNOSIS.replace("window_cycles = 6", "window_cycles = 1")) == [
        "diagnosis.window_cycles: Input should be greater than or equal to 2 (got 1)"
    ]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ('component = "apartment"', "fault fouled_exchanger has no component 'nowhere'"),
        ("size = 0.9", "fault fouled_exchanger needs a finite size (of UA_hx lost)"),
        ('kind = "fouled_exchanger"', "model district_heating has no fault kind 'leak'"),
    ],
)
def test_rig_fault_problems_name_their_entry(dh_text: str, change: str, problem: str) -> None:
    broken = {
        'component = "apartment"': 'component = "nowhere"',
        "size = 0.9": "",
        'kind = "fouled_exchanger"': 'kind = "leak"',
    }[change]
    (line,) = problems(dh_text + FOULING.replace(change, broken))
    assert line.startswith("rig.faults[0]: ") and problem in line


def test_a_stuck_fault_takes_no_size_and_a_sensor_fault_needs_a_measured_output(
    dh_text: str,
) -> None:
    stuck = FOULING.replace("fouled_exchanger", "valve_stuck")
    assert "has no size" in problems(dh_text + stuck)[0]
    drift = FOULING.replace("fouled_exchanger", "sensor_drift").replace("apartment", "nope")
    assert "has no output named 'nope'" in problems(dh_text + drift)[0]


def test_only_the_field_plant_gets_the_fault(dh_text: str) -> None:
    """The verification rig rolls plans out on the healthy plant, fault or none."""
    healthy = parse_scenario(dh_text, "x.toml")
    faulty = parse_scenario(dh_text + FOULING.replace("7200", "0"), "x.toml")
    runs = []
    for sc in (healthy, faulty):
        rig = simulated_driver(sc.rig_config, sc.model)
        rig.reset(sc.model.x0, sc.meta.start_epoch, 0)
        u = [sc.model.u0] * 8
        runs.append(rig.trace(u, sc.model.forecast(sc.meta.start_epoch, 8, 900.0), 900.0))
    assert (runs[0] == runs[1]).all()


@pytest.mark.slow
def test_a_run_with_a_fouled_exchanger_raises_its_alarm(dh_text: str, tmp_path: Path) -> None:
    """`parallelcity run` as a user runs it: the alarm is in the journal, summary.json (with
    the planted fault beside it, the ground truth a campaign scores against), the metrics
    and what `parallelcity report` rebuilds from the journal."""
    path = tmp_path / "fouled.toml"
    path.write_text(dh_text + DIAGNOSIS + FOULING)
    out = tmp_path / "runs"
    # The fallback's PI as the controller: it starts at once, and diagnosis is no solver's.
    # Its flows stay low until the morning band (a fouled exchanger hides at low flow): the
    # fault shows when the apartment's flow rises at 05:00, and is isolated 3 cycles later.
    args = ["--cycles", "28", "--speed", "2880", "--controller", "pi", "--out", str(out)]
    rc = main(["run", str(path), *args, "--quiet"])
    assert rc == 0
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["faults_injected"] == [
        {"kind": "fouled_exchanger", "component": "apartment", "size": 0.9, "start_s": 7200.0}
    ]
    (alarm,) = summary["alarms"]
    assert (alarm["kind"], alarm["component"]) == ("fouled_exchanger", "apartment")
    assert abs(alarm["size"] - 0.9) <= 0.05
    assert 7200.0 - 1800.0 <= alarm["start_s"] <= alarm["detected_s"] <= alarm["raised_s"]
    metrics = (run_dir / "metrics.prom").read_text()
    assert 'parallelcity_alarms_total{scenario="district-heating",kind="fouled_exchanger"} 1' in (
        metrics
    )
    journal = read_journal(run_dir)
    assert [a["kind"] for a in journal.alarms] == ["fouled_exchanger"]
    assert journal.alarms[0]["evidence"]["best"]["component"] == "apartment"
    sc = parse_scenario(path.read_text(), path)
    assert run_result(journal, sc, tmp_path).alarms == journal.alarms
