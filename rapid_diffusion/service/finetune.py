"""Fine-tuning as a person does it: check the pairs, start, stop, resume, watch, delete the model.

:class:`FinetuneService` is what the "微调 / Fine-tune" tab's events call (``AppService.finetune``
holds one). Plain values in (file paths, caption rows, a :class:`Form` of what the browser sent),
plain values and dataclasses out; the sentences come from :mod:`rapid_diffusion.messages`, Chinese first. All job
state lives on disk (:mod:`rapid_diffusion.training.jobs`), so :meth:`FinetuneService.view` shows a running job again after
a browser refresh. The defaults come from ``training.options`` (the schema the trainer and the CLI use),
and the presets replace steps and learning rate for most people.

Access: on a public host (``settings().is_public``) fine-tuning is off unless a password is
configured (``RAPID_DIFFUSION_FINETUNE_PASSWORD_HASH``, see :mod:`.access`); with a password, every action (check, start,
stop, resume, view, delete) needs it. Each method checks this itself, whoever calls it. A refusal
comes back as the sentence to show, where the action's result would have been shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, NamedTuple

from ..domains import user_domains_dir
from ..messages import say, without_paths
from ..settings import settings
from ..training.data import IMAGE_SUFFIXES, DataReport, check_uploads, write_pairs_folder
from ..training.jobs import ACTIVE_STATES, DeleteRefused, Job, JobBusyError, JobManager, delete_finetuned
from ..training.run_files import comparison_lines, read_comparison
from ..training.options import (
    DEFAULT_PRESET,
    PRIOR_PRESERVATION,
    Preset,
    TrainConfig,
    TrainingError,
    cadence,
    defaults,
    estimate_seconds,
    preset_for,
)

if TYPE_CHECKING:
    from ..models.registry import ModelRegistry

STATE_NAMES = {
    "starting": "启动中 / starting",
    "preparing": "准备中 / preparing",
    "checking": "检查数据 / checking data",
    "generating": "生成保留用图片 / drawing pictures to keep what the model knew",
    "running": "训练中 / training",
    "saving": "保存中 / saving",
    "done": "完成 / done",
    "stopped": "已提前停止（模型可用）/ stopped early (model usable)",
    "failed": "失败 / failed",
}
REPORT_ISSUES_SHOWN = 200
SAMPLES_SHOWN = 12


@dataclass(frozen=True)
class Form:
    """The tab's inputs as plain values (what the browser sends)."""

    name: str | None
    base: str | None
    steps: float | None
    learning_rate: str | float | None
    batch_size: float | None
    accumulation: float | None
    resolution: float | None
    train_text_encoder: bool
    mixed_precision: str
    gradient_checkpointing: bool
    use_ema: bool
    seed: float | None
    prompt: str | None
    prior_preservation: str | None = None


@dataclass(frozen=True)
class StartOutcome:
    """The job started (or resumed), or None; and the sentence to show either way."""

    job_id: str | None
    message: str


class PresetFields(NamedTuple):
    """The Advanced numbers a preset stands for on one base."""

    steps: int
    learning_rate: str
    batch_size: int
    accumulation: int


@dataclass(frozen=True)
class JobView:
    """Everything there is to show about one job, read from its folder."""

    job_id: str | None
    status_markdown: str
    step: int
    max_steps: int
    eta_seconds: float | None  # only while the job is active
    training_loss: list[tuple[int, float]]  # smoothed
    validation_loss: list[tuple[int, float]]
    samples: list[tuple[str, str]]  # (image path, caption)
    comparison: list[tuple[str, str]]
    new_domain: str | None
    revision: str | None = None  # changes whenever the job's files do
    figures: list[str] = field(default_factory=list)  # the before/after figures, one sentence each


def empty_view() -> JobView:
    return JobView(None, say("no_job_yet"), 0, 0, None, [], [], [], [], None)


