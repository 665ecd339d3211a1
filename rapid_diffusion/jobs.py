"""Training jobs: one at a time per device, each a separate ``python -m rapid_diffusion train`` process.

A job lives in ``$RAPID_DIFFUSION_HOME/jobs/<id>/``: ``job.json`` (settings, pid), ``data/``
(the uploaded pairs, copied in), ``log.txt``, and the trainer's own run files (``status.json``,
``loss.jsonl``, ``samples/``, ``checkpoints/``, ``model/``). All state is on disk, so a browser
refresh or a server restart loses nothing; the UI polls.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .paths import home_dir
from .train import STOP_FILE, read_losses, write_json_atomic

ACTIVE_STATES = ("starting", "preparing", "checking", "running", "saving")
STOP_GRACE_SECONDS = 60.0
TRAINER_NICENESS = 10


class JobBusyError(RuntimeError):
    """A job is already training on this device."""


@dataclass(frozen=True)
class JobSettings:
    """What the browser (or a caller) chooses; turned into ``rapid-diffusion train`` arguments."""

    base: str
    max_steps: int = 200
    learning_rate: float = 1e-5
    batch_size: int = 1
    resolution: int | None = None
    train_text_encoder: bool = True
    mixed_precision: str = "no"
    use_ema: bool = False
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_every: int = 50
    validation_inference_steps: int = 20
    checkpoint_every: int = 100
    domain_id: str | None = None
    extra_args: tuple[str, ...] = field(default=())

    def arguments(self, data: Path, output: Path) -> list[str]:
        args = [
            "--base", self.base, "--data", str(data), "--output", str(output),
            "--max-steps", str(self.max_steps), "--lr", str(self.learning_rate),
            "--batch-size", str(self.batch_size), "--mixed-precision", self.mixed_precision,
            "--seed", str(self.seed), "--gradient-accumulation-steps", str(self.gradient_accumulation_steps),
            "--validation-every", str(self.validation_every),
            "--validation-inference-steps", str(self.validation_inference_steps),
            "--checkpoint-every", str(self.checkpoint_every),
            "--train-text-encoder" if self.train_text_encoder else "--no-train-text-encoder",
        ]
        if self.resolution:
            args += ["--resolution", str(self.resolution)]
        if self.use_ema:
            args.append("--ema")
        if self.gradient_checkpointing:
            args.append("--gradient-checkpointing")
        if self.domain_id:
            args += ["--domain-id", self.domain_id]
        for prompt in self.validation_prompts:
            args += ["--validation-prompt", prompt]
        return args + list(self.extra_args)


class Job:
    """A view of one job folder; everything is read from disk on each call."""

    def __init__(self, folder: Path, process: subprocess.Popen | None = None):
        self.folder = Path(folder)
        self.id = self.folder.name
        self.process = process

    def info(self) -> dict:
        path = self.folder / "job.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def status(self) -> dict:
        """The trainer's status, corrected to ``failed`` when its process died without saying so."""
        path = self.folder / "status.json"
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            status = {"state": "starting", "step": 0}
        if status.get("state", "starting") in ACTIVE_STATES and not self.is_alive():
            status["state"] = "failed"
            status["message"] = f"训练进程已退出 / the training process exited; see {self.folder / 'log.txt'}: {self.log_tail(3)}"
        return status

    def is_alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        pid = self.info().get("pid")
        if not pid:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return _is_our_trainer(pid)

    def losses(self) -> list[dict]:
        return read_losses(self.folder)

    def sample_folders(self) -> list[Path]:
        root = self.folder / "samples"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def before_after(self) -> tuple[list[Path], list[Path]]:
        """Same-seed validation images of the base model (step 0) and of the latest step."""
        folders = self.sample_folders()
        if len(folders) < 2:
            return [], []
        return sorted(folders[0].glob("*.png")), sorted(folders[-1].glob("*.png"))

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
        return next((job for job in self.jobs() if job.is_alive()), None)

    def latest(self) -> Job | None:
        jobs = self.jobs()
        return jobs[0] if jobs else None

    def new_job_folder(self) -> Path:
        folder = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        (folder / "data").mkdir(parents=True)
        return folder

    def start(self, settings: JobSettings, data: Path, folder: Path | None = None) -> Job:
        """Start a training process on ``data`` (copied into the job's folder unless already there)."""
        running = self.active()
        if running is not None:
            raise JobBusyError(
                f"已有训练任务在运行（{running.id}），请等待或停止它 / job {running.id} is already training on this device"
            )
        folder = folder or self.new_job_folder()
        data = _copy_into(Path(data), folder / "data")
        command = [self.python, "-m", "rapid_diffusion", "train", *settings.arguments(data, folder)]
        if shutil.which("nice"):
            command = ["nice", "-n", str(TRAINER_NICENESS), *command]
        log = (folder / "log.txt").open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self._environment(),
            start_new_session=True,
        )
        log.close()
        write_json_atomic(
            folder / "job.json",
            {"id": folder.name, "pid": process.pid, "command": command, "settings": _settings_json(settings), "created_at": time.time()},
        )
        self._processes[folder.name] = process
        return Job(folder, process)

    def _environment(self) -> dict:
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
        env.setdefault("RAPID_DIFFUSION_HOME", str(home_dir()))
        return env


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


def _settings_json(settings: JobSettings) -> dict:
    return asdict(settings)
