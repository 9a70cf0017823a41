"""Scenario definition files: TOML, validated by typed models with unknown keys forbidden.

``load_scenario(path)`` returns a ``Scenario`` whose plug-in sections
(``model``, ``controller``, ``fallback``, ``rig``) are validated against the
``Config`` of the kind they name, and cross-checked against the built model
(every point, input and spec names a real signal).  Every problem is reported
at once, each with its key path, in one ``ScenarioError``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from parallelcity import plugins
from parallelcity.decide.control import ControllerKind, ControlProblem
from parallelcity.diagnose.config import DiagnosisConfig
from parallelcity.diagnose.config import check as check_diagnosis
from parallelcity.dispatch.wire import MAX_ISSUER_BYTES, check_issuer_name, name_problem
from parallelcity.errors import PluginError, ScenarioError, WireFormatError
from parallelcity.field.config import FieldConfig
from parallelcity.field.protocols import field_json_schema, field_model, validate_field
from parallelcity.specs import (
    BandSpec,
    InputSpec,
    InterlockSpec,
    SafetySpecs,
    TemporalSpec,
)
from parallelcity.toml_file import parse_toml, read_text_bounded
from parallelcity.twin.kind import ModelKind
from parallelcity.twin.model import SubsystemModel
from parallelcity.twin.schedule import zone_context, zone_of
from parallelcity.verify.rig import BASE_DIR, RigKind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


RUN_SUFFIX_BYTES = 9
"""A run against the embedded gateway speaks as ``<name>-<8 hex>``."""


class Meta(_Strict):
    name: str = Field(
        min_length=1,
        description="the scenario's name; also the issuer its commands carry, so it follows "
        f"the wire's name rule in at most {MAX_ISSUER_BYTES - RUN_SUFFIX_BYTES} UTF-8 bytes",
    )
    description: str = ""
    start: dt.datetime = Field(
        description="simulated start time; without an offset it is read in time_zone"
    )
    time_zone: str = Field(
        "UTC",
        description="IANA time zone (e.g. 'Europe/Berlin') of the periods' times of day and "
        "weekdays, daylight saving included",
    )
    cycle_s: float = Field(gt=0, le=86400, description="control period, simulated seconds")
    horizon_steps: int = Field(ge=1, le=500, description="prediction horizon, in cycles")
    cycles: int = Field(96, ge=1, description="default number of cycles for `run`")
    speed: float = Field(
        1.0,
        ge=1e-3,
        le=1e6,
        description="simulated seconds per wall second, 0.001 to 1e6 (embedded default only)",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        description="simulated seconds a cycle may take, at most cycle_s; default 0.8 * cycle_s",
    )
    min_acked_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="`run` succeeds (exit 0) only if commands were acked on at least this "
        "share of its cycles; otherwise it exits 6",
    )

    @field_validator("name")
    @classmethod
    def _name_can_issue(cls, v: str) -> str:
        why = name_problem(v, "name", MAX_ISSUER_BYTES - RUN_SUFFIX_BYTES)
        if why is not None:
            raise ValueError(f"{why} (the name is the issuer of the run's commands)")
        return v

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        zone_of(v)
        return v

    @property
    def zone(self) -> dt.tzinfo:
        return zone_of(self.time_zone)

    @field_validator("deadline_s")
    @classmethod
    def _deadline_within_cycle(cls, v: float | None, info: ValidationInfo) -> float | None:
        cycle = info.data.get("cycle_s")
        if v is not None and cycle is not None and v > cycle:
            raise ValueError(
                f"deadline_s {v:g} is above cycle_s {cycle:g}: a cycle must end before the "
                "next one starts"
            )
        return v

    @property
    def start_epoch(self) -> float:
        start = self.start if self.start.tzinfo else self.start.replace(tzinfo=self.zone)
        return start.timestamp()

    @property
    def deadline(self) -> float:
        return self.deadline_s if self.deadline_s is not None else 0.8 * self.cycle_s


class OpcUaSecurity(_Strict):
    """``[security.opcua]``: how the runtime's OPC UA clients connect.  Paths are relative to
    the scenario file; ``parallelcity certs DIR`` creates a matching set."""

    policy: Literal["Basic256Sha256", "Aes256_Sha256_RsaPss"] = Field(
        "Basic256Sha256", description="security policy (mode is always SignAndEncrypt)"
    )
    certificate: str = Field(description="this client's certificate (DER or PEM)")
    private_key: str = Field(description="this client's private key (PEM)")
    trusted: str = Field(description="folder of trusted server (or CA) certificates")
    username: str | None = Field(None, description="user name token")
    password_env: str | None = Field(
        None, description="environment variable holding the user's password"
    )
    user_certificate: str | None = Field(None, description="X.509 user token certificate")
    user_private_key: str | None = Field(None, description="private key of the user certificate")
    anonymous: bool = Field(
        False,
        description="no user token: an anonymous session on the SignAndEncrypt channel (the "
        "certificate still authenticates this application); for servers that allow no users",
    )

    @model_validator(mode="after")
    def _one_user_token(self) -> OpcUaSecurity:
        tokens = (self.username is not None) + (self.user_certificate is not None)
        if self.anonymous and tokens:
            raise ValueError("anonymous = true excludes username and user_certificate")
        if not self.anonymous and tokens != 1:
            raise ValueError(
                "give exactly one user token: username or user_certificate "
                "(or anonymous = true for a server that allows only anonymous sessions)"
            )
        if self.username is not None and self.password_env is None:
            raise ValueError("username needs password_env (passwords never go in the file)")
        if self.user_certificate is not None and self.user_private_key is None:
            raise ValueError("user_certificate needs user_private_key")
        return self


class ZmqSecurity(_Strict):
    """``[security.zmq]``: CURVE towards a separately running gateway (``run --gateway``).
    Paths are relative to the scenario file; ``parallelcity keys DIR NAME`` makes key pairs.
    ``issuer`` must be the issuer the gateway's config binds to this key.
    The embedded gateway needs none: keys are generated for each run."""

    client_secret_key: str = Field(description="this runtime's CURVE secret key file (0600)")
    gateway_public_key: str = Field(description="the gateway's CURVE public key file")
    issuer: str | None = Field(
        None,
        description="the issuer the gateway binds to this key (default: the scenario's name); "
        "1..64 UTF-8 bytes of letters, marks, numbers, punctuation, symbols and spaces",
    )

    @model_validator(mode="after")
    def _issuer_on_the_wire(self) -> ZmqSecurity:
        if self.issuer is not None:
            try:
                check_issuer_name(self.issuer, "issuer")
            except WireFormatError as exc:
                raise ValueError(str(exc)) from None
        return self


class Security(_Strict):
    insecure_lab: bool = Field(
        False,
        description="run OPC UA and ZeroMQ without encryption or authentication (lab only)",
    )
    opcua: OpcUaSecurity | None = Field(
        None, description="OPC UA client security; required against real equipment"
    )
    zmq: ZmqSecurity | None = Field(
        None, description="ZeroMQ CURVE keys; required to dispatch to a separate gateway"
    )


class Specs(_Strict):
    inputs: list[InputSpec] = Field(min_length=1)
    bands: list[BandSpec] = Field(default_factory=list)
    interlocks: list[InterlockSpec] = Field(default_factory=list)
    temporal: list[TemporalSpec] = Field(default_factory=list)


class Verification(_Strict):
    """How plans are verified: uncertainty samples in parallel, deadline, simplex gate."""

    workers: int = Field(
        0, ge=0, le=64, description="processes running uncertainty samples; 0 = in the cycle"
    )
    deadline_s: float | None = Field(
        None, gt=0, description="simulated seconds one verification may take (default: cycle's)"
    )
    reverify_cycles: int = Field(
        3, ge=1, description="consecutive verified cycles before control returns to the controller"
    )


class PluginSection(BaseModel):
    """``kind`` picks the plug-in; the other keys are its own ``Config``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str


