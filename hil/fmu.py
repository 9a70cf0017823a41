"""The ``fmu`` rig kind: any FMI 2.0 co-simulation FMU, driven through FMPy.

Inputs, disturbances and outputs are mapped by name between the scenario's
model and the FMU's model description (a signal the table does not map is
looked up under its own name); the mapping is checked against the model
description when the scenario is loaded, so a misspelt variable is a scenario
error with its key path, not a failed cycle.

Reset: the FMU is reset (``fmi2Reset``), the state's start variables
(``states``) are set from the state the plan starts from, sample ``s >= 1``
sets each ``parameter_ranges`` variable to a seeded draw in its range, then
initialisation runs at the plan's start time.  Outputs the FMU does not map
read as NaN.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from parallelcity.twin.model import Array, SubsystemModel
from parallelcity.verify.machine import RigMachine
from parallelcity.verify.rig import resolve_path, value_error_lines


class Config(BaseModel):
    """``[rig]`` section of a scenario with ``kind = "fmu"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str = "fmu"
    path: str = Field(
        description="the .fmu file (FMI 2.0, co-simulation); a relative path is relative to "
        "the file it is written in (the scenario, or the --rig-config file)"
    )
    inputs: dict[str, str] = Field(
        default_factory=dict, description="model input -> FMU input variable"
    )
    disturbances: dict[str, str] = Field(
        default_factory=dict, description="model disturbance -> FMU input variable"
    )
    outputs: dict[str, str] = Field(
        default_factory=dict, description="model output -> FMU variable"
    )
    states: dict[str, str] = Field(
        default_factory=dict, description="model state -> FMU variable set to it on reset"
    )
    samples: int = Field(
        1, ge=1, le=4096, description="uncertainty samples; sample 0 is the FMU as built"
    )
    seed: int = Field(0, description="draw of the parameter samples")
    parameter_ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="FMU parameter -> [low, high] drawn for samples 1.."
    )
    max_step_s: float | None = Field(
        None, gt=0, description="longest single doStep; a longer advance is split"
    )

    @field_validator("path")
    @classmethod
    def _relative_to_its_file(cls, v: str, info: ValidationInfo) -> str:
        return resolve_path(v, info)

    @model_validator(mode="after")
    def _ranges(self) -> Config:
        for name, (lo, hi) in self.parameter_ranges.items():
            if not lo <= hi:
                raise ValueError(f"parameter_ranges[{name!r}]: low {lo} is above high {hi}")
        return self


def _description(path: str) -> Any:
    from fmpy import read_model_description

    try:
        return read_model_description(path)
    except Exception as exc:  # fmpy raises plain exceptions for a missing or bad file
        raise ValueError(f"rig.path: cannot read FMU {path!r}: {exc}") from exc


def _mapping(cfg: Config, model: SubsystemModel, md: Any) -> dict[str, dict[str, Any]]:
    """Resolve every mapped name to its FMU variable; ValueError names the bad key."""
    if md.fmiVersion != "2.0" or md.coSimulation is None:
        raise ValueError(
            f"rig.path: {cfg.path!r} is not an FMI 2.0 co-simulation FMU "
            f"(FMI {md.fmiVersion}, co-simulation {'yes' if md.coSimulation else 'no'})"
        )
    by_name = {v.name: v for v in md.modelVariables}
    out: dict[str, dict[str, Any]] = {"inputs": {}, "disturbances": {}, "outputs": {}, "states": {}}

    def var(table: str, signal: str, fmu_name: str, causalities: tuple[str, ...]) -> None:
        v = by_name.get(fmu_name)
        if v is None:
            near = ", ".join(sorted(n for n, x in by_name.items() if x.causality in causalities))
            raise ValueError(
                f"rig.{table}[{signal!r}]: the FMU has no variable {fmu_name!r} "
                f"(its {'/'.join(causalities)} variables: {near})"
            )
        if v.causality not in causalities or v.type != "Real":
            raise ValueError(
                f"rig.{table}[{signal!r}]: FMU variable {fmu_name!r} is a {v.causality} "
                f"{v.type}, expected a Real {' or '.join(causalities)}"
            )
        out[table][signal] = v

    for table, signals, causalities, required in (
        ("inputs", model.inputs, ("input",), True),
        ("disturbances", model.disturbances, ("input",), False),
        ("outputs", model.outputs, ("output", "local"), False),
        ("states", model.states, ("parameter", "input"), False),
    ):
        given: dict[str, str] = getattr(cfg, table)
        for signal in given:
            if signal not in signals:
                raise ValueError(
                    f"rig.{table}[{signal!r}]: not a {table[:-1]} of model {model.name!r}"
                )
        for signal in signals:
            if signal in given:
                var(table, signal, given[signal], causalities)
            elif signal in by_name and by_name[signal].causality in causalities:
                var(table, signal, signal, causalities)
            elif required:
                raise ValueError(
                    f"rig.{table}: model {table[:-1]} {signal!r} has no FMU variable; map it"
                )
    for name in cfg.parameter_ranges:
        v = by_name.get(name)
        if v is None or v.causality != "parameter" or v.type != "Real":
            raise ValueError(f"rig.parameter_ranges[{name!r}]: not a Real parameter of the FMU")
    if not out["outputs"]:
        raise ValueError("rig.outputs: no model output maps to an FMU variable")
    return out


