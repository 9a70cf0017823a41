"""Every experiment file the project ships loads and validates, its variants included, so
the commands the README and the docs give for them start."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallelcity.experiment.definition import load_experiment

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").glob("*.toml"))


def test_the_project_ships_experiment_files() -> None:
    assert len(FILES) >= 5


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_a_shipped_experiment_file_validates(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.runs()
    assert {v.name for v in exp.variants} == set(exp.scenarios)