class DivergenceConfig(_Strict):
    """``[divergence]``: when the twin no longer agrees with the field, use the fallback."""

    thresholds: dict[str, float] = Field(
        min_length=1, description="output -> largest tolerated |measured - predicted|"
    )
    window_cycles: int = Field(4, ge=1, description="cycles the twin predicts ahead")
    persist_cycles: int = Field(3, ge=1, description="cycles beyond threshold before the alarm")
    clear_cycles: int = Field(4, ge=1, description="cycles within threshold before it clears")


class EstimationConfig(_Strict):
    """``[estimation]``: fuse the points with the model (extended Kalman filter) instead of
    reading each state from its own point."""

    kind: Literal["ekf"] = "ekf"
    biases: list[str] = Field(
        default_factory=list, description="disturbances whose slow offset is estimated"
    )
    state_std: float | dict[str, float] = Field(0.05, description="process noise per cycle")
    bias_std: float | dict[str, float] = Field(0.05, description="offset random walk per cycle")
    measurement_std: float | dict[str, float] = Field(
        0.1,
        description="noise of each measured output in its own unit (K, kW...): give it per "
        "output, or a model mismatch in kW outputs drags the temperatures along",
    )


class ScenarioFile(_Strict):
    scenario: Meta
    security: Security = Security()
    model: PluginSection
    field: FieldConfig
    controller: PluginSection
    fallback: PluginSection
    rig: PluginSection
    specs: Specs
    verification: Verification = Verification()
    divergence: DivergenceConfig | None = None
    estimation: EstimationConfig | None = None
    diagnosis: DiagnosisConfig | None = None

    @field_validator("field", mode="before")
    @classmethod
    def _field_protocol(cls, value: object) -> object:
        """[field] is validated by the model of the protocol it names (errors keep their
        key paths, e.g. field.points[3].node)."""
        return validate_field(value)


