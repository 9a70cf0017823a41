"""The diagnosis as a run uses it: the scenario's diagnoser, and what one cycle's events
become (journal entries, log lines, alarms).  Shared by ``run`` and ``experiment``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .config import settings
from .diagnoser import Diagnoser, Event
from .faults import FaultSpec, FaultTarget

if TYPE_CHECKING:
    from parallelcity.scenario.definition import Scenario

log = logging.getLogger("parallelcity.run.runner")


class EventSink(Protocol):
    def record_event(
        self, k: int, t: float, source: str, kind: str, detail: str, data: Any
    ) -> None: ...


def diagnoser_for(scenario: Scenario) -> Diagnoser | None:
    """The scenario's diagnoser; None without ``[diagnosis]`` or with ``enabled = false``."""
    cfg = scenario.file.diagnosis
    if cfg is None or not cfg.enabled:
        return None
    bounds = {s.name: (s.min, s.max) for s in scenario.specs.inputs}
    dt_s = scenario.meta.cycle_s
    steps = {p.name: resolution(p) for p in scenario.field.points}
    return Diagnoser(scenario.model, dt_s, settings(cfg, scenario.model, dt_s, bounds, steps))


INTEGER_TYPES = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})


def resolution(point: object) -> float:
    """The smallest change a point's reading shows: a register holding an integer shows
    steps of its ``scale`` (Modbus), an ``int`` point whole units; otherwise 0."""
    if getattr(point, "data_type", None) in INTEGER_TYPES:
        return abs(float(getattr(point, "scale", 1.0)))
    return 1.0 if getattr(point, "type", None) == "int" else 0.0


def report_events(
    diagnoser: Diagnoser,
    events: Sequence[Event],
    k: int,
    banded: frozenset[str],
    journal: EventSink | None = None,
) -> list[dict[str, Any]]:
    """Journal and log cycle ``k``'s events; the alarms among them (``Alarm.as_dict``)."""
    alarms = []
    for event in events:
        if journal is not None:
            journal.record_event(k, event.t, "diagnosis", event.kind, event.detail, event.data)
        if event.alarm is None:
            log.info("cycle %d: diagnosis %s: %s", k, event.kind, event.detail)
            continue
        alarms.append(event.alarm.as_dict())
        kind = diagnoser.model.fault_kind(event.alarm.kind)
        hint = ""
        if kind.applies_to is FaultTarget.SENSOR and event.alarm.component in banded:
            hint = (
                "; the twin reads this banded output from the faulty sensor, so its band "
                "is judged on a wrong value: check the sensor on site"
            )
        log.warning("cycle %d: fault alarm: %s%s", k, event.detail, hint)
    return alarms


def planted_visibility(diagnoser: Diagnoser | None, scenario: Scenario) -> list[int | None]:
    """Per fault the rig planted (``[[rig.faults]]``): the cycles at which it showed on the
    diagnosis channels (``Diagnoser.visible_cycles``); None where not judged."""
    faults = getattr(scenario.rig_config, "faults", None) or []
    if diagnoser is None:
        return [None for _ in faults]
    t0 = scenario.meta.start_epoch
    return [
        diagnoser.visible_cycles(FaultSpec(f.kind, f.component, f.size, t0 + f.start_s))
        for f in faults
    ]
