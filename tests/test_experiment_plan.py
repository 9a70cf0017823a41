"""The pure parts of ``parallelcity experiment``: key paths, overrides, run keys, the matrix
and the KPI table."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parallelcity.experiment.plan import (
    RunSpec,
    VariantPlan,
    apply_overrides,
    parse_key_path,
    run_key,
    run_matrix,
    select,
    validation_tables,
)
from parallelcity.experiment.table import aggregate, kpis_csv, kpis_json, markdown, stats

BASE = {
    "scenario": {"name": "x", "cycles": 4},
    "model": {"kind": "m", "buildings": [{"name": "a", "ua": 1.0}, {"name": "b", "ua": 2.0}]},
    "controller": {"kind": "nmpc", "comfort_weight": 50.0},
    "fallback": {"kind": "pi", "loops": []},
    "rig": {"kind": "simulated", "forecast_error": {"weather.T_out": 1.0}},
}


def test_key_paths_parse_bare_quoted_and_indexed_parts() -> None:
    assert parse_key_path("controller") == ["controller"]
    assert parse_key_path("model.buildings[1].ua") == ["model", "buildings", 1, "ua"]
    assert parse_key_path('rig.forecast_error."weather.T_out"') == [
        "rig",
        "forecast_error",
        "weather.T_out",
    ]
    for bad in ("", "a..b", "a.", 'a."b', "a b", "a[x]"):
        with pytest.raises(ValueError):
            parse_key_path(bad)


def test_overrides_replace_a_table_or_one_value_and_leave_the_base_alone() -> None:
    tables, problems = apply_overrides(
        BASE,
        {
            "controller": {"kind": "pi", "loops": []},
            "model.buildings[1].ua": 3.5,
            'rig.forecast_error."weather.T_out"': 2.0,
            "estimation.state_std": 0.5,  # a missing table is made
        },
    )
    assert problems == []
    assert tables["controller"] == {"kind": "pi", "loops": []}
    assert tables["model"]["buildings"][1]["ua"] == 3.5
    assert tables["rig"]["forecast_error"]["weather.T_out"] == 2.0
    assert tables["estimation"] == {"state_std": 0.5}
    assert BASE["model"]["buildings"][1]["ua"] == 2.0  # type: ignore[index]
    assert BASE["controller"] == {"kind": "nmpc", "comfort_weight": 50.0}


def test_overrides_that_cannot_apply_name_their_key() -> None:
    _, problems = apply_overrides(
        BASE,
        {"model.buildings[5].ua": 1.0, "scenario.name.x": 1, "a..b": 1, "model.rooms[0].x": 1},
    )
    assert len(problems) == 4
    assert problems[0].startswith('set."model.buildings[5].ua": no item [5]')
    assert problems[1].startswith('set."scenario.name.x":')
    assert problems[2].startswith('set."a..b": not a key path')
    assert problems[3].startswith('set."model.rooms[0].x": no array')


def test_a_none_controller_is_validated_with_the_fallback_table() -> None:
    tables, _ = apply_overrides(BASE, {"controller": {"kind": "none"}})
    assert validation_tables(tables)["controller"] == BASE["fallback"]
    assert validation_tables(BASE)["controller"] == BASE["controller"]


toml_values = st.recursive(
    st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.booleans()),
    lambda inner: st.dictionaries(st.text(min_size=1, max_size=4), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(min_size=1, max_size=4), toml_values, max_size=5))
def test_run_keys_ignore_table_order_and_see_seed_cycles_and_verify(tables: dict) -> None:
    key = run_key(tables, 1, 4, True)
    assert run_key(dict(reversed(list(tables.items()))), 1, 4, True) == key
    assert len({key, run_key(tables, 2, 4, True), run_key(tables, 1, 5, True)}) == 3
    assert run_key(tables, 1, 4, False) != key
    assert run_key({**tables, "__extra": 1}, 1, 4, True) != key


def test_the_matrix_is_variants_times_seeds_and_selects_by_variant_and_seed() -> None:
    plans = [VariantPlan(name, BASE, "toml", 4, {}) for name in ("mpc", "pi", "field")]
    runs = run_matrix(plans, [3, 1], verify=True, scenario_path="s.toml", series_run="pi/1")
    assert [r.run_id for r in runs] == ["mpc/3", "mpc/1", "pi/3", "pi/1", "field/3", "field/1"]
    assert [r.run_id for r in runs if r.series] == ["pi/1"]
    assert len({r.key for r in runs}) == 2  # same tables: the seed tells runs apart
    assert [r.run_id for r in select(runs, ["pi"], [1])] == ["pi/1"]
    assert len(select(runs, None, [3])) == 3
    again = RunSpec.from_dict(json.loads(json.dumps(runs[0].to_dict())))
    assert again == runs[0]


def _rows(values: dict[str, list[float]]) -> list[dict]:
    rows = []
    for variant, xs in values.items():
        for seed, x in enumerate(xs, start=1):
            rows.append(
                {"variant": variant, "seed": seed, "status": "done", "kpis": {"loss": x, "n": 1.0}}
            )
    return rows


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=8), st.lists(finite, min_size=1, max_size=8))
def test_aggregation_is_mean_std_min_max_over_each_variants_runs(a: list, b: list) -> None:
    rows = _rows({"a": a, "b": b})
    rows.append({"variant": "a", "seed": 99, "status": "failed", "error": "x", "kpis": {}})
    agg = aggregate(rows)
    for name, xs in (("a", a), ("b", b)):
        s = agg[name]["loss"]
        assert s.n == len(xs)
        assert s.mean == pytest.approx(statistics.fmean(xs), abs=1e-6)
        assert s.min == min(xs) and s.max == max(xs)
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        assert s.std == pytest.approx(std, abs=1e-6)


def test_missing_values_are_left_out_and_an_empty_kpi_is_nan() -> None:
    assert stats([1.0, math.nan, 3.0]).n == 2
    assert math.isnan(stats([math.nan]).mean)


def test_table_files_hold_every_run_and_the_same_statistics() -> None:
    rows = _rows({"mpc": [1.0, 3.0], "pi": [4.0]})
    rows[0]["kpis"]["solve"] = math.nan
    lines = list(csv.DictReader(io.StringIO(kpis_csv(rows))))
    assert [(r["variant"], r["seed"], r["loss"]) for r in lines] == [
        ("mpc", "1", "1.0"),
        ("mpc", "2", "3.0"),
        ("pi", "1", "4.0"),
    ]
    assert lines[0]["solve"] == ""
    data = json.loads(kpis_json(rows, {"loss": "s"}))
    assert data["variants"]["mpc"]["loss"]["mean"] == 2.0
    assert data["runs"][0]["kpis"]["solve"] is None
    md = markdown(rows, {"loss": "s"})
    assert "| loss [s] | 2 ± 1.41 [1, 3] | 4 ± 0 [4, 4] |" in md
    assert md.splitlines()[0] == "| KPI | mpc (n=2) | pi (n=1) |"


def _pi_run(verify: bool, cycles: int = 3) -> RunSpec:
    from parallelcity.experiment.plan import apply_overrides
    from parallelcity.scenario.text import tables_toml
    from parallelcity.toml_file import parse_toml

    from .conftest import DH

    base = parse_toml(DH.read_text())
    tables, _ = apply_overrides(base, {"controller": base["fallback"]})
    return RunSpec("pi", 3, cycles, verify, tables_toml(tables), str(DH), "k")


def test_plant_kpis_join_the_runs_kpis_and_unverified_runs_still_apply_plans(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plant that is a ``KpiSource`` (as a traffic simulator is) adds its own KPIs, read
    after the last cycle; ``verify = false`` skips the rig but still applies the plans."""
    from parallelcity.experiment import loop
    from parallelcity.twin.model import KpiSource

    made = []
    real = loop._make_plant

    def counting_plant(scenario, seed):  # the real field plant, with a KPI of its own
        plant = real(scenario, seed)

        class Counted(type(plant)):  # type: ignore[misc]
            def kpis(self) -> dict[str, float]:
                return {"advanced_to_h": (self.t - scenario.meta.start_epoch) / 3600.0}

        plant.__class__ = Counted
        made.append(plant)
        return plant

    monkeypatch.setattr(loop, "_make_plant", counting_plant)
    got = loop.run_one(_pi_run(verify=False), tmp_path)
    assert isinstance(made[0], KpiSource)
    assert got.kpis["advanced_to_h"] == 0.75  # 3 cycles of 15 minutes, the last one included
    assert got.plant_kpis == ("advanced_to_h",)
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["kpis"]["advanced_to_h"] == 0.75 and data["verify"] is False
    assert data["summary"]["acked"] == 3 and data["kpis"]["rejected_plans"] == 0


def test_a_plant_simulator_reports_its_simulators_kpis(scenario) -> None:
    from parallelcity.hil.plant import PlantSimulator

    model = scenario.model
    plant = PlantSimulator(
        model, model.nominal, lambda t: model.forecast(t, 1, 1.0)[0], model.x0, model.u0, 0.0
    )
    assert plant.kpis() == {}  # the CasADi form measures none

    class Measuring:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def kpis(self) -> dict[str, float]:
            return {"teleports": 0.0}

    plant._plant = Measuring(plant._plant)
    assert plant.kpis() == {"teleports": 0.0}