@dataclass(frozen=True, eq=False)
class Scenario:
    """A validated scenario with its plug-in configurations resolved and its model built."""

    path: Path
    file: ScenarioFile
    model: SubsystemModel
    model_config: BaseModel
    controller_config: BaseModel
    fallback_config: BaseModel
    rig_config: BaseModel

    @property
    def meta(self) -> Meta:
        return self.file.scenario

    @property
    def field(self) -> FieldConfig:
        return self.file.field

    @property
    def specs(self) -> Specs:
        return self.file.specs

    @property
    def insecure_lab(self) -> bool:
        return self.file.security.insecure_lab

    def safety_specs(self) -> SafetySpecs:
        """The scenario's ``[specs]`` on its model's signals, as every stage checks them."""
        s = self.file.specs
        return SafetySpecs.build(
            self.model.inputs, self.model.outputs, s.inputs, s.bands, s.interlocks, s.temporal
        )


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(err: Any, prefix: tuple[int | str, ...] = ()) -> str:
    loc = prefix + tuple(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (not allowed here)"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif "input" in err and not isinstance(err["input"], dict | list):
        msg = f"{msg} (got {err['input']!r})"
    return f"{_loc(loc)}: {msg}"


describe_error = _describe


_KINDS: dict[str, Callable[[str], ModelKind | ControllerKind | RigKind]] = {
    "model": plugins.model_kind,
    "controller": plugins.controller_kind,
    "rig": plugins.rig_kind,
}


def _plugin_config(
    role: str, section: Any, where: str, problems: list[str], context: dict[str, Any] | None = None
) -> Any:
    """Validate one plug-in table against its kind's Config; None if it does not validate."""
    if not isinstance(section, dict) or not isinstance(section.get("kind"), str):
        return None  # the core model reports a missing or mistyped table or kind
    try:
        kind = _KINDS[role](section["kind"])
    except PluginError as exc:
        problems.append(f"{where}.kind: {exc}")
        return None
    data = dict(section)
    if "kind" not in kind.Config.model_fields:
        data.pop("kind")
    try:
        return kind.Config.model_validate(data, context=context)
    except ValidationError as exc:
        problems.extend(_describe(e, (where,)) for e in exc.errors())
        return None


@dataclass(frozen=True)
class _Parts:
    """The sections that validated on their own (None: missing or invalid), so the
    cross-checks run on whatever did validate and every problem shows in one pass."""

    meta: Meta | None
    field: FieldConfig | None
    specs: Specs | None
    verification: Verification | None
    divergence: DivergenceConfig | None
    estimation: EstimationConfig | None
    # False: the section did not validate and holds only its list items that did (None
    # in place of the others), so checks that need every item are left out
    field_whole: bool = True
    specs_whole: bool = True
    diagnosis: DiagnosisConfig | None = None

    @classmethod
    def of(cls, raw: dict[str, Any]) -> _Parts:
        def part(model: type[BaseModel], key: str, default: Any = None) -> Any:
            try:
                return model.model_validate(raw.get(key, default))
            except ValidationError:
                return None

        try:
            fm: type[FieldConfig] | None = field_model(raw.get("field"))
        except ValidationError:
            fm = None  # an unknown protocol: its keys cannot be read
        field, field_whole = (
            _lenient(
                fm,
                raw.get("field"),
                {"points": fm.point_model, "inputs": fm.input_model},
                ("watchdog",),
            )
            if fm is not None
            else (None, False)
        )
        specs, specs_whole = _lenient(
            Specs,
            raw.get("specs"),
            {
                "inputs": InputSpec,
                "bands": BandSpec,
                "interlocks": InterlockSpec,
                "temporal": TemporalSpec,
            },
        )
        return cls(
            part(Meta, "scenario"),
            field,
            specs,
            part(Verification, "verification", {}),
            part(DivergenceConfig, "divergence") if "divergence" in raw else None,
            part(EstimationConfig, "estimation") if "estimation" in raw else None,
            field_whole,
            specs_whole,
            part(DiagnosisConfig, "diagnosis") if "diagnosis" in raw else None,
        )

    @classmethod
    def of_file(cls, f: ScenarioFile) -> _Parts:
        return cls(
            f.scenario,
            f.field,
            f.specs,
            f.verification,
            f.divergence,
            f.estimation,
            diagnosis=f.diagnosis,
        )


def _lenient(
    model: type[BaseModel],
    raw: Any,
    lists: dict[str, type[BaseModel]],
    kept: tuple[str, ...] = (),
) -> tuple[Any, bool]:
    """``model`` validated, or when it does not validate, built unchecked from the items of
    its ``lists`` that validate on their own (None in place of the others, so indices keep
    naming the file's entries) and the raw ``kept`` keys; the bool says which."""
    try:
        return model.model_validate(raw), True
    except ValidationError:
        pass
    if not isinstance(raw, dict):
        return None, False
    data: dict[str, Any] = {key: raw.get(key) for key in kept}
    for key, item_model in lists.items():
        items = raw.get(key, [])
        data[key] = (
            [_valid_or_none(item_model, item) for item in items] if isinstance(items, list) else []
        )
    return model.model_construct(**data), False


def _valid_or_none(model: type[BaseModel], item: Any) -> Any:
    try:
        return model.model_validate(item)
    except ValidationError:
        return None


def _cross_check(f: _Parts, m: SubsystemModel | None) -> list[str]:
    problems: list[str] = []
    if m is not None and f.field is not None:
        problems.extend(_field_check(f.field, m, f.field_whole))
    if m is not None and f.specs is not None:
        problems.extend(_specs_check(f.specs, m, f.specs_whole))
    if f.field is not None and f.specs is not None:
        problems.extend(_check_safe_values(f.field, f.specs, f.field_whole))
    if m is not None and f.estimation is not None:
        for name in f.estimation.biases:
            if name not in m.disturbances:
                problems.append(f"estimation.biases: {name!r} is not a disturbance of the model")
    if m is not None and f.divergence is not None:
        for name in f.divergence.thresholds:
            if name not in m.outputs:
                problems.append(
                    f"divergence.thresholds: {name!r} is not an output of the model"
                    + _measured_only_note(m, name)
                )
    if m is not None and f.diagnosis is not None and f.field is not None:
        measured = {p.name for p in f.field.points if p is not None}
        problems.extend(check_diagnosis(f.diagnosis, m, measured))
    if m is not None and m.step_s > 0 and f.meta is not None:
        try:  # a discrete model: every period the runtime steps it by is whole steps
            m.steps_in(f.meta.cycle_s)
        except ValueError as exc:
            problems.append(f"scenario.cycle_s: {exc}")
    v = f.verification
    deadline = v.deadline_s if v is not None else None
    if f.meta is not None and deadline is not None and deadline > f.meta.cycle_s:
        problems.append(
            f"verification.deadline_s: {deadline:g} is above scenario.cycle_s "
            f"{f.meta.cycle_s:g}: verification must end within its cycle"
        )
    return problems


def _field_check(field: FieldConfig, m: SubsystemModel, whole: bool) -> list[str]:
    """Points and inputs against the model; the checks for what is missing need every
    entry (``whole``): one that did not validate may be the one that maps it."""
    problems = []
    outputs, inputs = set(m.point_signals), set(m.inputs)
    for i, p in enumerate(field.points):
        if p is None:
            continue
        if p.name not in outputs:
            problems.append(
                f"field.points[{i}].name: {p.name!r} is not an output of model "
                f"{m.name!r} (outputs: {', '.join(m.point_signals)})"
            )
    measured = {p.name for p in field.points if p is not None}
    for state, output in m.state_outputs.items():
        if whole and output not in measured:
            problems.append(
                f"field.points: state {state!r} needs a point measuring output {output!r}"
            )
    mapped = {i.name for i in field.inputs if i is not None}
    for i, im in enumerate(field.inputs):
        if im is not None and im.name not in inputs:
            problems.append(f"field.inputs[{i}].name: {im.name!r} is not an input of the model")
    for name in m.inputs:
        if whole and name not in mapped:
            problems.append(f"field.inputs: model input {name!r} has no node")
    return problems


def _specs_check(specs: Specs, m: SubsystemModel, whole: bool) -> list[str]:
    problems = []
    outputs, inputs = set(m.outputs), set(m.inputs)
    specified = {s.name for s in specs.inputs if s is not None}
    for i, s in enumerate(specs.inputs):
        if s is not None and s.name not in inputs:
            problems.append(f"specs.inputs[{i}].name: {s.name!r} is not an input of the model")
    for name in m.inputs:
        if whole and name not in specified:
            problems.append(f"specs.inputs: model input {name!r} has no bounds")
    for i, b in enumerate(specs.bands):
        if b is not None and b.output not in outputs:
            problems.append(
                f"specs.bands[{i}].output: {b.output!r} is not an output of the model"
                + _measured_only_note(m, b.output)
            )
    signals = outputs | inputs
    for i, il in enumerate(specs.interlocks):
        if il is None:
            continue
        for key, pred in (("when", il.when), ("forbid", il.forbid)):
            if pred.signal not in signals:
                problems.append(
                    f"specs.interlocks[{i}].{key}.signal: {pred.signal!r} is not an input "
                    "or output of the model" + _measured_only_note(m, pred.signal)
                )
    for i, ts in enumerate(specs.temporal):
        if ts is not None and ts.require.signal not in signals:
            problems.append(
                f"specs.temporal[{i}].require.signal: {ts.require.signal!r} is not an input "
                "or output of the model" + _measured_only_note(m, ts.require.signal)
            )
    names = [il.name for il in specs.interlocks if il is not None]
    names += [ts.name for ts in specs.temporal if ts is not None]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"specs: spec name {dup!r} is used twice")
    return problems


