"""The cycle's pure decision logic assembled from a scenario, for every loop that decides
(``run`` against the field, ``experiment`` on the rig's plant): twin and estimator,
controller and fallback, the verifier on the scenario's rig, the simplex gate, and the
divergence monitor.  Builds objects only; no I/O of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from parallelcity import plugins
from parallelcity.decide.choice import controller_settings
from parallelcity.decide.cycle import CycleLogic
from parallelcity.decide.gate import SimplexGate
from parallelcity.twin.divergence import DivergenceMonitor, DivergenceSettings
from parallelcity.twin.estimate import ExtendedKalmanFilter
from parallelcity.twin.twin import Twin
from parallelcity.verify.verifier import SampleRunner, Verifier

if TYPE_CHECKING:
    from parallelcity.scenario.definition import Scenario


def estimator(scenario: Scenario) -> ExtendedKalmanFilter | None:
    est = scenario.file.estimation
    if est is None:
        return None
    return ExtendedKalmanFilter(
        scenario.model,
        scenario.meta.cycle_s,
        biases=est.biases,
        state_std=est.state_std,
        bias_std=est.bias_std,
        measurement_std=est.measurement_std,
    )


def cycle_logic(
    scenario: Scenario,
    controller_kind: str | None = None,
    *,
    runner: SampleRunner | None = None,
    deadline_s: float | None = None,
    end_t: float | None = None,
) -> tuple[str, CycleLogic]:
    """The cycle's pure decision logic, set up: twin, controller and fallback, the verifier
    on the scenario's rig (its samples on ``runner``, serially if None) and the gate;
    ``end_t``, the simulated time the run ends, is the controllers' to know."""
    specs, model, meta = scenario.safety_specs(), scenario.model, scenario.meta
    kind, cfg = controller_settings(scenario, controller_kind)
    controller = plugins.controller_kind(kind).create(cfg)
    fallback = plugins.controller_kind(scenario.file.fallback.kind).create(scenario.fallback_config)
    twin = Twin(model, specs, meta.cycle_s, meta.horizon_steps, estimator(scenario))
    rig = plugins.rig_kind(scenario.file.rig.kind).verification_rig(scenario.rig_config, model)
    verifier = Verifier(specs, rig, meta.cycle_s, runner=runner, deadline_s=deadline_s)
    gate = SimplexGate(scenario.file.verification.reverify_cycles)
    logic = CycleLogic(twin, controller, fallback, verifier, gate, end_t)
    logic.setup()
    return kind, logic


def divergence_monitor(scenario: Scenario) -> DivergenceMonitor | None:
    cfg = scenario.file.divergence
    if cfg is None:
        return None
    settings = DivergenceSettings(
        cfg.thresholds, cfg.window_cycles, cfg.persist_cycles, cfg.clear_cycles
    )
    return DivergenceMonitor(scenario.model, scenario.meta.cycle_s, settings)
