"""The mirror at a few thousand points, per-point sampling and deadband, and ``browse``."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from parallelcity.hil.field import POINT_NAMESPACE, PointServer, free_port, point_node
from parallelcity.hil.simulated import KIND

from parallelcity.cli import EXIT_OK, EXIT_SECURITY, main
from parallelcity.clock import SimClock
from parallelcity.field.mirror import Mirror
from parallelcity.field.opcua.browse import browse, points_toml
from parallelcity.field.opcua.config import OpcUaField as FieldConfig
from parallelcity.field.opcua.config import OpcUaInput as InputMap
from parallelcity.field.opcua.config import OpcUaPoint as PointMap
from parallelcity.field.opcua.session import ClientSecurity
from parallelcity.scenario.definition import Scenario


def run(make: Callable[[], Awaitable[Any]], timeout_s: float = 60.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout_s):
            return await make()

    return asyncio.run(bounded())


@pytest.mark.slow
def test_thousands_of_points_with_per_point_sampling_and_deadband() -> None:
    n = 2500
    points = [PointMap(name=f"p{i}", node=point_node(i), max_age_s=10.0) for i in range(n)]
    # p1 reports only moves beyond 10 (the server adds 1 per 100 ms tick); p2 never moves
    # beyond its deadband, yet stays fresh while the subscription is alive.
    points[1] = PointMap(name="p1", node=point_node(1), max_age_s=10.0, deadband=10.0)
    # max_age_s leaves room for a publish delayed by a loaded machine; the source time
    # still grows older than it while the point stays fresh.
    points[2] = PointMap(name="p2", node=point_node(2), max_age_s=1.5, deadband=1e9)
    points[3] = PointMap(name="p3", node=point_node(3), max_age_s=10.0, sampling_interval_ms=500)
    cfg = FieldConfig(
        namespace=POINT_NAMESPACE,
        sampling_interval_ms=100.0,
        points=points,
        inputs=[InputMap(name="p0", node=point_node(0))],
    )

    async def body() -> None:
        server = PointServer(free_port(), n, 0.1)
        await server.start()
        try:
            clock = SimClock(epoch=time.time(), speed=1.0)
            endpoint = f"opc.tcp://127.0.0.1:{server.port}"
            async with Mirror(cfg, clock, endpoint=endpoint, batch_size=400) as mirror:
                assert await mirror.wait_all_received(30.0)
                first = mirror.readings
                start = mirror.notifications
                await asyncio.sleep(3.0)
                later = mirror.readings
                snap = mirror.snapshot()
                assert snap.stale_required == [], snap.stale_required[:5]
                # thousands of changes ingested: every point without a deadband moved on (how
                # many times depends on how much CPU the server got, not on the mirror)
                advanced = [
                    i
                    for i in range(n)
                    if i not in (1, 2) and later[f"p{i}"].source_time > first[f"p{i}"].source_time
                ]
                assert len(advanced) == n - 2
                assert mirror.notifications - start >= n - 2
                plain = later["p0"].value - first["p0"].value
                assert plain >= 2
                moved = later["p1"].value - first["p1"].value
                assert moved <= plain and (moved == 0 or moved >= 10)
                assert later["p2"].value == first["p2"].value  # within its deadband
                assert later["p2"].source_time == first["p2"].source_time
                # its source time is older than its max_age_s, the subscription's life is not
                assert clock.now() - later["p2"].source_time > 2.5
                assert snap.points["p2"].age_s is not None and snap.points["p2"].age_s < 1.5
                assert later["p3"].value - first["p3"].value <= plain
        finally:
            await server.stop()

    run(body, timeout_s=90.0)


@pytest.mark.slow
def test_browse_writes_a_points_table_the_scenario_can_use(dh: Scenario, tmp_path: Path) -> None:
    async def body() -> Any:
        clock = SimClock(epoch=dh.meta.start_epoch, speed=dh.meta.speed)
        async with KIND.field_stand_in(dh.rig_config, dh, clock) as field:
            result = await browse(field.endpoint, ClientSecurity.insecure())
            code = await asyncio.to_thread(main, ["browse", field.endpoint])
            out = tmp_path / "points.toml"
            ok = await asyncio.to_thread(
                main, ["browse", field.endpoint, "--insecure-lab", "-o", str(out)]
            )
            return result, code, ok, out.read_text()

    result, refused, ok, text = run(body)
    assert refused == EXIT_SECURITY and ok == EXIT_OK
    assert result.namespace == dh.field.namespace
    table = tomllib.loads(points_toml(result, 60.0))
    nodes = {p["node"]: p["name"] for p in table["field"]["points"]}
    expected = {p.node for p in dh.field.points} | {i.node for i in dh.field.inputs}
    assert expected <= set(nodes), expected - set(nodes)
    assert nodes["s=dh/plant/T_supply"] == "dh.plant.T_supply"  # the browse path
    writable = {p.node for p in result.points if p.writable}
    assert writable == {i.node for i in dh.field.inputs}
    assert table["field"]["namespace"] == dh.field.namespace
    assert tomllib.loads(text) == table  # the CLI wrote the same table
    # the browsed table maps straight back onto the scenario's field config
    FieldConfig(
        namespace=table["field"]["namespace"],
        points=[PointMap(**p) for p in table["field"]["points"]],
        inputs=[InputMap(name=i.name, node=i.node) for i in dh.field.inputs],
    )


def test_certs_command_creates_a_trusting_pair(tmp_path: Path, capsys: Any) -> None:
    assert main(["certs", str(tmp_path / "pki"), "--host", "plc.local"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "[security.opcua]" in out and "password_env" in out
    assert (tmp_path / "pki/client/trusted/server.der").exists()
    assert (tmp_path / "pki/server/trusted/client.der").exists()
    key = tmp_path / "pki/client/own/client.key.pem"
    assert key.stat().st_mode & 0o077 == 0
