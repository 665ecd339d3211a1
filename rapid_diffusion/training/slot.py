"""One training per device: every trainer holds an exclusive lock on ``$RAPID_DIFFUSION_HOME/jobs/training.lock``
while it runs, whichever face started it (a web UI job's process, ``rapid-diffusion train``).

The operating system releases the lock when its process ends, however it ends (a ``kill -9`` too),
so no stale lock outlives a trainer. Under ``accelerate launch`` only the main process holds it.
Where ``fcntl`` does not exist (Windows) there is no lock: the job manager's own check still holds.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..messages import say
from ..paths import home_dir
from .options import TrainingError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_NAME = "training.lock"


def slot_path(jobs_root: Path | None = None) -> Path:
    return (jobs_root or home_dir() / "jobs") / LOCK_NAME


def is_main_process() -> bool:
    """``accelerate launch`` numbers its processes with ``RANK``; a plain run has none."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def training_slot(path: Path | None = None) -> Iterator[None]:
    """Hold the device's training slot for the body; :class:`TrainingError` at once if another trainer has it."""
    if fcntl is None or not is_main_process():
        yield
        return
    path = path or slot_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(say("training_busy")) from None
        yield


def slot_taken(path: Path | None = None) -> bool:
    """Whether a trainer holds the slot now (checked by taking and releasing it)."""
    try:
        with training_slot(path):
            return False
    except TrainingError:
        return True
