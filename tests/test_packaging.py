"""The distribution's layout: every subpackage installed, nothing under a generic top-level name."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_in_the_tree_is_installed_and_no_other() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    in_tree = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "parallelcity").rglob("__init__.py")
    }
    for name, folder in mapped.items():
        assert (ROOT / folder / "__init__.py").is_file(), f"{name} maps to {folder}/, not a package"
        in_tree |= {
            name + "".join("." + part for part in p.parent.relative_to(ROOT / folder).parts)
            for p in (ROOT / folder).rglob("__init__.py")
        }
    assert sorted(setuptools["packages"]) == sorted(in_tree)


def test_only_the_parallelcity_import_name_is_claimed() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"parallelcity"}
    for group, eps in PYPROJECT["project"]["entry-points"].items():
        for name, target in eps.items():
            assert target.startswith("parallelcity."), (group, name, target)
