"""What a model kind is to the runtime: a config table that builds a ``SubsystemModel``."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel

from parallelcity.twin.model import SubsystemModel


class ModelKind(Protocol):
    """What the ``parallelcity.models`` entry point of a kind provides."""

    Config: type[BaseModel]

    def build(self, config: BaseModel) -> SubsystemModel:
        """The model the validated ``[model]`` table describes (``ValueError`` if none)."""
        ...
