"""A validated scenario written back as TOML, so a journal holds the scenario its run used.

``parse_scenario(scenario_toml(s), s.path)`` gives back an equal scenario: every key is
written with its value in force (defaults included), as inline tables on one line each.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

from parallelcity.scenario.definition import Scenario


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v if x is not None) + "]"
    if isinstance(v, dict):
        return "{" + _pairs(v) + "}"
    return json.dumps(str(v))  # JSON string escapes are valid TOML basic-string escapes


def _pairs(d: dict[Any, Any]) -> str:
    return ", ".join(f"{json.dumps(str(k))} = {_value(v)}" for k, v in d.items() if v is not None)


def tables_toml(data: dict[str, Any]) -> str:
    """Parsed TOML tables written back as TOML (``tomllib.loads`` gives them back)."""
    return "".join(f"{json.dumps(k)} = {_value(v)}\n" for k, v in data.items() if v is not None)


def scenario_toml(scenario: Scenario) -> str:
    data = scenario.file.model_dump(mode="python", exclude_none=True, serialize_as_any=True)
    return tables_toml(data)
