"""The "微调 / Fine-tune" tab: upload pairs, name the model, pick a preset, start; watch, stop, resume, compare.

``build_finetune_tab(registry, jobs)`` is called inside a ``gr.Tab`` context by ``ui.py``.
All job state lives on disk (:mod:`rapid_diffusion.jobs`); the tab polls it every two seconds,
so a browser refresh shows the running job again. The handlers below are plain functions of
plain values, testable without a browser. Its defaults come from ``train_options`` (the schema
the trainer and the CLI use), and the presets replace steps and learning rate for most people.

Public hosts (``settings().is_public``): fine-tuning is off unless a password is configured
(``RAPID_DIFFUSION_FINETUNE_PASSWORD``); with a password, every action of the tab (start, stop,
resume, check, poll, delete) needs it, and none of the tab's events is in the public API.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace
from pathlib import Path

from .data import IMAGE_SUFFIXES, DataReport, check_uploads, write_pairs_folder
from .jobs import ACTIVE_STATES, DeleteRefused, JobBusyError, JobManager, delete_finetuned
from .settings import settings
from .train_options import (
    DEFAULT_PRESET,
    PRESET_LABELS,
    Preset,
    TrainConfig,
    TrainingError,
    cadence,
    defaults,
    estimate_seconds,
    name_problem,
    preset_for,
)

POLL_SECONDS = 2.0
STEP_AXIS, LOSS_AXIS, SERIES = "步数", "损失", "曲线"
PLOT_COLUMNS = ("step", "loss", "series")  # vega-lite field names stay ASCII; the titles carry the Chinese
TRAIN_SERIES, VALIDATION_SERIES = "训练（平滑）/ training (smoothed)", "验证 / validation"
LEARNING_RATES = ["1e-3", "5e-4", "2e-4", "1e-4", "5e-5", "2e-5", "1e-5", "5e-6", "2e-6", "1e-6"]
PRECISION_CHOICES = [
    ("不使用（最稳）/ off (full precision)", "no"),
    ("bf16（较新的显卡）/ bf16 (recent GPUs)", "bf16"),
    ("fp16（较旧的显卡）/ fp16 (older GPUs)", "fp16"),
]
WRONG_PASSWORD = "密码错误 / wrong password"
FINETUNE_OFF = (
    "本服务器未开放微调：公开部署时需要设置微调密码（RAPID_DIFFUSION_FINETUNE_PASSWORD）/ "
    "Fine-tuning is off on this server: a public host needs a fine-tune password."
)


def access_problem(given: str | None) -> str | None:
    """Why this caller may not use fine-tuning (off, or a wrong password), or None."""
    if not settings().finetune_allowed:
        return FINETUNE_OFF
    expected = settings().password
    if expected and not hmac.compare_digest((given or "").encode(), expected.encode()):
        return WRONG_PASSWORD
    return None


# ----------------------------------------------------------------------------- data


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


def job_budget_problem(files: list[str] | None) -> str | None:
    """The uploads a job would copy into its folder, against ``RAPID_DIFFUSION_MAX_JOB_BYTES``."""
    limit = settings().max_job_bytes
    total = sum(Path(f).stat().st_size for f in files or [] if Path(f).is_file())
    if total <= limit:
        return None
    return f"上传文件共 {total / 2**20:.0f} MB，超过每个训练任务 {limit / 2**20:.0f} MB 的上限 / the uploads ({total / 2**20:.0f} MB) exceed a job's budget of {limit / 2**20:.0f} MB"


def check_rows(files: list[str] | None, rows: list[list[str]] | None) -> DataReport:
    """Check the uploads with the captions typed in the editor (they win over ``.txt`` files)."""
    captions = {str(r[0]): str(r[1] or "") for r in rows or [] if len(r) >= 2 and r[0]}
    return check_uploads([Path(f) for f in files or []], captions={k: v for k, v in captions.items() if v.strip()})


def report_markdown(report: DataReport) -> str:
    lines = [f"**{report.summary()}**"]
    lines += [f"- {issue.message}" for issue in report.issues[:200]]
    if len(report.issues) > 200:
        lines.append(f"- … {len(report.issues) - 200} more / 另有 {len(report.issues) - 200} 项")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- presets and the form


def native_side(registry, base: str | None) -> int:
    spec = registry.domains.get(base) if base else None
    return min(spec.height, spec.width) if spec else 512


def device_kind(registry) -> str:
    device = getattr(registry, "device", None)
    return "cuda" if device is not None and getattr(device, "type", str(device)) == "cuda" else "cpu"


def preset_fields(registry, base: str | None, preset: str) -> tuple[int, str, int, int]:
    """The Advanced numbers a preset stands for on this base: steps, learning rate, batch, accumulation."""
    chosen = capped(preset_for(preset or DEFAULT_PRESET, native_side(registry, base)))
    return chosen.max_steps, f"{chosen.learning_rate:g}", chosen.batch_size, chosen.gradient_accumulation_steps


def capped(preset: Preset) -> Preset:
    """The host's step limit (``RAPID_DIFFUSION_FINETUNE_MAX_STEPS``) applies to presets too."""
    limit = settings().finetune_max_steps
    return replace(preset, max_steps=min(preset.max_steps, limit)) if limit else preset


