"""Safe values in the scenario, and the embedded gateway's watchdog using them.

* ``safe`` per ``[[field.inputs]]`` and ``[field.watchdog]`` are validated with
  the key path: a safe value outside its input's specs bounds, safe values
  without a watchdog table, a watchdog with nothing to revert to.
* A real embedded run (secure: SignAndEncrypt, CURVE) whose runtime goes quiet
  - its heartbeats stop after the second cycle, and its commands come one cycle
  (900 s) apart, longer than the 300 s window - has the field plant's inputs
  reverted to the safe values once the window has passed, and not before; the
  trip and the revert are journaled in the gateway's store, and the runtime's
  journal shows the next command refused with ``watchdog_tripped``.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import pytest

from parallelcity.errors import ScenarioError
from parallelcity.field.opcua.stand_in import EmbeddedField
from parallelcity.gateway.store import GatewayStore
from parallelcity.record.records import CycleRecord, RunResult
from parallelcity.run.runner import RunOptions, _embedded_core, run
from parallelcity.scenario.definition import Scenario, parse_scenario

SAFE = {
    "plant.T_supply_set": 77.7,
    "apartment.m_flow": 0.333,
    "office.m_flow": 0.444,
    "school.m_flow": 0.555,
}
INTERVAL_S, MISSED = 100.0, 3
WINDOW_S = INTERVAL_S * MISSED
SPEED = 400.0
LATE_WALL_S = 0.5  # how late (wall seconds) the revert may land after the window, on a busy box
QUIET_AFTER = 1  # the runtime's heartbeats stop after this cycle's dispatch


def with_watchdog(text: str, safe: dict[str, float], interval_s: float, missed: int) -> str:
    for name, value in safe.items():
        node = f'node = "s=dh/{name.replace(".", "/")}"\n'
        old = f'name = "{name}"\n{node}safe = '
        start = text.index(old) + len(old)
        end = text.index("\n", start)
        text = text[:start] + repr(value) + text[end:]
    start = text.index("[field.watchdog]\n")
    end = text.index("\n\n", start)
    table = f"[field.watchdog]\nheartbeat_interval_s = {interval_s}\nmissed_heartbeats = {missed}"
    return text[:start] + table + text[end:]


def secure(dh_text: str) -> str:
    return dh_text.replace("insecure_lab = true", "insecure_lab = false")


# -- the scenario --------------------------------------------------------------------------------


def test_the_shipped_scenario_gives_the_embedded_gateway_a_watchdog(dh_shipped: Scenario) -> None:
    wd = dh_shipped.field.watchdog
    assert wd is not None and wd.heartbeat_interval_s > 0 and wd.missed_heartbeats >= 1
    core = _embedded_core(dh_shipped, dh_shipped.safety_specs(), speed=1440.0)
    assert core.watchdog.enabled
    assert set(core.watchdog.safe) == set(dh_shipped.model.inputs)
    assert core.watchdog.window_s == wd.heartbeat_interval_s * wd.missed_heartbeats


def test_safe_values_outside_the_specs_bounds_are_scenario_errors(dh_text: str) -> None:
    bad = with_watchdog(
        dh_text, {**SAFE, "plant.T_supply_set": 120.0, "office.m_flow": -1.0}, 60, 3
    )
    with pytest.raises(ScenarioError) as info:
        parse_scenario(bad, "bad.toml")
    problems = info.value.problems
    assert (
        "field.inputs[0].safe: 120.0 is outside the bounds of specs.inputs "
        "'plant.T_supply_set' [60, 95]"
    ) in problems
    assert any(p.startswith("field.inputs[2].safe: -1.0 is outside") for p in problems), problems
    assert len(problems) == 2, problems


def test_safe_values_need_a_watchdog_table_and_a_watchdog_needs_safe_values(dh_text: str) -> None:
    start = dh_text.index("[field.watchdog]\n")
    end = dh_text.index("\n\n", start)
    no_table = dh_text[:start] + dh_text[end:]
    with pytest.raises(ScenarioError) as info:
        parse_scenario(no_table, "bad.toml")
    assert info.value.problems == [
        "field.watchdog: inputs have safe values but there is no [field.watchdog] table "
        "(heartbeat_interval_s, missed_heartbeats) saying when to revert to them"
    ]
    no_safe = re.sub(r"\nsafe = [0-9.]+\n", "\n", dh_text)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(no_safe, "bad.toml")
    assert info.value.problems == [
        "field.watchdog: no [[field.inputs]] entry has a safe value: the watchdog would "
        "have nothing to revert to"
    ]
    bad_table = with_watchdog(dh_text, SAFE, 0.0, 0)
    with pytest.raises(ScenarioError) as info:
        parse_scenario(bad_table, "bad.toml")
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "field.watchdog.heartbeat_interval_s",
        "field.watchdog.missed_heartbeats",
    ]
    # Neither: no watchdog, as before.
    plain = parse_scenario(no_table.replace("\nsafe = ", "\n# safe = "), "plain.toml")
    core = _embedded_core(plain, plain.safety_specs(), speed=1.0)
    assert not core.watchdog.enabled


# -- a run whose runtime goes quiet -------------------------------------------------------------


@pytest.mark.slow
def test_a_quiet_runtime_makes_the_embedded_gateway_revert_the_plant_to_its_safe_values(
    dh_text: str, tmp_path: Path
) -> None:
    sc = parse_scenario(
        with_watchdog(secure(dh_text), SAFE, INTERVAL_S, MISSED), tmp_path / "quiet.toml"
    )

    def progress(rec: CycleRecord, counts: dict[str, int]) -> None:
        if rec.k == QUIET_AFTER:
            # The runtime falls silent: its heartbeat task (the runner names it) stops.
            beats = [t for t in asyncio.all_tasks() if t.get_name() == "heartbeats"]
            assert len(beats) == 1
            beats[0].cancel()

    async def bounded() -> RunResult:
        async with asyncio.timeout(120.0):
            return await run(sc, RunOptions(cycles=4, speed=SPEED, out_dir=tmp_path), progress)

    result = asyncio.run(bounded())
    field = result.stand_in
    assert isinstance(field, EmbeddedField)

    # The trip, journaled by the gateway with the silence it saw, then the revert.
    store = GatewayStore(result.out_dir / "gateway.sqlite")
    try:
        events = store.events()
    finally:
        store.close()
    kinds = [k for _, k, _ in events]
    assert kinds.count("watchdog_tripped") == 1 and kinds.count("reverted") == 1, events
    t_trip, _, detail = next(e for e in events if e[1] == "watchdog_tripped")
    found = re.search(r"no heartbeat for ([0-9.]+) s", detail)
    assert found is not None, detail
    last_seen = t_trip - float(found.group(1))

    # The plant got every safe value, in one write, after the window and soon after it.
    reverted = [a for a in field.applied if a.time >= last_seen and SAFE.get(a.name) == a.value]
    values = {a.name: a.value for a in reverted}
    assert values == SAFE, reverted
    t_revert = min(a.time for a in reverted)
    assert max(a.time for a in reverted) - t_revert <= 0.05 * SPEED  # one write request
    assert t_revert >= last_seen + WINDOW_S, (t_revert - last_seen, WINDOW_S)
    assert t_revert <= last_seen + WINDOW_S + LATE_WALL_S * SPEED, t_revert - last_seen
    u = field.plant.input_vector
    for name, value in SAFE.items():
        assert u[sc.model.inputs.index(name)] == pytest.approx(value)

    # Before the silence: applied; after the trip: refused, as the runtime journaled.
    acks = {r.k: r.ack for r in result.records}
    assert all(acks[k] == "applied" for k in range(QUIET_AFTER + 1)), acks
    assert acks[QUIET_AFTER + 1] == "refused:watchdog_tripped", acks
    with sqlite3.connect(result.journal_path) as db:
        refused = db.execute(
            "SELECT detail FROM ack WHERE status = 'refused' AND code = 'watchdog_tripped'"
        ).fetchall()
    assert refused and all("re-arm required" in d for (d,) in refused), refused
