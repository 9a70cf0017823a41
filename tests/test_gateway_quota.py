"""Pure units of the gateway's flood defences: per-key token buckets and the log limiter.

The attacks themselves run against real processes in ``test_gateway_flood``,
``test_gateway_framing`` and ``test_gateway_zap_log``.
"""

from __future__ import annotations

import logging

import pytest

from parallelcity.gateway.loglimit import LogLimiter
from parallelcity.gateway.server import KeyQuota, _Buckets


def test_a_key_gets_its_burst_then_its_rate_and_other_keys_are_not_affected() -> None:
    b = _Buckets(KeyQuota(rate_per_s=10.0, burst=5))
    assert [b.take("flooder", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert b.take("runtime", 0.0)  # its own bucket
    assert not b.take("flooder", 0.05)  # half a token back
    assert b.take("flooder", 0.1) and not b.take("flooder", 0.1)
    assert sum(b.take("flooder", 10.0) for _ in range(100)) == 5  # refills to the burst only


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (float("inf"), 1), (1.0, 0.5)])
def test_a_quota_must_be_finite_and_positive(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        KeyQuota(rate, burst)


def test_the_log_limiter_logs_a_burst_then_one_summary_with_counts_per_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = LogLimiter(logging.getLogger("t"), "refusals", burst=3, period_s=60.0)
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(100):
            limiter.log("malformed" if i % 4 else "stale_sequence", "refused %d", i)
        limiter.summarise()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["refused 0", "refused 1", "refused 2"]
    assert len(lines) == 4
    assert lines[3].startswith("refusals: 97 more in the last")
    assert "malformed: 73" in lines[3] and "stale_sequence: 24" in lines[3]
