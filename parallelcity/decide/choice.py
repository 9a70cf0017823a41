"""Which settings a controller kind named on the command line runs with.

One rule for ``run --controller KIND`` and ``verify --controller KIND``: the
scenario's ``[controller]`` table if its kind is KIND, else its ``[fallback]``
table if that kind is KIND, else an error naming the missing table.  A kind's
defaults are never used silently (a PI without loops does nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from parallelcity.errors import PluginError, ScenarioError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from parallelcity.scenario.definition import Scenario


def controller_settings(scenario: Scenario, kind: str | None) -> tuple[str, BaseModel]:
    """The kind to run and its settings; ``kind=None`` means the scenario's controller."""
    file = scenario.file
    if kind is None or kind == file.controller.kind:
        return file.controller.kind, scenario.controller_config
    if kind == file.fallback.kind:
        return kind, scenario.fallback_config
    raise ScenarioError(str(scenario.path), _why_not(scenario, kind))


def _why_not(scenario: Scenario, kind: str) -> list[str]:
    """A kind with no table: unknown, unfit for the model, or only missing its table."""
    from pydantic import ValidationError

    from parallelcity import plugins
    from parallelcity.scenario.definition import controller_problems, validation_problem

    try:
        kind_cls = plugins.controller_kind(kind)
    except PluginError as exc:
        return [f"--controller: {exc}"]
    try:  # the kind's defaults say whether any table of this kind could fit the model
        problems = controller_problems(
            "--controller",
            kind,
            kind_cls.Config.model_validate({}),
            validation_problem(scenario.file, scenario.model),
        )
    except ValidationError:
        problems = []
    if problems:
        return [p.replace("--controller.kind:", "--controller:", 1) for p in problems]
    file = scenario.file
    return [
        f"--controller {kind}: no [controller] or [fallback] table of kind {kind!r} "
        f"in the scenario (it has {file.controller.kind!r} and {file.fallback.kind!r}); "
        "add one"
    ]
