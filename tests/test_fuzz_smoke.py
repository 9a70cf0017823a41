"""The fuzz harnesses (fuzz/) driven by hypothesis, so they cannot rot without atheris.

The long coverage-guided runs are ``python -m fuzz -n 1000000 TARGET`` (README, testing);
here every target's seeds must pass its body, and a few hundred random and mutated
inputs per target may raise only the decoder's declared errors.  The last tests pin
what the fuzzer found.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import Target, bytes_of, frames_of, run_one, targets
from parallelcity.errors import ScenarioError

TARGETS = targets()
SEEDS = {name: t.seeds() for name, t in TARGETS.items()}


def test_every_decoder_has_a_target_with_seeds() -> None:
    assert set(TARGETS) == {"wire", "zap", "gateway_config", "scenario"}
    for name, seeds in SEEDS.items():
        assert len(seeds) >= 1, name
    assert len(SEEDS["wire"]) >= 20  # every example of docs/wire-protocol.md, twice
    assert len(SEEDS["zap"]) >= 4  # captured: allowed and unknown CURVE keys, PLAIN, NULL


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_run_clean(name: str) -> None:
    for data in SEEDS[name]:
        run_one(TARGETS[name], data)


def test_shipped_files_are_accepted_not_just_tolerated() -> None:
    for name in ("gateway_config", "scenario"):
        TARGETS[name].body(SEEDS[name][0])  # no declared error either
    frames = frames_of(SEEDS["zap"][0])
    assert frames[3] == b"CURVE" and bytes_of(frames) == SEEDS["zap"][0]


def _mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed with a slice replaced by random bytes: mostly well-formed, sometimes not."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        seed = draw(st.sampled_from(seeds))
        i = draw(st.integers(0, len(seed)))
        j = draw(st.integers(i, min(len(seed), i + 16)))
        return seed[:i] + draw(st.binary(max_size=16)) + seed[j:]

    return build()


def _drive(target: Target) -> None:
    @settings(
        max_examples=150, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )  # fmt: skip
    @given(st.one_of(st.binary(max_size=512), _mutated(SEEDS[target.name])))
    def check(data: bytes) -> None:
        run_one(target, data)

    check()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_random_and_mutated_inputs_raise_only_declared_errors(name: str) -> None:
    _drive(TARGETS[name])


# --------------------------------------------------------------------------- findings


@pytest.mark.parametrize("name", ["gateway_config", "scenario"])
def test_a_file_that_is_not_utf8_is_an_invalid_file_not_a_crash(name: str, tmp_path: Path) -> None:
    """Found by the fuzzer: the loaders let ``UnicodeDecodeError`` escape (exit 1)."""
    from parallelcity.gateway.config import load_gateway_config
    from parallelcity.scenario.definition import load_scenario

    path = tmp_path / "bad.toml"
    path.write_bytes(SEEDS[name][0][:100] + b"\xf6" + SEEDS[name][0][100:])
    load = load_gateway_config if name == "gateway_config" else load_scenario
    with pytest.raises(
        ScenarioError, match=r"not UTF-8 text: invalid start byte at byte offset 100"
    ):
        load(path)


def test_validate_exits_2_on_a_scenario_that_is_not_utf8(tmp_path: Path) -> None:
    from parallelcity.cli import main as cli_main

    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe" + SEEDS["scenario"][0])
    assert cli_main(["validate", str(path)]) == 2
