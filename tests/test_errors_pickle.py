"""Errors cross process boundaries (an experiment's worker pool, a cluster worker) intact."""

from __future__ import annotations

import pickle

import pytest

from parallelcity.errors import (
    ExperimentError,
    GatewayConfigError,
    NodeIdError,
    ScenarioError,
)


@pytest.mark.parametrize("cls", [ScenarioError, ExperimentError, GatewayConfigError])
def test_a_file_error_keeps_its_type_path_and_problems(cls: type[ScenarioError]) -> None:
    err = cls("corridor.toml", ["field.inputs: model input 'J1.split1' has no node"])
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (back.path, back.problems, str(back)) == (err.path, err.problems, str(err))


def test_a_node_id_error_keeps_its_node_and_reason() -> None:
    err = NodeIdError("ns=x;s=a", "namespace index is not a number")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, NodeIdError) and isinstance(back, ValueError)
    assert (back.node, back.why, str(back)) == (err.node, err.why, str(err))
