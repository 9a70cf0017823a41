"""Which settings a controller kind named on the command line runs with.

One rule for ``run --controller KIND`` and ``verify --controller KIND``: the
scenario's ``[controller]`` table if its kind is KIND, else its ``[fallback]``
table if that kind is KIND, else an error naming the missing table.  A kind's
defaults are never used silently (a PI without loops does nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ScenarioError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from .scenario import Scenario


def controller_settings(scenario: Scenario, kind: str | None) -> tuple[str, BaseModel]:
    """The kind to run and its settings; ``kind=None`` means the scenario's controller."""
    file = scenario.file
    if kind is None or kind == file.controller.kind:
        return file.controller.kind, scenario.controller_config
    if kind == file.fallback.kind:
        return kind, scenario.fallback_config
    raise ScenarioError(
        str(scenario.path),
        [
            f"--controller {kind}: no [controller] or [fallback] table of kind {kind!r} "
            f"in the scenario (it has {file.controller.kind!r} and {file.fallback.kind!r}); "
            "add one"
        ],
    )