def check(config: BaseModel, model: SubsystemModel) -> None:
    cfg = _as_config(config)
    _mapping(cfg, model, _description(cfg.path))


def _as_config(config: BaseModel) -> Config:
    if not isinstance(config, Config):
        raise TypeError(f"expected an fmu rig Config, got {type(config).__name__}")
    return config


class FmuDriver:
    """Rig driver for one FMU instance (FMPy ``FMU2Slave``)."""

    def __init__(self, cfg: Config, model: SubsystemModel) -> None:
        from fmpy import extract
        from fmpy.fmi2 import FMU2Slave

        self.cfg = cfg
        self.model = model
        md = _description(cfg.path)
        self.map = _mapping(cfg, model, md)
        self.name = f"fmu({Path(cfg.path).name})"
        self._dir = tempfile.mkdtemp(prefix="parallelcity-fmu-")
        extract(cfg.path, self._dir)
        self._fmu = FMU2Slave(
            guid=md.guid,
            unzipDirectory=self._dir,
            modelIdentifier=md.coSimulation.modelIdentifier,
            instanceName="parallelcity-rig",
        )
        self._fmu.instantiate(loggingOn=False)
        self._initialized = False
        self._t = 0.0
        self._draws = self._sample_draws(md)

        def vrs(table: str, names: tuple[str, ...]) -> tuple[list[int], list[int]]:
            idx = [i for i, n in enumerate(names) if n in self.map[table]]
            return idx, [self.map[table][names[i]].valueReference for i in idx]

        self._u_idx, self._u_vr = vrs("inputs", model.inputs)
        self._d_idx, self._d_vr = vrs("disturbances", model.disturbances)
        self._y_idx, self._y_vr = vrs("outputs", model.outputs)
        self._x_idx, self._x_vr = vrs("states", model.states)

    def _sample_draws(self, md: Any) -> list[dict[int, float]]:
        by_name = {v.name: v for v in md.modelVariables}
        draws: list[dict[int, float]] = [{}]
        names = sorted(self.cfg.parameter_ranges)
        for s in range(1, self.cfg.samples):
            rng = np.random.default_rng([self.cfg.seed & 0xFFFFFFFF, s])
            draws.append(
                {
                    by_name[n].valueReference: float(rng.uniform(*self.cfg.parameter_ranges[n]))
                    for n in names
                }
            )
        return draws

    @property
    def samples(self) -> int:
        return self.cfg.samples

    def reset(self, x0: Array, t0: float, sample: int) -> None:
        if self._initialized:
            self._fmu.reset()
        self._fmu.setupExperiment(startTime=float(t0))
        if self._x_vr:
            self._fmu.setReal(self._x_vr, [float(x0[i]) for i in self._x_idx])
        draw = self._draws[sample]
        if draw:
            self._fmu.setReal(list(draw), list(draw.values()))
        self._fmu.enterInitializationMode()
        self._fmu.exitInitializationMode()
        self._initialized = True
        self._t = float(t0)

    def apply(self, u: Array, d: Array) -> None:
        if self._u_vr:
            self._fmu.setReal(self._u_vr, [float(u[i]) for i in self._u_idx])
        if self._d_vr:
            self._fmu.setReal(self._d_vr, [float(d[i]) for i in self._d_idx])

    def advance(self, dt: float) -> None:
        left = float(dt)
        longest = self.cfg.max_step_s or left
        while left > 1e-9:
            h = min(longest, left)
            status = self._fmu.doStep(currentCommunicationPoint=self._t, communicationStepSize=h)
            if status not in (None, 0):
                raise RuntimeError(f"doStep at t={self._t} returned status {status}")
            self._t += h
            left -= h

    def read(self) -> Array:
        y = np.full(self.model.ny, np.nan)
        if self._y_vr:
            y[self._y_idx] = self._fmu.getReal(self._y_vr)
        return y

    def close(self) -> None:
        try:
            if self._initialized:
                self._fmu.terminate()
            self._fmu.freeInstance()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


class _Kind:
    """Entry point object for ``kind = "fmu"`` (``parallelcity.rigs``)."""

    Config = Config

    @staticmethod
    def check(config: BaseModel, model: SubsystemModel) -> list[str]:
        return value_error_lines(lambda: check(config, model))

    @staticmethod
    def driver(config: BaseModel, model: SubsystemModel) -> FmuDriver:
        return FmuDriver(_as_config(config), model)

    @staticmethod
    def verification_rig(config: BaseModel, model: SubsystemModel) -> RigMachine:
        return RigMachine(_Kind.driver(config, model))

    @staticmethod
    def field_stand_in(config: BaseModel, scenario: Any, clock: Any) -> Any:
        raise ValueError(
            "rig kind 'fmu' verifies plans but cannot stand in for the field: give the "
            "scenario a field endpoint, or use the 'simulated' rig for the embedded run"
        )


KIND = _Kind()
