"""What every housekeeping task shares: its name, and how it reports an item it skips.

A task never stops at one bad item (the volume is hostile, see the package doc): it reports the
item to an `OnError` and goes on. The agent's `OnError` counts per task (the `task` label of
`datapin_agent_item_errors_total`) and logs each item once; `log_item_error` is the default.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

#: A pod's `.state/<dataset>/` holds datapin's records of each workspace (see `engine.workspace`).
STATE: Final = ".state"


class Task(enum.StrEnum):
    """The agent's housekeeping tasks, as the `task` label of item errors."""

    ROOTS = "roots"
    COLLECT = "collect"
    SLOTS = "slots"
    REAP = "reap"
    SCAN = "scan"
    BUILDS = "builds"
    PREFETCH = "prefetch"


#: `(task, path, error)`: one item (a file, a directory, a workspace) that a task skipped.
OnError = Callable[[Task, str, BaseException], None]


def log_item_error(task: Task, path: str, exc: BaseException) -> None:
    """The default `OnError`: a warning (the agent counts and de-duplicates instead)."""
    log.warning("%s: skipped %s: %s", task, path, exc, extra={"task": str(task), "path": path})


def sorted_names(fd: int) -> list[str]:
    """Names in the open directory `fd`, sorted."""
    return sorted(os.listdir(fd))
