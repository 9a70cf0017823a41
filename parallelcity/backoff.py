"""Retry delays shared by every reconnecting client (mirror, field writer, gateway).  Pure."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 10.0


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial`` doubling up to ``maximum``, each with +-``jitter``."""

    initial: float = BACKOFF_INITIAL_S
    maximum: float = BACKOFF_MAX_S
    jitter: float = 0.2

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (1.0 + random.uniform(-self.jitter, self.jitter))
            delay = min(self.maximum, delay * 2.0)