def duration_markdown(registry, base: str | None, preset: str) -> str:
    """How long the preset takes here, from the measured per-step time, or when it will be known."""
    side = native_side(registry, base)
    chosen = capped(preset_for(preset or DEFAULT_PRESET, side))
    seconds = estimate_seconds(chosen, side, device_kind(registry))
    if seconds is None:
        return (f"{chosen.max_steps} 步；开始后几步内显示剩余时间 / {chosen.max_steps} steps; "
                "the time left shows after the first steps")
    return f"预计用时约 {format_seconds(seconds)}（本机实测）/ about {format_seconds(seconds)} on this machine (measured)"


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


def config_from_form(form: Form) -> TrainConfig:
    """A TrainConfig (data and output filled in by the job manager); raises TrainingError in Chinese first."""
    problem = name_problem(form.name or "")
    if problem:
        raise TrainingError(problem)
    try:
        learning_rate = float(form.learning_rate)
    except (TypeError, ValueError):
        raise TrainingError(f"学习率应是一个数，例如 1e-5 / the learning rate must be a number such as 1e-5: {form.learning_rate!r}") from None
    steps = int(form.steps or 0)
    limit = settings().finetune_max_steps
    if limit and steps > limit:
        raise TrainingError(f"本服务器每次最多训练 {limit} 步 / this server allows at most {limit} steps per job")
    config = TrainConfig(
        base=form.base or "", data=Path("."), output=Path("."), name=form.name.strip(),
        max_steps=steps, learning_rate=learning_rate,
        batch_size=int(form.batch_size or 1), gradient_accumulation_steps=int(form.accumulation or 1),
        resolution=int(form.resolution or 0) or None, train_text_encoder=bool(form.train_text_encoder),
        mixed_precision=form.mixed_precision or "no", gradient_checkpointing=bool(form.gradient_checkpointing),
        use_ema=bool(form.use_ema), seed=int(form.seed or 0),
        validation_prompts=[form.prompt.strip()] if form.prompt and form.prompt.strip() else [],
        validation_every=cadence(steps), checkpoint_every=cadence(steps),
    )
    config.validate()
    return config


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class StartOutcome:
    job_id: str | None
    message: str


