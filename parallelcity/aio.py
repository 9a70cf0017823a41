"""Ending a task an object owns: cancelled, then awaited within a bound.

Every object that starts a task (a watcher, a handler, a settler) ends it in its own
close with ``cancel_and_wait``, so nothing it started outlives it; a task that does
not end within the bound is logged and left, rather than hanging the close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("parallelcity")

CLOSE_TIMEOUT_S = 5.0
"""How long a close waits for a cancelled task to end."""


async def cancel_and_wait(
    task: asyncio.Task[Any] | None, timeout_s: float = CLOSE_TIMEOUT_S
) -> bool:
    """Cancel ``task`` and wait up to ``timeout_s`` for it to end; True if it ended.

    Its result or error is not raised (the owner is closing); a task still running
    after the bound is logged by name.
    """
    if task is None:
        return True
    task.cancel()
    if task is asyncio.current_task():
        return False
    await asyncio.wait({task}, timeout=timeout_s)  # a cancel of the caller still propagates
    if not task.done():
        log.error("task %r did not end within %g s of being cancelled", task.get_name(), timeout_s)
        return False
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("task %r ended with %r", task.get_name(), exc)
    return True
