"""Log lines an attacker can cause, rate-limited and aggregated.

A flood of refused handshakes or refused messages must not turn into a flood
of log lines (disk, CPU, and the real events drowned).  ``LogLimiter`` logs
the first ``burst`` lines of each period as they come, counts the rest by
key (reason, client) and logs one summary line when the period ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

MAX_KEYS = 1000
"""Distinct keys counted per period; the rest are counted under ``other``."""
SUMMARY_KEYS = 10
"""Keys named in a summary line (the most frequent); the others are summed."""


class LogLimiter:
    """At most ``burst`` lines per ``period_s`` (monotonic seconds), then a summary line."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.WARNING,
        burst: int = 10,
        period_s: float = 5.0,
    ) -> None:
        if burst < 0 or not period_s > 0:
            raise ValueError("burst must be >= 0 and period_s > 0")
        self.logger = logger
        self.what = what
        self.level = level
        self.burst = burst
        self.period_s = period_s
        self.logged = 0
        """Lines logged in the current period."""
        self.suppressed: Counter[str] = Counter()
        """Key -> lines not logged in the current period."""
        self.summaries = 0
        self._since = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def log(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._since >= self.period_s:
            self.summarise()
        if self.logged < self.burst:
            self.logged += 1
            self.logger.log(self.level, msg, *args)
            return
        if key not in self.suppressed and len(self.suppressed) >= MAX_KEYS:
            key = "other"
        self.suppressed[key] += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: the next line after the period logs the summary
            self._timer = loop.call_later(self.period_s - (now - self._since), self.summarise)

    def summarise(self) -> None:
        """Log the summary of the period now (if anything was suppressed) and start a new one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        total = sum(self.suppressed.values())
        if total:
            top = self.suppressed.most_common(SUMMARY_KEYS)
            rest = total - sum(n for _, n in top)
            parts = [f"{k}: {n}" for k, n in top]
            if rest:
                parts.append(f"{len(self.suppressed) - len(top)} other(s): {rest}")
            self.summaries += 1
            self.logger.log(
                self.level,
                "%s: %d more in the last %.1f s (not logged one by one): %s",
                self.what,
                total,
                now - self._since,
                "; ".join(parts),
            )
        self.suppressed = Counter()
        self.logged = 0
        self._since = now
