"""``[diagnosis]``: which residuals are watched, how noisy they are, what a false alarm may
cost, and which fault kinds are weighed."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from pydantic import BaseModel, ConfigDict, Field

from parallelcity.twin.model import SubsystemModel

from .detect import DetectorSettings
from .diagnoser import DiagnosisSettings


class DiagnosisConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = Field(True, description="false: the table is kept but nothing is diagnosed")
    noise: dict[str, float] = Field(
        min_length=1,
        description="residual channels: measured output -> standard deviation of its "
        "one-cycle-ahead residual in fault-free operation (sensor noise plus model "
        "mismatch), in the output's unit",
    )
    false_alarms_per_week: float = Field(
        1.0, gt=0, le=1000, description="target rate of false alarms per simulated week"
    )
    window_cycles: int = Field(
        12, ge=2, le=500, description="cycles fitted to isolate a fault, half after its detection"
    )
    warmup_cycles: int = Field(
        16, ge=1, le=10000, description="cycles learning the fault-free residual baseline"
    )
    baseline_cycles: float = Field(
        96.0, ge=0, description="time constant of the baseline's average, cycles (0: fixed)"
    )
    drift_allowance: float = Field(
        1.0, gt=0, le=10, description="CUSUM allowance k in noise sigmas (shifts of 2k matter)"
    )
    outlier_clip: float | None = Field(
        None,
        gt=0,
        description="a cycle's residual counts at most this many noise sigmas in the CUSUM "
        "(none: as it is); above the drift allowance",
    )
    min_explained: float = Field(
        0.5, ge=0, lt=1, description="share of the residuals the best fault must explain"
    )
    faults: list[str] | None = Field(
        None, description="fault kinds weighed (default: every kind the model declares)"
    )


def check(cfg: DiagnosisConfig, model: SubsystemModel, measured: Collection[str]) -> list[str]:
    """Problems of the table against the model and the field's points, with key paths."""
    problems = []
    for name, std in cfg.noise.items():
        if name in model.measured_only:
            problems.append(
                f"diagnosis.noise: {name!r} is measured only: the twin does not predict it, "
                "so it has no residual"
            )
        elif name not in model.outputs:
            problems.append(f"diagnosis.noise: {name!r} is not an output of the model")
        elif name in model.disturbances:
            problems.append(
                f"diagnosis.noise: {name!r} is a measured disturbance: the twin takes it as "
                "read, so its residual is always zero"
            )
        elif name not in measured:
            problems.append(f"diagnosis.noise: {name!r} has no point in [[field.points]]")
        if not std > 0:
            problems.append(f"diagnosis.noise.{name}: must be positive, got {std}")
    if cfg.outlier_clip is not None and cfg.outlier_clip <= cfg.drift_allowance:
        problems.append("diagnosis.outlier_clip: must exceed drift_allowance")
    known = [k.name for k in model.fault_kinds]
    for i, name in enumerate(cfg.faults or []):
        if name not in known:
            problems.append(
                f"diagnosis.faults[{i}]: {name!r} is not a fault kind of model {model.name!r} "
                f"(kinds: {', '.join(known)})"
            )
    return problems


def settings(
    cfg: DiagnosisConfig,
    model: SubsystemModel,
    dt: float,
    input_bounds: Mapping[str, tuple[float, float]],
    resolution: Mapping[str, float] | None = None,
) -> DiagnosisSettings:
    chosen = set(cfg.faults) if cfg.faults is not None else None
    kinds = tuple(k for k in model.fault_kinds if chosen is None or k.name in chosen)
    detector = DetectorSettings(
        dict(cfg.noise),
        dt,
        cfg.false_alarms_per_week,
        k=cfg.drift_allowance,
        warmup=cfg.warmup_cycles,
        baseline_cycles=cfg.baseline_cycles,
        clip=math.inf if cfg.outlier_clip is None else cfg.outlier_clip,
    )
    return DiagnosisSettings(
        detector,
        kinds,
        cfg.window_cycles,
        dict(input_bounds),
        cfg.min_explained,
        {n: float(v) for n, v in (resolution or {}).items() if n in cfg.noise},
    )