class FinetuneService:
    """The fine-tuning actions on one registry (the bases, the new models) and one job folder."""

    def __init__(self, registry: ModelRegistry, jobs: JobManager):
        self.registry = registry
        self.jobs = jobs

    # ------------------------------------------------------------------ access

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why this host offers no fine-tuning at all (then no tab is built), or None."""
        return None if settings().finetune_allowed else say("finetune_off")

    @staticmethod
    def password_required() -> bool:
        return settings().password_required

    # ------------------------------------------------------------------ the data

    @staticmethod
    def caption_rows(files: list[str] | None) -> list[list[str]]:
        """One ``[file name, caption]`` row per uploaded image, captions prefilled from same-stem ``.txt`` uploads."""
        paths = [Path(f) for f in files or []]
        sidecars = {p.stem: p for p in paths if p.suffix.lower() == ".txt"}
        rows = []
        for path in paths:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                sidecar = sidecars.get(path.stem)
                text = sidecar.read_text(encoding="utf-8", errors="replace")[:1000].strip() if sidecar else ""
                rows.append([path.name, text])
        return rows

    def check(self, files: list[str] | None, rows: list[list[str]] | None, password: str | None = None) -> str:
        """The check report of the uploads with the captions typed in the editor (markdown)."""
        return access_problem(password) or report_markdown(check_rows(files, rows))

    # ------------------------------------------------------------------ presets and bases

    def base_choices(self) -> list[tuple[str, str]]:
        """Every domain a model can be fine-tuned from, by its display name."""
        return [(spec.title, domain_id) for domain_id, spec in self.registry.domains.items()]

    def default_base(self) -> str | None:
        domains = self.registry.domains
        return "demo" if "demo" in domains else next(iter(domains), None)

    def finetuned_choices(self) -> list[tuple[str, str]]:
        """The fine-tuned models (user domains) by their display names."""
        return [
            (spec.title_zh, spec.id) for spec in self.registry.domains.values()
            if spec.source_file is not None and spec.source_file.parent == user_domains_dir()
        ]

    def preset_fields(self, base: str | None, preset: str | None) -> PresetFields:
        """The Advanced numbers a preset stands for on this base: steps, learning rate, batch, accumulation."""
        chosen = self._preset(base, preset)
        return PresetFields(chosen.max_steps, f"{chosen.learning_rate:g}", chosen.batch_size, chosen.gradient_accumulation_steps)

    def duration(self, base: str | None, preset: str | None, prior_preservation: str | None = None) -> str:
        """How long the preset takes here (the prior pairs' generation included), from measured times, or when it will be known."""
        side = self._native_side(base)
        chosen = self._preset(base, preset)
        seconds = estimate_seconds(chosen, side, self._device_kind(), prior_choice(prior_preservation))
        if seconds is None:
            return say("duration_after_start", steps=chosen.max_steps)
        time_zh, time_en = duration_words(seconds)
        return say("duration_measured", time_zh=time_zh, time_en=time_en)

    def _preset(self, base: str | None, preset: str | None) -> Preset:
        return capped(preset_for(preset or DEFAULT_PRESET, self._native_side(base)))

    def _native_side(self, base: str | None) -> int:
        spec = self.registry.domains.get(base) if base else None
        return min(spec.height, spec.width) if spec else 512

    def _device_kind(self) -> str:
        device = getattr(self.registry, "device", None)
        return "cuda" if device is not None and getattr(device, "type", str(device)) == "cuda" else "cpu"

    # ------------------------------------------------------------------ actions

    def start(self, files: list[str] | None, rows: list[list[str]] | None, form: Form, password: str | None = None,
              names: Mapping[str, tuple[str, str]] | None = None) -> StartOutcome:
        """Check access, the base, the name, the settings and the data, then start training in a new job folder.

        Only a known domain can be the base, so a browser cannot name an arbitrary folder. A refused
        setting is named as ``names`` says the tab labels it (TrainConfig field -> (Chinese, English)).
        """
        problem = access_problem(password)
        if problem:
            return StartOutcome(None, problem)
        if form.base not in self.registry.domains:
            return StartOutcome(None, say("unknown_base", base=form.base))
        try:
            config = config_from_form(form, names)
        except TrainingError as exc:
            return StartOutcome(None, str(exc))
        if self.jobs.active() is not None:
            return StartOutcome(None, say("job_running"))
        too_big = job_budget_problem(files)
        if too_big:
            return StartOutcome(None, too_big)
        report = check_rows(files, rows)
        if not report.usable:
            return StartOutcome(None, say("no_pairs") + "\n\n" + report_markdown(report))
        folder = self.jobs.new_job_folder()
        write_pairs_folder(report.pairs, folder / "data")
        try:
            job = self.jobs.start(config, folder / "data", folder=folder)
        except JobBusyError as exc:
            return StartOutcome(None, str(exc))
        return StartOutcome(job.id, say("job_started", name=config.name) + "\n\n" + report_markdown(report))

    def stop(self, job_id: str | None, password: str | None = None) -> str:
        """Ask the running job (the given one, else the newest) to save what it has and stop."""
        problem = access_problem(password)
        if problem:
            return problem
        job = self._job_or_latest(job_id)
        if job is None or not job.is_alive():
            return say("no_running_job")
        job.stop(grace_seconds=0)
        return say("job_stopping")

    def resume(self, job_id: str | None, password: str | None = None) -> StartOutcome:
        """继续训练: a stopped or failed job continues from its last complete checkpoint."""
        problem = access_problem(password)
        if problem:
            return StartOutcome(None, problem)
        job = self._job_or_latest(job_id)
        if job is None or job.status().get("state") not in ("stopped", "failed"):
            return StartOutcome(None, say("nothing_to_resume"))
        try:
            job = self.jobs.resume(job.id)
        except (JobBusyError, KeyError) as exc:
            return StartOutcome(None, str(exc))
        return StartOutcome(job.id, say("job_resuming"))

    def delete(self, domain_id: str | None, password: str | None = None) -> str:
        """Remove a fine-tuned model (shipped and configured domains are refused); returns the sentence to show."""
        problem = access_problem(password)
        if problem:
            return problem
        if not domain_id:
            return say("no_model_picked")
        try:
            return self.remove(domain_id)
        except DeleteRefused as exc:
            return str(exc)

    def remove(self, domain_id: str) -> str:
        """Delete a fine-tuned model's files and registration, free its memory, re-read the domains.
        The one removal both tabs use; raises :class:`DeleteRefused` for any other model."""
        spec = self.registry.domains.get(domain_id)
        message = delete_finetuned(domain_id, self.jobs)
        if spec is not None:
            self.registry.unload(self.registry.key_for(spec))
        self.registry.reload_domains()
        return message

    # ------------------------------------------------------------------ watching a job

    def view(self, job_id: str | None, password: str | None = None) -> JobView | None:
        """The given job (else the newest) as read from disk; None for a caller without access."""
        if access_problem(password):
            return None
        job = self._job_or_latest(job_id)
        if job is None:
            return empty_view()
        return job_view(job)

    def _job_or_latest(self, job_id: str | None) -> Job | None:
        if job_id:
            try:
                return self.jobs.job(job_id)
            except KeyError:
                return None
        return self.jobs.latest()


def access_problem(given: str | None) -> str | None:
    """Why this caller may not use fine-tuning (off, or a wrong password), or None."""
    if not settings().finetune_allowed:
        return say("finetune_off")
    check = settings().password_check
    if check is not None and not check(given):
        return say("wrong_password")
    return None


# ----------------------------------------------------------------------------- the data


def job_budget_problem(files: list[str] | None) -> str | None:
    """The uploads a job would copy into its folder, against ``RAPID_DIFFUSION_MAX_JOB_BYTES``."""
    limit = settings().max_job_bytes
    total = sum(Path(f).stat().st_size for f in files or [] if Path(f).is_file())
    if total <= limit:
        return None
    return say("job_too_big", total=total / 2**20, limit=limit / 2**20)


def check_rows(files: list[str] | None, rows: list[list[str]] | None) -> DataReport:
    """Check the uploads with the captions typed in the editor (they win over ``.txt`` files)."""
    captions = {str(r[0]): str(r[1] or "") for r in rows or [] if len(r) >= 2 and r[0]}
    return check_uploads([Path(f) for f in files or []], captions={k: v for k, v in captions.items() if v.strip()})


def report_markdown(report: DataReport) -> str:
    lines = [f"**{report.summary()}**"]
    lines += [f"- {issue.message}" for issue in report.issues[:REPORT_ISSUES_SHOWN]]
    hidden = len(report.issues) - REPORT_ISSUES_SHOWN
    if hidden > 0:
        lines.append(f"- … {hidden} more / 另有 {hidden} 项")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the settings


def capped(preset: Preset) -> Preset:
    """The host's step limit (``RAPID_DIFFUSION_FINETUNE_MAX_STEPS``) applies to presets too."""
    limit = settings().finetune_max_steps
    return replace(preset, max_steps=min(preset.max_steps, limit)) if limit else preset


def config_from_form(form: Form, names: Mapping[str, tuple[str, str]] | None = None) -> TrainConfig:
    """A TrainConfig (data and output filled in by the job manager); raises TrainingError in Chinese first,
    naming each refused option as ``names`` says the tab labels it (TrainConfig field -> (Chinese, English))."""
    config = TrainConfig.checked({
        "base": form.base or "", "data": ".", "output": ".", "name": (form.name or "").strip(),
        "max_steps": form.steps, "learning_rate": form.learning_rate,
        "batch_size": form.batch_size or 1, "gradient_accumulation_steps": form.accumulation or 1,
        "resolution": form.resolution or None, "train_text_encoder": bool(form.train_text_encoder),
        "mixed_precision": form.mixed_precision or "no", "gradient_checkpointing": bool(form.gradient_checkpointing),
        "use_ema": bool(form.use_ema), "seed": form.seed or 0, "prior_preservation": prior_choice(form.prior_preservation),
        "validation_prompts": [form.prompt.strip()] if form.prompt and form.prompt.strip() else [],
    }, names)
    limit = settings().finetune_max_steps
    if limit and config.max_steps > limit:
        raise TrainingError(say("too_many_steps", limit=limit))
    every = cadence(config.max_steps)
    return config.model_copy(update={"validation_every": every, "checkpoint_every": every})


def prior_choice(value: str | None) -> str:
    """The tab's "keep what the model knew" choice; nothing chosen is the schema's default."""
    return value if value in PRIOR_PRESERVATION else defaults()["prior_preservation"]


# ----------------------------------------------------------------------------- a job as shown


def job_view(job: Job) -> JobView:
    status = job.status()
    state = status.get("state", "starting")
    config = job.config()
    name = (config.name if config and config.name else None) or status.get("name") or "微调模型 / fine-tuned model"
    head = f"**{name}** · {STATE_NAMES.get(state, state)}"
    progress = say("prior_generating", done=status.get("prior_done", 0), total=status.get("prior_total", 0)) if state == "generating" else ""
    text = without_paths("\n\n".join(filter(None, [head, progress, status.get("message") or "", status.get("data")])))
    finished = state in ("done", "stopped")
    losses = job.losses()
    return JobView(
        job.id,
        text,
        int(status.get("step") or 0),
        int(status.get("max_steps") or 0),
        status.get("eta_seconds") if status.get("state") in ACTIVE_STATES else None,
        list(zip([row["step"] for row in losses], smoothed([row["loss"] for row in losses]))),
        [(row["step"], row["loss"]) for row in job.validation_losses()],
        sample_gallery(job)[-SAMPLES_SHOWN:],
        comparison_gallery(job, status) if finished else [],
        status.get("domain_id") if finished else None,
        f"{job.id}:{status.get('updated_at')}:{state}",
        comparison_lines(read_comparison(job.folder)) if finished else [],
    )


def sample_gallery(job: Job) -> list[tuple[str, str]]:
    """The fixed-seed samples written while training, oldest first, each labelled with its step."""
    items = []
    for folder in job.sample_folders():
        step = int(folder.name.split("-")[-1])
        items += [(str(p), f"第 {step} 步 / step {step}") for p in sorted(folder.glob("*.png"))]
    return items


def comparison_gallery(job: Job, status: dict) -> list[tuple[str, str]]:
    """Before / after, side by side (pairs in a four-column gallery), same seed: each validation prompt
    (the held-out captions), then each prompt from outside the upload."""
    seed = status.get("validation_seed", 0)
    items = []
    for (before, after), prompts, where in (
        (job.before_after(), status.get("validation_prompts") or [], ""),
        (job.outside_before_after(), status.get("outside_prompts") or [], "上传以外 / outside the upload · "),
    ):
        for i, (b, a) in enumerate(zip(before, after)):
            prompt = prompts[i] if i < len(prompts) else ""
            items.append((str(b), f"微调前 / before · {where}{prompt} · 种子 / seed {seed}"))
            items.append((str(a), f"微调后 / after · {where}{prompt} · 种子 / seed {seed}"))
    return items


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential smoothing with debiasing: the raw per-step loss is noise."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def duration_words(seconds: float) -> tuple[str, str]:
    """("2 分 2 秒", "2 min 2 s"): a duration in each language, for a sentence that says it once in each."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} 小时 {minutes} 分", f"{hours} h {minutes} min"
    return (f"{minutes} 分 {secs} 秒", f"{minutes} min {secs} s") if minutes else (f"{secs} 秒", f"{secs} s")