def _measured_only_note(m: SubsystemModel, name: str) -> str:
    if name not in m.measured_only:
        return ""
    return " (it is measured only: the field serves it, the twin does not predict it)"


def _check_safe_values(field: FieldConfig, specs: Specs, whole: bool = True) -> list[str]:
    """Safe values lie within their input's bounds and come with a [field.watchdog]."""
    problems = []
    bounds = {s.name: s for s in specs.inputs if s is not None}
    safe = [
        (i, im.name, im.safe)
        for i, im in enumerate(field.inputs)
        if im is not None and im.safe is not None
    ]
    for i, name, value in safe:
        spec = bounds.get(name)
        if spec is not None and not spec.min <= value <= spec.max:
            problems.append(
                f"field.inputs[{i}].safe: {value!r} is outside the bounds of "
                f"specs.inputs {name!r} [{spec.min:g}, {spec.max:g}]"
            )
    if safe and field.watchdog is None:
        problems.append(
            "field.watchdog: inputs have safe values but there is no [field.watchdog] table "
            "(heartbeat_interval_s, missed_heartbeats) saying when to revert to them"
        )
    if whole and field.watchdog is not None and not safe:
        problems.append(
            "field.watchdog: no [[field.inputs]] entry has a safe value: the watchdog would "
            "have nothing to revert to"
        )
    return problems