def start_job(jobs: JobManager, files, rows, form: Form, password: str | None = None, allowed_bases=None) -> StartOutcome:
    """Check access, the name, the settings and the data, then start training in a new job folder.

    ``allowed_bases`` (the UI passes the domain ids) keeps a browser from naming arbitrary folders.
    """
    problem = access_problem(password)
    if problem:
        return StartOutcome(None, problem)
    if allowed_bases is not None and form.base not in allowed_bases:
        return StartOutcome(None, f"未知的基础模型 / unknown base model {form.base!r}")
    try:
        config = config_from_form(form)
    except TrainingError as exc:
        return StartOutcome(None, str(exc))
    if jobs.active() is not None:
        return StartOutcome(None, "已有训练任务在运行，请等待或停止它 / a job is already training")
    too_big = job_budget_problem(files)
    if too_big:
        return StartOutcome(None, too_big)
    report = check_rows(files, rows)
    if not report.usable:
        return StartOutcome(None, "没有可用的图文对：请上传图片和描述 / no usable image-text pairs: upload images with captions\n\n" + report_markdown(report))
    folder = jobs.new_job_folder()
    write_pairs_folder(report.pairs, folder / "data")
    try:
        job = jobs.start(config, folder / "data", folder=folder)
    except JobBusyError as exc:
        return StartOutcome(None, str(exc))
    return StartOutcome(job.id, f"已开始训练「{config.name}」/ started training '{config.name}'\n\n{report_markdown(report)}")


def stop_job(jobs: JobManager, job_id: str | None, password: str | None = None) -> str:
    problem = access_problem(password)
    if problem:
        return problem
    job = _job_or_latest(jobs, job_id)
    if job is None or not job.is_alive():
        return "没有正在运行的任务 / no job is running"
    job.stop(grace_seconds=0)
    return "正在保存当前模型并停止… / saving the model so far, then stopping…"


def resume_job(jobs: JobManager, job_id: str | None, password: str | None = None) -> StartOutcome:
    """继续训练: a stopped or failed job continues from its last complete checkpoint."""
    problem = access_problem(password)
    if problem:
        return StartOutcome(None, problem)
    job = _job_or_latest(jobs, job_id)
    if job is None or job.status().get("state") not in ("stopped", "failed"):
        return StartOutcome(None, "没有可继续的任务（只能继续已停止或失败的任务）/ nothing to resume (only a stopped or failed job)")
    try:
        job = jobs.resume(job.id)
    except (JobBusyError, KeyError) as exc:
        return StartOutcome(None, str(exc))
    return StartOutcome(job.id, "正在从最近的检查点继续训练… / resuming from the last checkpoint…")


def delete_model(jobs: JobManager, domain_id: str | None, password: str | None = None) -> str:
    problem = access_problem(password)
    if problem:
        return problem
    if not domain_id:
        return "请先选择要删除的模型 / pick a model to delete first"
    try:
        return delete_finetuned(domain_id, jobs)
    except DeleteRefused as exc:
        return str(exc)


def finetuned_choices(registry) -> list[tuple[str, str]]:
    """The fine-tuned models (user domains) by their display names."""
    from .domains import user_domains_dir

    return [
        (spec.title_zh, spec.id) for spec in registry.domains.values()
        if spec.source_file is not None and spec.source_file.parent == user_domains_dir()
    ]


# ----------------------------------------------------------------------------- watching a job


@dataclass(frozen=True)
class JobView:
    job_id: str | None
    status_markdown: str
    progress_html: str
    loss_plot: dict
    samples: list[tuple[str, str]]
    comparison: list[tuple[str, str]]
    new_domain: str | None
    revision: str | None = None  # changes whenever the job's files do


EMPTY_VIEW_TEXT = "还没有训练任务 / no training job yet"


def view_job(jobs: JobManager, job_id: str | None) -> JobView:
    """Everything the tab shows about a job (the given one, else the newest), read from disk."""
    job = _job_or_latest(jobs, job_id)
    if job is None:
        return JobView(None, EMPTY_VIEW_TEXT, "", loss_plot_value([], []), [], [], None)
    status = job.status()
    state = status.get("state", "starting")
    config = job.config()
    name = (config.name if config and config.name else None) or status.get("name") or "微调模型 / fine-tuned model"
    head = f"**{name}** · {STATE_NAMES.get(state, state)}"
    text = "\n\n".join(filter(None, [head, status.get("message") or "", status.get("data")]))
    samples = [
        (str(p), f"第 {int(folder.name.split('-')[-1])} 步 / step {int(folder.name.split('-')[-1])}")
        for folder in job.sample_folders() for p in sorted(folder.glob("*.png"))
    ]
    finished = state in ("done", "stopped")
    return JobView(
        job.id,
        text,
        progress_html(status),
        loss_plot_value(job.losses(), job.validation_losses()),
        samples[-12:],
        comparison_gallery(job, status) if finished else [],
        status.get("domain_id") if finished else None,
        f"{job.id}:{status.get('updated_at')}:{state}",
    )


