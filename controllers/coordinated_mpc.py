"""The ``coordinated_mpc`` controller kind: ``linear_mpc`` on the splits of a coordinated plan.

The splits come from ``linear_mpc`` (its whole configuration applies); the cycle and the
offsets are then set for the corridor as a whole, as coordinated operation needs them:

* one **common cycle** for every junction, by Webster's method from the forecast
  (``controllers/webster.py``), with each green phase's start-up lost time
  (``startup_lost_s``) counted in the lost time, which the cycle-averaged model lacks;
* offsets a **green wave** from ``wave_from`` at that cycle.

Both are moved within the input bounds and rate limits, and the plan's predictions are the
model's simulation of the plan sent.  Price the cycle moves high in ``move_weights`` so that
the QP plans its splits at the cycle that will run.  Refuses any model but a
``signal_corridor``.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from parallelcity.decide.control import (
    ControlInput,
    ControlProblem,
    ControlResult,
    KindOf,
    SolveStatus,
    guarded_step,
    require_fit,
)

from . import webster
from .baseline import _Limits, _result, _Simulator
from .linear_mpc_kind import Config as MpcConfig
from .linear_mpc_kind import LinearMpcController


class Config(MpcConfig):
    """``kind = "coordinated_mpc"``: ``linear_mpc``'s keys and the coordination's."""

    kind: str = "coordinated_mpc"
    cycle_min_s: float = Field(40.0, gt=0, le=600, allow_inf_nan=False)
    cycle_max_s: float = Field(120.0, gt=0, le=600, allow_inf_nan=False)
    startup_lost_s: float = Field(
        2.0, ge=0, le=10, allow_inf_nan=False, description="per green phase, in the cycle"
    )
    wave_from: str | None = Field(None, description="junction the green wave starts at")

    def webster(self) -> webster.Config:
        return webster.Config(
            cycle_min_s=self.cycle_min_s,
            cycle_max_s=self.cycle_max_s,
            coordinated=True,
            wave_from=self.wave_from,
            startup_lost_s=self.startup_lost_s,
        )

    def problems(self, problem: ControlProblem) -> list[str]:
        if self.cycle_min_s > self.cycle_max_s:
            return [f"cycle_min_s {self.cycle_min_s} is above cycle_max_s"]
        return [
            *self.webster().problems(problem),
            *super().problems(problem),
        ]


class CoordinatedMpcController:
    """See the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._mpc = LinearMpcController(MpcConfig.model_validate(_mpc_fields(config)))
        self._webster = webster.WebsterController(config.webster())
        self._problem: ControlProblem | None = None

    def setup(self, problem: ControlProblem) -> None:
        require_fit("coordinated_mpc", self.config.problems(problem))
        self._mpc.setup(problem)
        self._webster.setup(problem)
        m = problem.model
        self._coord = [
            i for i, n in enumerate(m.inputs) if n.endswith(".cycle_s") or n.endswith(".offset_s")
        ]
        self._limits = _Limits(problem)
        self._sim = _Simulator(problem)
        self._problem = problem

    def step(self, inp: ControlInput) -> ControlResult:
        return guarded_step("coordinated_mpc", self._problem, inp, self._step, check_input=False)

    def _step(self, problem: ControlProblem, inp: ControlInput, t_start: float) -> ControlResult:
        res = self._mpc.step(inp)
        if res.status is not SolveStatus.SOLVED:
            return res
        lim, idx = self._limits, self._coord
        dist = np.asarray(inp.disturbances, dtype=float)
        plan = np.array(res.u_plan, dtype=float)
        u_start = lim.start(inp.u_prev, problem.model.u0)
        u = u_start
        for k in range(problem.horizon):
            # moves are element-wise, so only the cycle and offset entries take Webster's
            wave = self._webster.target(np.clip(dist[k], 0.0, None))
            plan[k, idx] = lim.move(wave, u)[idx]
            u = plan[k]
        out = _result(problem, lim, self._sim, inp, u_start, plan, None, t_start)
        if out.status is SolveStatus.SOLVED:
            out.extra.update(res.extra)
        return out


def _mpc_fields(config: Config) -> dict[str, object]:
    own = set(Config.model_fields) - set(MpcConfig.model_fields)
    data = {k: v for k, v in config.model_dump().items() if k not in own}
    data["kind"] = "linear_mpc"
    return data


KIND = KindOf(Config, CoordinatedMpcController)
__all__ = ["KIND", "Config", "CoordinatedMpcController"]