def _non_finite(raw: Any) -> list[str]:
    """Key paths of every inf or nan in the file (TOML allows them; no plant value is)."""
    found: list[str] = []
    stack: list[tuple[tuple[int | str, ...], Any]] = [((), raw)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            found.append(_loc(loc))
        elif isinstance(value, dict):
            stack.extend((loc + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((loc + (i,), v) for i, v in enumerate(value))
    return sorted(found)


def controller_problems(
    where: str, kind_name: str, config: BaseModel, problem: ControlProblem
) -> list[str]:
    """Does controller kind ``kind_name`` with ``config`` fit ``problem``?  The kind's
    ``check`` gives paths relative to its table; ``where`` is the table."""
    return [f"{where}.{p}" for p in plugins.controller_kind(kind_name).check(config, problem)]


def validation_problem(
    f: ScenarioFile | None, model: SubsystemModel, meta: Meta | None = None
) -> ControlProblem:
    """The problem the controllers get at run start, as far as the file tells it: from a
    file whose specs fit the model, its bands, limits, cycle and horizon; otherwise every
    output counted as banded and the inputs unbounded, so that only what the model alone
    decides is checked (the specs' own problems are reported on their own), over the
    ``[scenario]`` table's cycle and horizon when ``meta`` (that table, validated on its
    own) has them and the cycle fits the model, else over one model step (a cycle the
    model cannot take is reported as ``scenario.cycle_s``, not as the controller's)."""
    from parallelcity.specs import SafetySpecs

    if f is not None:
        s = f.specs
        try:
            specs = SafetySpecs.build(
                model.inputs, model.outputs, s.inputs, s.bands, s.interlocks, s.temporal
            )
            return specs.control_problem(model, f.scenario.cycle_s, f.scenario.horizon_steps)
        except (KeyError, ValueError):
            pass
    inf = np.full(model.nu, np.inf)
    cycle_s, horizon = (model.step_s if model.step_s > 0 else 1.0), 1
    if meta is not None:
        try:
            if model.step_s > 0:
                model.steps_in(meta.cycle_s)
            cycle_s, horizon = meta.cycle_s, meta.horizon_steps
        except ValueError:
            pass
    return ControlProblem(model, cycle_s, horizon, -inf, inf, inf, tuple(range(model.ny)))


def _problems(raw: dict[str, Any], path: Path) -> tuple[list[str], tuple[Any, ...] | None]:
    """Every problem of a parsed file, and its parts when there are none."""
    problems: list[str] = []
    non_finite = _non_finite(raw)

    def keep(line: str) -> bool:  # pydantic's words on a non-finite value add nothing
        return not any(
            line.startswith(loc) and line[len(loc) : len(loc) + 1] in (":", ".", "[")
            for loc in non_finite
        )

    f: ScenarioFile | None = None
    meta = raw.get("scenario")
    zone = zone_context(meta.get("time_zone", "UTC") if isinstance(meta, dict) else "UTC")
    try:
        f = ScenarioFile.model_validate(raw, context=zone)
    except ValidationError as exc:
        problems.extend(p for p in (_describe(e) for e in exc.errors()) if keep(p))
    problems.extend(f"{loc}: must be a finite number, not inf or nan" for loc in non_finite)
    found: list[str] = []
    # plug-in tables are checked even when the rest failed, so every problem shows at once
    # a model's relative paths (e.g. a simulator's input files) are the scenario's
    model_ctx = {**zone, BASE_DIR: path.parent}
    model_cfg = _plugin_config("model", raw.get("model"), "model", found, model_ctx)
    ctrl_cfg = _plugin_config("controller", raw.get("controller"), "controller", found)
    fb_cfg = _plugin_config("controller", raw.get("fallback"), "fallback", found)
    rig_cfg = _plugin_config("rig", raw.get("rig"), "rig", found, {BASE_DIR: path.parent})
    problems.extend(p for p in found if keep(p))
    model = None
    if model_cfg is not None and not any(loc.startswith("model") for loc in non_finite):
        try:
            model = plugins.model_kind(model_cfg_kind(raw)).build(model_cfg)
        except (ValueError, TypeError, ArithmeticError) as exc:
            problems.append(f"model: cannot build the model: {exc}")
    parts = _Parts.of_file(f) if f is not None else _Parts.of(raw)
    problems.extend(_cross_check(parts, model))
    if model is not None:
        problem = validation_problem(f, model, parts.meta)
        for where, cfg in (("controller", ctrl_cfg), ("fallback", fb_cfg)):
            if cfg is not None:
                problems.extend(controller_problems(where, raw[where]["kind"], cfg, problem))
        if rig_cfg is not None:
            problems.extend(plugins.rig_kind(raw["rig"]["kind"]).check(rig_cfg, model))
    if problems or f is None or model is None:
        return problems or ["the file does not validate"], None
    return [], (f, model, model_cfg, ctrl_cfg, fb_cfg, rig_cfg)


def parse_scenario(text: str, path: str | Path = "<string>") -> Scenario:
    """Validate scenario TOML text; raise ``ScenarioError`` listing every problem."""
    path = Path(path)
    try:
        raw = parse_toml(text)
    except ValueError as exc:
        raise ScenarioError(str(path), [str(exc)]) from None
    return scenario_from_tables(raw, path)


def scenario_from_tables(raw: dict[str, Any], path: str | Path) -> Scenario:
    """Validate a scenario given as parsed TOML tables (relative paths resolve against
    ``path``'s folder); raise ``ScenarioError`` listing every problem."""
    path = Path(path)
    try:
        problems, parts = _problems(raw, path)
    except RecursionError:
        raise ScenarioError(str(path), ["values are nested too deeply"]) from None
    if parts is None:
        raise ScenarioError(str(path), problems)
    return Scenario(path, *parts)


def model_cfg_kind(raw: dict[str, Any]) -> str:
    return str(raw["model"]["kind"])


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = read_text_bounded(path)
    except OSError as exc:
        raise ScenarioError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from exc
    except ValueError as exc:
        raise ScenarioError(str(path), [str(exc)]) from exc
    return parse_scenario(text, path)


def json_schema() -> dict[str, Any]:
    """JSON Schema of scenario files, with the installed plug-in kinds spelled out."""
    schema = ScenarioFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "parallelcity scenario"
    props = schema["properties"]
    for section, role in (
        ("model", "model"),
        ("controller", "controller"),
        ("fallback", "controller"),
        ("rig", "rig"),
    ):
        variants = []
        for name in plugins.names(role):
            try:
                kind = _KINDS[role](name)
            except PluginError:
                continue
            sub = kind.Config.model_json_schema(ref_template="#/$defs/{model}")
            for def_name, definition in sub.pop("$defs", {}).items():
                schema.setdefault("$defs", {})[def_name] = definition
            sub.setdefault("properties", {})["kind"] = {"const": name}
            sub["required"] = sorted(set(sub.get("required", [])) | {"kind"})
            sub["additionalProperties"] = False
            variants.append(sub)
        props[section] = {"oneOf": variants} if variants else props[section]
    # the common [field] keys stay under their own names; each protocol adds a variant
    props["field"] = field_json_schema(schema.setdefault("$defs", {}))
    return schema