def comparison_gallery(job, status: dict) -> list[tuple[str, str]]:
    """Before / after for each validation prompt, side by side (pairs in a four-column gallery), same seed."""
    before, after = job.before_after()
    prompts = status.get("validation_prompts") or []
    seed = status.get("validation_seed", 0)
    items = []
    for i, (b, a) in enumerate(zip(before, after)):
        prompt = prompts[i] if i < len(prompts) else ""
        items.append((str(b), f"微调前 / before · {prompt} · 种子 / seed {seed}"))
        items.append((str(a), f"微调后 / after · {prompt} · 种子 / seed {seed}"))
    return items


STATE_NAMES = {
    "starting": "启动中 / starting",
    "preparing": "准备中 / preparing",
    "checking": "检查数据 / checking data",
    "running": "训练中 / training",
    "saving": "保存中 / saving",
    "done": "完成 / done",
    "stopped": "已提前停止（模型可用）/ stopped early (model usable)",
    "failed": "失败 / failed",
}


def progress_html(status: dict) -> str:
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    if not total:
        return ""
    left = status.get("eta_seconds")
    left_text = f" · 剩余约 {format_seconds(left)} / about {format_seconds(left)} left" if left is not None and status.get("state") in ACTIVE_STATES else ""
    return (
        f'<progress value="{step}" max="{total}" style="width:100%"></progress>'
        f"<div>{step}/{total} 步 / steps{left_text}</div>"
    )


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} 小时 {minutes} 分 / {hours} h {minutes} min"
    return f"{minutes} 分 {secs} 秒 / {minutes} min {secs} s" if minutes else f"{secs} 秒 / {secs} s"


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential smoothing with debiasing: the raw per-step loss is noise."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def loss_plot_value(losses: list[dict], validation: list[dict]) -> dict:
    """``gr.LinePlot``'s own wire format (columns + rows): smoothed training loss and validation loss."""
    train_rows = [[row["step"], value, TRAIN_SERIES] for row, value in zip(losses, smoothed([r["loss"] for r in losses]))]
    validation_rows = [[row["step"], row["loss"], VALIDATION_SERIES] for row in validation]
    step, loss, series = PLOT_COLUMNS
    return {
        "columns": list(PLOT_COLUMNS),
        "data": train_rows + validation_rows,
        "datatypes": {step: "quantitative", loss: "quantitative", series: "nominal"},
        "mark": "line",
    }


def drawable(plot: dict) -> dict | None:
    """The plot once training losses exist, else nothing: Gradio's LinePlot never draws the lines of
    a coloured plot whose first value had no rows (nor one whose first rows had only one curve)."""
    return plot if any(row[2] == TRAIN_SERIES for row in plot["data"]) else None


def _job_or_latest(jobs: JobManager, job_id: str | None):
    if job_id:
        try:
            return jobs.job(job_id)
        except KeyError:
            return None
    return jobs.latest()


# ----------------------------------------------------------------------------- layout


