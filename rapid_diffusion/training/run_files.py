"""The run-file protocol between a trainer and whoever watches it (the CLI, jobs, the Fine-tune tab).

A run folder (``train --output DIR``) is the diffusers pipeline folder of the result, with the
trainer's run files beside the model's components::

    model_index.json, unet/, text_encoder/, tokenizer/, vae/, scheduler/   the pipeline (when saved)
    run.json               the run's TrainConfig (jobs write it; ``--config`` reads it)
    status.json            state, step, loss, remaining seconds, message (rewritten atomically)
    loss.jsonl             one {"step", "loss", "lr"} per optimizer step
    val_loss.jsonl         one {"step", "loss"} per validation on the held-out pairs
    samples/step-000000/   validation images at a fixed seed (step 0 = the base model)
    outside/step-000000/   prompts from outside the upload, same seed, before (step 0) and after training
    prior/                 the prior pairs the base model drew (metadata.jsonl + PNGs), when prior preservation is on
    comparison.json        the before/after figures (:func:`comparison_lines` says them)
    checkpoints/checkpoint-<step>/   complete accelerate states (written to tmp-*, then renamed)
    STOP                   present: the trainer saves and ends

This module has no torch import, so that the web UI and the job manager can read runs cheaply.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from ..messages import say
from .options import TrainConfig, TrainingError

STOP_FILE = "STOP"
CONFIG_FILE = "run.json"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = "tmp-" + CHECKPOINT_PREFIX
MODEL_TMP = "model.tmp"
SAMPLES_DIR = "samples"
OUTSIDE_DIR = "outside"
PRIOR_DIR = "prior"
COMPARISON_FILE = "comparison.json"
ACTIVE_STATES = ("starting", "preparing", "checking", "generating", "running", "saving")


def write_json_atomic(path: Path, data: dict) -> None:
    """Readers never see half a file: write a hidden temp file, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rename_run(folder: Path, name: str, domain_id: str) -> TrainConfig:
    """Record the owner's new name for a run in its ``run.json``, with its domain id pinned (a run without
    one derives it from the name), so that resuming the run publishes under that name and id. The new
    file is read back by ``TrainConfig.load`` before it replaces the old one."""
    path = Path(folder) / CONFIG_FILE
    TrainConfig.load(path)  # a readable config, or TrainingError
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(name=name, domain_id=domain_id)
    draft = path.with_name(f".{path.name}.draft")
    try:
        draft.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        config = TrainConfig.load(draft)
        os.replace(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    return config


def recorded_name(folder: Path) -> str | None:
    """The name in a run folder's ``run.json`` (the owner may rename a model while its run trains), or None."""
    path = Path(folder) / CONFIG_FILE
    try:
        return TrainConfig.load(path).name if path.is_file() else None
    except TrainingError:
        return None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a half-written last line (a crash mid-write) is ignored."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_losses(folder: Path) -> list[dict]:
    return read_jsonl(Path(folder) / "loss.jsonl")


def read_validation_losses(folder: Path) -> list[dict]:
    return read_jsonl(Path(folder) / "val_loss.jsonl")


def read_status(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "status.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def step_folders(root: Path) -> list[Path]:
    """``step-N`` folders under ``root``, oldest first."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")) if root.is_dir() else []


def read_comparison(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / COMPARISON_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first; half-written ``tmp-*`` folders never count."""
    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


class RunFiles:
    """The run folder's status, loss histories and samples; written by the main process only."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.status: dict = {}
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)

    def update(self, **fields) -> None:
        self.status.update(fields, updated_at=time.time())
        if self.enabled:
            write_json_atomic(self.folder / "status.json", self.status)

    def log_loss(self, step: int, loss: float, lr: float, prior_loss: float | None = None) -> None:
        row = {"step": step, "loss": loss, "lr": lr}
        self._append("loss.jsonl", row if prior_loss is None else {**row, "prior_loss": prior_loss})

    def update_comparison(self, **fields) -> None:
        """Add to ``comparison.json`` (kept across a resume: the "before" figures are measured once)."""
        if self.enabled:
            write_json_atomic(self.folder / COMPARISON_FILE, {**read_comparison(self.folder), **fields})

    def log_validation_loss(self, step: int, loss: float) -> None:
        self._append("val_loss.jsonl", {"step": step, "loss": loss})

    def truncate_losses(self, after_step: int) -> None:
        """Drop entries past the step a run continues from (0 when it starts over): no repeats."""
        for name in ("loss.jsonl", "val_loss.jsonl"):
            path = self.folder / name
            if self.enabled and path.is_file():
                kept = [row for row in read_jsonl(path) if row["step"] <= after_step]
                path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    def _append(self, name: str, row: dict) -> None:
        if self.enabled:
            with (self.folder / name).open("a", encoding="utf-8") as history:
                history.write(json.dumps(row) + "\n")


def comparison_lines(comparison: dict) -> list[str]:
    """The before/after figures as sentences (Chinese first): how much closer to the uploads, how much
    the outside prompts' images changed (the demo judge's score, the Chinese CLIP score where measured)."""
    lines = []
    if "fit_loss_before" in comparison and "fit_loss_after" in comparison:
        before, after = comparison["fit_loss_before"], comparison["fit_loss_after"]
        key = "compare_closer_held_out" if comparison.get("fit_on") == "held_out" else "compare_closer_training"
        lines.append(say(key, before=before, after=after, change=100 * (after - before) / before if before else 0.0))
    if "outside_changed" in comparison:
        lines.append(say("compare_outside_changed", count=len(comparison.get("outside_prompts", [])), changed=comparison["outside_changed"]))
    if "judge_before" in comparison and "judge_after" in comparison:
        before, after = comparison["judge_before"], comparison["judge_after"]
        lines.append(say("compare_outside_judge", before=before, after=after, kept=100 * after / before if before else 0.0))
    clip = comparison.get("clip") or {}
    if clip:
        lines.append(say("compare_clip" if "held_out_before" in clip else "compare_clip_outside", **clip))
    elif comparison.get("clip_unavailable"):
        lines.append(say("compare_clip_unavailable"))
    return lines
