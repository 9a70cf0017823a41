"""Plug-ins load as their declared Protocol types, checked when loaded, and every kind's
config is checked against the scenario's model and specs at validate time."""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from parallelcity import cli, plugins
from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    SolveStatus,
    guarded_step,
)
from parallelcity.errors import PluginError, ScenarioError
from parallelcity.scenario.definition import load_scenario, validation_problem

CORPUS = Path(__file__).parent / "scenario_corpus"

# each passed `validate` before the kinds checked their configs against the problem, then
# `run` ended in a ValueError traceback from the controller's setup (exit 1)
SETUP_FAILED_AT_RUN = {
    "cross_pi_loop_unbanded.toml": "fallback.loops[0].output",
    "cross_pi_input_twice.toml": "fallback.loops[1].input",
    "cross_pi_curve_and_loop_one_input.toml": "fallback.curves[0].input",
    "cross_hysteresis_unbanded.toml": "fallback.loops[0].output",
    "cross_hysteresis_on_equals_off.toml": "fallback.loops[0]",
    "cross_nmpc_state_bounds_reversed.toml": "controller.state_bounds",
}


class _NoCreate:
    """A controller kind that forgot ``create``."""

    class Config(BaseModel):
        kind: str = "no_create"

    @staticmethod
    def check(config: BaseModel, problem: ControlProblem) -> list[str]:
        return []


class _ConfigNotAModel:
    Config = dict

    @staticmethod
    def check(config: BaseModel, problem: ControlProblem) -> list[str]:
        return []

    @staticmethod
    def create(config: BaseModel) -> Any:
        return None


NO_CREATE = _NoCreate()
CONFIG_NOT_A_MODEL = _ConfigNotAModel()


@pytest.fixture
def broken_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two extra controller entry points beside the installed ones."""
    real = plugins.entry_points
    extra = [
        EntryPoint("no_create", f"{__name__}:NO_CREATE", "parallelcity.controllers"),
        EntryPoint("bad_config", f"{__name__}:CONFIG_NOT_A_MODEL", "parallelcity.controllers"),
    ]

    def entry_points(*, group: str) -> list[EntryPoint]:
        found = list(real(group=group))
        return found + extra if group == "parallelcity.controllers" else found

    monkeypatch.setattr(plugins, "entry_points", entry_points)


def test_every_installed_kind_satisfies_its_protocol() -> None:
    for role in plugins.GROUPS:
        kinds = plugins.available(role)
        assert kinds, role
        broken = {name: k for name, k in kinds.items() if isinstance(k, PluginError)}
        assert not broken, broken


def test_a_kind_lacking_a_member_is_a_plugin_error_naming_it(broken_kinds: None) -> None:
    with pytest.raises(PluginError, match=r"'no_create' is not a ControllerKind: it lacks create"):
        plugins.controller_kind("no_create")
    with pytest.raises(PluginError, match=r"Config \(not a pydantic model class\)"):
        plugins.controller_kind("bad_config")
    kinds = plugins.available("controller")  # the broken ones do not hide the others
    assert isinstance(kinds["no_create"], PluginError)
    assert not isinstance(kinds["nmpc"], PluginError)


def test_validate_refuses_a_scenario_naming_a_kind_lacking_a_member(
    broken_kinds: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (CORPUS / "valid_base.toml").read_text()
    path = tmp_path / "s.toml"
    path.write_text(text.replace('kind = "nmpc"', 'kind = "no_create"', 1))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr()
    assert "controller.kind" in err.out + err.err and "lacks create" in err.out + err.err
    assert "Traceback" not in err.out + err.err


def test_an_unknown_kind_names_the_installed_ones() -> None:
    with pytest.raises(PluginError, match=r"unknown rig kind 'nope' \(installed: .*simulated"):
        plugins.rig_kind("nope")


@pytest.mark.parametrize("name", sorted(SETUP_FAILED_AT_RUN))
def test_what_setup_would_refuse_validate_refuses_with_the_key_path(name: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(CORPUS / name)
    assert any(p.startswith(SETUP_FAILED_AT_RUN[name]) for p in info.value.problems), (
        info.value.problems
    )


def test_validate_checks_against_the_problem_run_builds(dh: Any) -> None:
    """The problem the kinds are checked against at validate time is the run's."""
    got = validation_problem(dh.file, dh.model)
    want = dh.safety_specs().control_problem(dh.model, dh.meta.cycle_s, dh.meta.horizon_steps)
    assert (got.dt, got.horizon, got.banded_outputs) == (want.dt, want.horizon, want.banded_outputs)
    for a, b in ((got.u_min, want.u_min), (got.u_max, want.u_max), (got.du_max, want.du_max)):
        np.testing.assert_array_equal(a, b)
    for role, cfg in (("controller", dh.controller_config), ("fallback", dh.fallback_config)):
        kind = plugins.controller_kind(getattr(dh.file, role).kind)
        assert kind.check(cfg, want) == []
    # what validate accepted sets up (the fallback: the nmpc's NLP build takes seconds)
    plugins.controller_kind(dh.file.fallback.kind).create(dh.fallback_config).setup(want)


def test_setup_refuses_what_check_reports(dh: Any) -> None:
    """A caller that skips validate gets the same lines from setup, as one ValueError."""
    problem = validation_problem(dh.file, dh.model)
    kind = plugins.controller_kind("hold")
    cfg = kind.Config.model_validate({"values": {"no.such": 1.0}})
    assert kind.check(cfg, problem) == [
        f"values['no.such']: 'no.such' is not an input of model 'district_heating' "
        f"(inputs: {', '.join(dh.model.inputs)})"
    ]
    with pytest.raises(ValueError, match=r"hold: values\['no.such'\]"):
        kind.create(cfg).setup(problem)


def test_guarded_step_reports_trouble_as_failed_and_refuses_before_setup(dh: Any) -> None:
    problem = validation_problem(dh.file, dh.model)
    inp = ControlInput(0.0, dh.model.x0, dh.model.u0, np.zeros((1, 1)), np.zeros(1), np.zeros(1))
    dropped: list[bool] = []

    def boom(p: ControlProblem, i: ControlInput, t: float) -> ControlResult:
        raise ZeroDivisionError("no")

    res = guarded_step("k", problem, inp, boom, lambda: dropped.append(True))
    assert res.status is SolveStatus.FAILED and res.message == "k: ZeroDivisionError: no"
    assert np.isnan(res.u_plan).all() and dropped == [True]
    with pytest.raises(RuntimeError, match="before setup"):
        guarded_step("k", None, inp, boom)


def test_the_rig_state_machine_is_core_not_the_builtin_package() -> None:
    from parallelcity.verify.machine import RigMachine

    simulated = plugins.rig_kind("simulated")
    assert type(simulated).__module__ == "parallelcity.hil.simulated"
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("parallelcity.hil.rig_machine")
    assert RigMachine.__module__ == "parallelcity.verify.machine"


def test_the_optimising_kinds_share_one_objective_config() -> None:
    from parallelcity.controllers import linear_mpc_kind, nmpc
    from parallelcity.controllers.objective import Objective

    assert issubclass(nmpc.Config, Objective) and issubclass(linear_mpc_kind.Config, Objective)
    assert nmpc.Tracking is linear_mpc_kind.Tracking
