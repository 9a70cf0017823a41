"""The embedded default with ``insecure_lab = false``: the ZeroMQ side runs CURVE for real."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from parallelcity.run.runner import RunOptions, run
from parallelcity.scenario.definition import parse_scenario


@pytest.mark.slow
def test_a_secure_copy_of_the_scenario_dispatches_over_curve(
    dh_text: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = dh_text.replace("insecure_lab = true", "insecure_lab = false")
    sc = parse_scenario(text, tmp_path / "secure.toml")
    with caplog.at_level(logging.INFO):
        # Slow enough that a loaded machine still decides within each cycle's deadline.
        result = asyncio.run(run(sc, RunOptions(cycles=3, speed=360.0, out_dir=tmp_path)))
    messages = [r.getMessage() for r in caplog.records]
    assert any("ZeroMQ CURVE with key pairs generated for this run" in m for m in messages)
    assert any("CURVE, server key" in m for m in messages)
    assert not any("INSECURE LAB MODE" in m for m in messages)
    counts = result.counts
    assert counts["sent"] >= 1 and counts["refused"] == 0, counts
    assert counts["acked"] == counts["sent"], counts
    with sqlite3.connect(result.journal_path) as db:
        acks = db.execute("SELECT status, code FROM ack").fetchall()
        events = db.execute("SELECT source, kind FROM event WHERE source = 'gateway'").fetchall()
    assert acks and all(status == "applied" and code == "" for status, code in acks)
    # The scenario's safe values arm the embedded gateway's watchdog at the first heartbeat.
    assert events == [("gateway", "armed")]
    # The embedded gateway's durable state sits beside the journal.
    state = result.out_dir / "gateway.sqlite"
    with sqlite3.connect(state) as db:
        applied = db.execute("SELECT count(*) FROM applied WHERE state = 'applied'").fetchone()
    assert applied == (len(acks),)
