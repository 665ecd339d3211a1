"""Training jobs: one at a time per device, each a separate ``python -m rapid_diffusion.training.train`` process.

A job lives in ``$RAPID_DIFFUSION_HOME/jobs/<id>/``, which is also the trainer's ``--output``:
``run.json`` (its TrainConfig, read by ``train --config``), ``job.json`` (pid, command), ``data/``
(the uploaded pairs, copied in), ``log.txt``, the trainer's run files (``status.json``,
``loss.jsonl``, ``samples/``, ``checkpoints/``) and, once saved, the model itself (a diffusers
pipeline folder). All state is on disk, so a browser refresh or a server restart loses nothing;
the UI polls. This module imports no torch.

Sharing the device with generation (the policy): generation keeps being served while a job
trains. The trainer runs in its own process at a lower CPU priority (``nice -n 10``), and its memory
preflight counts only the memory that is free when it starts, so models already loaded for
generation are left alone. On a small GPU, generation may be slower while a job runs; a
second job waits until the first ends (:class:`JobBusyError`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ..domains import load_domains, user_domains_dir
from ..messages import say
from ..paths import home_dir, models_dir
from .run_files import (
    ACTIVE_STATES,
    CONFIG_FILE,
    OUTSIDE_DIR,
    SAMPLES_DIR,
    STOP_FILE,
    read_losses,
    read_status,
    read_validation_losses,
    step_folders,
    write_json_atomic,
)
from .options import TrainConfig
from .slot import slot_path, slot_taken

STOP_GRACE_SECONDS = 60.0
TRAINER_NICENESS = 10


class JobBusyError(RuntimeError):
    """A job is already training on this device."""


class Job:
    """A view of one job folder; everything is read from disk on each call."""

    def __init__(self, folder: Path, process: subprocess.Popen | None = None):
        self.folder = Path(folder)
        self.id = self.folder.name
        self.process = process

    def info(self) -> dict:
        path = self.folder / "job.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def config(self) -> TrainConfig | None:
        path = self.folder / CONFIG_FILE
        return TrainConfig.load(path) if path.is_file() else None

    def status(self) -> dict:
        """The trainer's status, corrected to ``failed`` when its process died without saying so."""
        status = read_status(self.folder) or {"state": "starting", "step": 0}
        if status.get("state", "starting") in ACTIVE_STATES and not self.is_alive():
            status["state"] = "failed"
            status["message"] = say("job_process_exited", tail=self.log_tail(3))
        return status

    def is_alive(self) -> bool:
        """The job's current process runs (after a resume, ``job.json`` names a newer one than ``process``)."""
        pid = self.info().get("pid")
        if self.process is not None and pid in (None, self.process.pid):
            return self.process.poll() is None
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return _is_our_trainer(pid)

    def losses(self) -> list[dict]:
        return read_losses(self.folder)

    def validation_losses(self) -> list[dict]:
        return read_validation_losses(self.folder)

    def sample_folders(self) -> list[Path]:
        return step_folders(self.folder / SAMPLES_DIR)

    def before_after(self) -> tuple[list[Path], list[Path]]:
        """Same-seed validation images of the base model (step 0) and of the latest step."""
        return _first_and_last(self.sample_folders())

    def outside_before_after(self) -> tuple[list[Path], list[Path]]:
        """Same-seed images of the prompts from outside the upload, by the base model and by the result."""
        return _first_and_last(step_folders(self.folder / OUTSIDE_DIR))

    def log_tail(self, lines: int = 20) -> str:
        path = self.folder / "log.txt"
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """Ask the trainer to save a checkpoint and end (a STOP file); SIGTERM it after the grace period."""
        (self.folder / STOP_FILE).touch()
        if grace_seconds <= 0:
            return
        deadline = time.time() + grace_seconds
        while time.time() < deadline and self.is_alive():
            time.sleep(0.5)
        if self.is_alive():
            self.terminate()

    def terminate(self) -> None:
        """SIGTERM: the trainer still saves a checkpoint before it exits."""
        pid = self.process.pid if self.process is not None else self.info().get("pid")
        if pid and self.is_alive():
            os.kill(pid, signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.time() + timeout
        while self.is_alive() and (deadline is None or time.time() < deadline):
            time.sleep(0.5)
        return self.status()


class JobManager:
    """Starts and finds jobs under ``root`` (default ``$RAPID_DIFFUSION_HOME/jobs``)."""

    def __init__(self, root: Path | None = None, python: str = sys.executable, env: dict | None = None):
        self.root = Path(root) if root is not None else home_dir() / "jobs"
        self.python = python
        self.env = env
        self._processes: dict[str, subprocess.Popen] = {}

    def job(self, job_id: str) -> Job:
        if not re.fullmatch(r"[0-9a-z-]{1,64}", job_id) or not (self.root / job_id).is_dir():
            raise KeyError(f"no job '{job_id}'")
        return Job(self.root / job_id, self._processes.get(job_id))

    def jobs(self) -> list[Job]:
        """Every job, newest first."""
        if not self.root.is_dir():
            return []
        folders = sorted((p for p in self.root.iterdir() if (p / "job.json").is_file()), key=lambda p: p.name, reverse=True)
        return [Job(p, self._processes.get(p.name)) for p in folders]

    def active(self) -> Job | None:
        """The job training now: its process runs and it has not reported an end. A trainer that
        has written "done" (or stopped, failed) no longer holds the device, even while its process
        is still exiting, so the next job may start."""
        return next((job for job in self.jobs() if job.is_alive() and job.status().get("state") in ACTIVE_STATES), None)

    def latest(self) -> Job | None:
        jobs = self.jobs()
        return jobs[0] if jobs else None

    def new_job_folder(self) -> Path:
        folder = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        (folder / "data").mkdir(parents=True)
        return folder

    def start(self, config: TrainConfig, data: Path, folder: Path | None = None) -> Job:
        """Start a training process on ``data`` (copied into the job's folder unless already there).

        The job's folder is the run's output; ``config.data`` and ``config.output`` are set here.
        """
        self._refuse_if_busy()
        folder = folder or self.new_job_folder()
        config = config.model_copy(update={"data": _copy_into(Path(data), folder / "data"), "output": folder})
        config.save(folder / CONFIG_FILE)
        return self._launch(folder)

    def resume(self, job_id: str) -> Job:
        """Continue a stopped or crashed job from its last complete checkpoint (same folder, same id)."""
        self._refuse_if_busy()
        job = self.job(job_id)
        config = job.config()
        if config is None:
            raise KeyError(f"job '{job_id}' has no {CONFIG_FILE}")
        config.model_copy(update={"resume": True}).save(job.folder / CONFIG_FILE)
        (job.folder / STOP_FILE).unlink(missing_ok=True)
        return self._launch(job.folder)

    def _refuse_if_busy(self) -> None:
        """A job of this manager, or any other trainer on this device (``rapid-diffusion train``: :mod:`.slot`)."""
        if self.active() is not None or slot_taken(slot_path(self.root)):
            raise JobBusyError(say("training_busy"))

    def _launch(self, folder: Path) -> Job:
        command = [self.python, "-m", "rapid_diffusion.training.train", "--config", str(folder / CONFIG_FILE)]
        if shutil.which("nice"):
            command = ["nice", "-n", str(TRAINER_NICENESS), *command]
        with (folder / "log.txt").open("ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._environment(),
                start_new_session=True,
            )
        write_json_atomic(folder / "job.json", {"id": folder.name, "pid": process.pid, "command": command, "created_at": time.time()})
        self._processes[folder.name] = process
        return Job(folder, process)

    def _environment(self) -> dict:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
        env.setdefault("RAPID_DIFFUSION_HOME", str(home_dir()))
        return env


def _first_and_last(folders: list[Path]) -> tuple[list[Path], list[Path]]:
    if len(folders) < 2:
        return [], []
    before, after = (sorted(f.glob("*.png"), key=lambda p: int(p.stem)) for f in (folders[0], folders[-1]))
    return before, after


def _copy_into(data: Path, target: Path) -> Path:
    """The job's own copy of its data (a file, or a folder's regular files; links are skipped)."""
    if target in data.resolve().parents or data.resolve() == target.resolve():
        return data
    target.mkdir(parents=True, exist_ok=True)
    if data.is_file():
        return Path(shutil.copy2(data, target / data.name))
    for path in data.iterdir():
        if path.is_file() and not path.is_symlink():
            shutil.copy2(path, target / path.name)
    return target


def _is_our_trainer(pid: int) -> bool:
    """Not a zombie, and not a reused pid after a restart (Linux: check state and command line)."""
    proc = Path(f"/proc/{pid}")
    if not proc.exists():
        return True
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and (not cmdline or b"rapid_diffusion" in cmdline)


class DeleteRefused(ValueError):
    """The domain is not a fine-tuned model of this server (or it is training); the message says which."""


def delete_finetuned(domain_id: str, jobs: JobManager | None = None) -> str:
    """Remove a fine-tuned model: its domain YAML in the user folder and its run folder.

    Shipped and configured domains are refused, and so is a model whose job is still training.
    The folder is deleted only when the trainer wrote it (it holds ``status.json``) or the importer did
    (it is in ``$RAPID_DIFFUSION_HOME/models``), so a YAML
    pointing at some other folder loses its registration, never the files. Returns a sentence.
    """
    spec = load_domains().get(domain_id)
    if spec is None or spec.source_file is None or spec.source_file.parent != user_domains_dir():
        raise DeleteRefused(f"只能删除微调得到的模型 / only fine-tuned models can be deleted: '{domain_id}'")
    folder = spec.model.path if spec.model.is_local else None
    running = (jobs or JobManager()).active()
    if running is not None and folder is not None and running.folder.resolve() == folder:
        raise DeleteRefused("该模型正在训练，请先停止 / this model is training; stop it first")
    spec.source_file.unlink(missing_ok=True)
    if folder is not None and ((folder / "status.json").is_file() or folder.parent == models_dir().resolve()):
        shutil.rmtree(folder, ignore_errors=True)
    return f"已删除模型「{spec.title_zh}」 / deleted {spec.title_en}"
