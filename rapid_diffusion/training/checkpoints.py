"""Checkpoints (written whole, then renamed), stop requests, resume, and a run's end by failure (a full disk included)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import threading
from pathlib import Path

from .options import TrainConfig, TrainingError
from .run_files import (
    CHECKPOINT_PREFIX,
    MODEL_TMP,
    STOP_FILE,
    TMP_CHECKPOINT_PREFIX,
    RunFiles,
    checkpoint_step,
    complete_checkpoints,
)

DISK_FULL = (
    "磁盘已满，训练已停止；已删除未写完的文件。请释放空间后点击「继续训练」（命令行：--resume） / "
    "disk full: the run stopped and its partial files were removed; free some space, then resume"
)



def save_checkpoint(accelerator, folder: Path, step: int, keep: int) -> Path:
    """Write to ``tmp-checkpoint-N``, rename when every process is done, then prune old ones."""
    root = Path(folder) / "checkpoints"
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{step}"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_partial_files(folder: Path) -> None:
    """Half-written checkpoints and a half-saved model: never used, and they may fill the disk."""
    root = Path(folder) / "checkpoints"
    for partial in root.glob(f"{TMP_CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(Path(folder) / MODEL_TMP, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or a quota) anywhere in the chain: torch and safetensors wrap the OSError."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ----------------------------------------------------------------------------- stop requests


class StopRequest:
    """Set by SIGTERM or by a ``STOP`` file in the run folder; ``close`` restores the old handler."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / STOP_FILE
        self.event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def requested(self) -> bool:
        return self.event.is_set() or self.file.exists()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fail(files: RunFiles, exc: BaseException) -> str:
    """Mark the run failed with a sentence; after a full disk, delete the partial files first."""
    if is_disk_full(exc):
        if files.enabled:
            remove_partial_files(files.folder)
        message = DISK_FULL
    elif isinstance(exc, TrainingError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = "已中断 / interrupted"
    else:
        message = f"{type(exc).__name__}: {exc}"
    try:
        files.update(state="failed", message=message)
    except OSError:
        pass  # the disk is still full: status.json keeps its last complete version
    return message



def resume_if_asked(config: TrainConfig, accelerator, files: RunFiles, say) -> int:
    """Load the newest complete checkpoint when ``--resume``; returns the step to continue from.
    The loss histories are cut at that step (0 without a checkpoint), so no step appears twice."""
    if accelerator.is_main_process:
        remove_partial_files(config.output)
    accelerator.wait_for_everyone()
    found = complete_checkpoints(config.output) if config.resume else []
    step = 0
    if found:
        accelerator.load_state(str(found[-1]))
        step = checkpoint_step(found[-1])
        say(f"resumed from {found[-1].name} / 从第 {step} 步继续")
    elif config.resume:
        say("no checkpoint to resume from; starting at step 0 / 没有检查点，从头开始")
    files.truncate_losses(step)
    return step