def build_finetune_tab(registry, jobs: JobManager | None = None) -> dict:
    """Lay out the tab in the current Blocks context; returns its main components by name.

    ``new_domain`` (a hidden textbox) changes when a model is added or deleted; ``ui.py`` listens
    to it to refresh the Generate tab's domain picker.
    """
    import gradio as gr

    if not settings().finetune_allowed:
        gr.Markdown(FINETUNE_OFF)
        return {}
    jobs = jobs or JobManager()
    schema = defaults()
    choices = [(spec.title, domain_id) for domain_id, spec in registry.domains.items()]
    first_base = "demo" if "demo" in registry.domains else (choices[0][1] if choices else None)
    steps0, lr0, batch0, accumulation0 = preset_fields(registry, first_base, DEFAULT_PRESET)

    gr.Markdown(
        "上传图片和描述（或一个 zip），给新模型起个名字，点击「开始训练」。训练在后台进行，刷新页面不会中断；"
        "完成后新模型出现在「生成」的领域列表里。\n\n"
        "Upload pictures with captions (or a zip), name the new model, press Start. Training runs in the "
        "background; when it is done the new model appears in the Generate tab's list."
    )
    job_id = gr.State(None)
    with gr.Row():
        with gr.Column():
            uploads = gr.File(
                label="图片（可附同名 .txt 描述）、zip 或 TSV / images (+ same-name .txt captions), a zip or a TSV",
                file_count="multiple",
                type="filepath",
            )
            captions = gr.Dataframe(
                headers=["文件 / file", "描述 / caption"],
                datatype=["str", "str"],
                column_count=2,
                static_columns=[0],
                type="array",
                interactive=True,
                label="描述编辑 / caption editor",
            )
            check_button = gr.Button("检查数据 / Check data")
            report = gr.Markdown()
        with gr.Column():
            name = gr.Textbox(value="我的模型", label="新模型的名字 / name of the new model", max_length=40)
            base = gr.Dropdown(choices=choices, value=first_base, label="基础模型 / base model")
            preset = gr.Radio(
                [(label, key) for key, label in PRESET_LABELS.items()], value=DEFAULT_PRESET,
                label="训练强度 / how much training",
            )
            duration = gr.Markdown(duration_markdown(registry, first_base, DEFAULT_PRESET))
            prompt = gr.Textbox(
                label="对比用提示词（可不填：默认用几对留出的图片的描述）/ prompt for the before/after comparison "
                      "(optional: captions of a few held-out pairs by default)",
            )
            with gr.Accordion("高级设置 / Advanced", open=False):
                steps = gr.Slider(10, 10000, value=steps0, step=10, label="训练步数 / training steps")
                learning_rate = gr.Dropdown(LEARNING_RATES, value=lr0, allow_custom_value=True,
                                            label="学习率（越大学得越快，也越容易学坏）/ learning rate")
                batch_size = gr.Slider(1, 16, value=batch0, step=1, label="每步图片数 / pictures per step")
                accumulation = gr.Slider(1, 16, value=accumulation0, step=1, label="累积几次再更新 / passes per update")
                resolution = gr.Number(value=schema["resolution"] or 0, precision=0, label="分辨率（0 = 模型原生）/ resolution (0 = native)")
                train_text_encoder = gr.Checkbox(value=schema["train_text_encoder"], label="也训练文字理解部分 / also train the text understanding")
                mixed_precision = gr.Dropdown(PRECISION_CHOICES, value=schema["mixed_precision"], label="精度 / precision")
                checkpointing = gr.Checkbox(value=schema["gradient_checkpointing"], label="省显存（更慢）/ save memory (slower)")
                ema = gr.Checkbox(value=schema["use_ema"], label="权重平均（结果更平稳）/ weight averaging (smoother result)")
                seed = gr.Number(value=schema["seed"], precision=0, label="随机种子 / seed")
            password = gr.Textbox(type="password", label="微调密码 / fine-tune password", visible=settings().password is not None)
            with gr.Row():
                start_button = gr.Button("开始训练 / Start", variant="primary")
                stop_button = gr.Button("停止并保存 / Stop & save", variant="stop")
                resume_button = gr.Button("继续训练 / Resume")
    status = gr.Markdown()
    progress = gr.HTML()
    loss_plot = gr.LinePlot(x=PLOT_COLUMNS[0], y=PLOT_COLUMNS[1], color=PLOT_COLUMNS[2], title="损失（越低越好）/ loss (lower is better)",
                            x_title=STEP_AXIS, y_title=LOSS_AXIS, color_title=SERIES)
    samples = gr.Gallery(label="训练中的样图（固定种子）/ samples while training (fixed seed)", columns=6, height=240, object_fit="contain")
    comparison = gr.Gallery(label="同一种子：微调前 / 微调后，两两并排 · same seed: before / after, side by side",
                            columns=4, height=360, object_fit="contain", elem_id="before-after")
    with gr.Row():
        mine = gr.Dropdown(finetuned_choices(registry), value=None, label="我的微调模型 / my fine-tuned models", scale=3)
        delete_button = gr.Button("删除模型 / Delete model", variant="stop", scale=1)
    new_domain = gr.Textbox(visible="hidden")  # rendered (so its change event fires), never shown

    form_inputs = [name, base, steps, learning_rate, batch_size, accumulation, resolution, train_text_encoder,
                   mixed_precision, checkpointing, ema, seed, prompt]

    def on_check(files, rows, pw):
        return access_problem(pw) or report_markdown(check_rows(files, rows))

    def on_start(files, rows, pw, *values):
        outcome = start_job(jobs, files, rows, Form(*values), pw, allowed_bases=set(registry.domains))
        return outcome.job_id, outcome.message

    def on_resume(current, pw):
        outcome = resume_job(jobs, current, pw)
        return outcome.job_id or current, outcome.message

    def on_poll(current, pw, known, seen):
        if access_problem(pw):
            return None, "", "", None, [], [], gr.skip(), None
        view = view_job(jobs, current)
        if view.new_domain and view.new_domain not in registry.domains:
            registry.reload_domains()
        unchanged = view.revision == seen  # re-sending an unchanged plot restarts its drawing every tick
        heavy = (gr.skip(),) * 3 if unchanged else (drawable(view.loss_plot), view.samples, view.comparison)
        domain = view.new_domain if view.new_domain and view.new_domain != known else gr.skip()
        return (view.job_id, view.status_markdown, view.progress_html, *heavy, domain, view.revision)

    def on_delete(domain_id, pw):
        message = delete_model(jobs, domain_id, pw)
        registry.reload_domains()
        return message, f"deleted:{domain_id}"

    def on_preset(base_id, preset_key):
        return (*preset_fields(registry, base_id, preset_key), duration_markdown(registry, base_id, preset_key))

    def refresh_lists(current_base):
        bases = [(spec.title, domain_id) for domain_id, spec in registry.domains.items()]
        keep = current_base if current_base in registry.domains else first_base
        return gr.update(choices=bases, value=keep), gr.update(choices=finetuned_choices(registry), value=None)

    private = dict(api_visibility="private")
    uploads.change(caption_rows, inputs=uploads, outputs=captions, **private)
    check_button.click(on_check, inputs=[uploads, captions, password], outputs=report, **private)
    for trigger in (base.change, preset.change):
        trigger(on_preset, inputs=[base, preset], outputs=[steps, learning_rate, batch_size, accumulation, duration], **private)
    start_button.click(on_start, inputs=[uploads, captions, password, *form_inputs], outputs=[job_id, report], **private)
    stop_button.click(lambda current, pw: stop_job(jobs, current, pw), inputs=[job_id, password], outputs=status, **private)
    resume_button.click(on_resume, inputs=[job_id, password], outputs=[job_id, report], **private)
    delete_button.click(on_delete, inputs=[mine, password], outputs=[status, new_domain], **private)
    new_domain.change(refresh_lists, inputs=base, outputs=[base, mine], **private)
    timer = gr.Timer(POLL_SECONDS)
    seen = gr.State(None)
    poll_outputs = [job_id, status, progress, loss_plot, samples, comparison, new_domain, seen]
    timer.tick(on_poll, inputs=[job_id, password, new_domain, seen], outputs=poll_outputs, show_progress="hidden", **private)
    return {"new_domain": new_domain, "status": status, "loss_plot": loss_plot, "timer": timer, "job_id": job_id}
