"""The "微调 / Fine-tune" tab: upload pairs, check them, start/stop a job, watch it, compare.

``build_finetune_tab(registry, jobs)`` is called inside a ``gr.Tab`` context by ``ui.py``.
All job state lives on disk (:mod:`rapid_diffusion.jobs`); the tab polls it every two seconds,
so a browser refresh shows the running job again. The handlers below are plain functions of
plain values, testable without a browser.

Public hosts: ``RAPID_DIFFUSION_FINETUNE=off`` replaces the tab by a notice;
``RAPID_DIFFUSION_FINETUNE_PASSWORD`` requires that password to start or stop a job.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from .data import IMAGE_SUFFIXES, DataReport, check_uploads, write_pairs_folder
from .jobs import ACTIVE_STATES, JobBusyError, JobManager, JobSettings
from .settings import settings

POLL_SECONDS = 2.0
PLOT_COLUMNS = ["step", "loss"]


def finetune_enabled() -> bool:
    return settings().finetune


def password_ok(given: str | None) -> bool:
    expected = settings().password
    return not expected or hmac.compare_digest((given or "").encode(), expected.encode())


# ----------------------------------------------------------------------------- handlers


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


@dataclass(frozen=True)
class StartOutcome:
    job_id: str | None
    message: str


def start_job(
    jobs: JobManager, files, rows, settings: JobSettings, password: str | None = None, allowed_bases=None
) -> StartOutcome:
    """Check the data, write the usable pairs into a new job folder, and start training.

    ``allowed_bases`` (the UI passes the domain ids) keeps a browser from naming arbitrary folders.
    """
    if not password_ok(password):
        return StartOutcome(None, "密码错误 / wrong password")
    if allowed_bases is not None and settings.base not in allowed_bases:
        return StartOutcome(None, f"未知的基础模型 / unknown base model {settings.base!r}")
    if jobs.active() is not None:
        return StartOutcome(None, f"已有训练任务在运行 / job {jobs.active().id} is already training")
    report = check_rows(files, rows)
    if not report.usable:
        return StartOutcome(None, "没有可用的图文对 / no usable image-text pairs\n\n" + report_markdown(report))
    folder = jobs.new_job_folder()
    write_pairs_folder(report.pairs, folder / "data")
    try:
        job = jobs.start(settings, folder / "data", folder=folder)
    except JobBusyError as exc:
        return StartOutcome(None, str(exc))
    return StartOutcome(job.id, f"已开始训练任务 {job.id} / started job {job.id}\n\n{report_markdown(report)}")


def stop_job(jobs: JobManager, job_id: str | None, password: str | None = None) -> str:
    if not password_ok(password):
        return "密码错误 / wrong password"
    job = _job_or_latest(jobs, job_id)
    if job is None or not job.is_alive():
        return "没有正在运行的任务 / no job is running"
    job.stop(grace_seconds=0)
    return "正在保存检查点并停止… / saving a checkpoint, then stopping…"


@dataclass(frozen=True)
class JobView:
    job_id: str | None
    status_markdown: str
    progress_html: str
    loss_plot: dict
    samples: list[tuple[str, str]]
    comparison: list[tuple[str, str]]
    new_domain: str | None


def view_job(jobs: JobManager, job_id: str | None) -> JobView:
    """Everything the tab shows about a job (the given one, else the newest), read from disk."""
    job = _job_or_latest(jobs, job_id)
    if job is None:
        return JobView(None, "还没有训练任务 / no training job yet", "", loss_plot_value([]), [], [], None)
    status = job.status()
    state = status.get("state", "starting")
    message = status.get("message") or ""
    head = f"**任务 / job {job.id}** · {STATE_NAMES.get(state, state)}"
    text = "\n\n".join(filter(None, [head, message, status.get("preflight"), status.get("data")]))
    samples = [(str(p), f"step {int(folder.name.split('-')[-1])} · #{p.stem}") for folder in job.sample_folders() for p in sorted(folder.glob("*.png"))]
    before, after = job.before_after() if state == "done" else ([], [])
    comparison = [(str(p), "微调前 / before") for p in before] + [(str(p), "微调后 / after") for p in after]
    return JobView(
        job.id,
        text,
        progress_html(status),
        loss_plot_value(job.losses()),
        samples[-12:],
        comparison,
        status.get("domain_id") if state == "done" else None,
    )


STATE_NAMES = {
    "starting": "启动中 / starting",
    "preparing": "准备中 / preparing",
    "checking": "检查数据 / checking data",
    "running": "训练中 / training",
    "saving": "保存中 / saving",
    "done": "完成 / done",
    "stopped": "已停止 / stopped",
    "failed": "失败 / failed",
}


def progress_html(status: dict) -> str:
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    if not total:
        return ""
    eta = status.get("eta_seconds")
    eta_text = f" · ETA {format_seconds(eta)}" if eta is not None and status.get("state") in ACTIVE_STATES else ""
    loss = status.get("loss")
    loss_text = f" · loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    return (
        f'<progress value="{step}" max="{total}" style="width:100%"></progress>'
        f"<div>{step}/{total} 步 / steps{eta_text}{loss_text}</div>"
    )


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def loss_plot_value(losses: list[dict]) -> dict:
    """``gr.LinePlot``'s own wire format (columns + rows), so no pandas DataFrame is built."""
    return {
        "columns": PLOT_COLUMNS,
        "data": [[row["step"], row["loss"]] for row in losses],
        "datatypes": {"step": "quantitative", "loss": "quantitative"},
        "mark": "line",
    }


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

    ``new_domain`` (a hidden textbox) changes to the new domain's id when a job finishes;
    ``ui.py`` can listen to it to refresh the Generate tab's domain picker.
    """
    import gradio as gr

    if not finetune_enabled():
        gr.Markdown("本服务器已关闭微调 / Fine-tuning is switched off on this server (RAPID_DIFFUSION_FINETUNE=off).")
        return {}
    jobs = jobs or JobManager()
    needs_password = settings().password is not None
    choices = [(spec.title, domain_id) for domain_id, spec in registry.domains.items()]

    gr.Markdown(
        "上传图文对，检查后开始全参数微调（UNet + 文本编码器，无 LoRA）。训练在后台进行，刷新页面不会中断。\n\n"
        "Upload image-text pairs, check them, then run a full fine-tune (UNet + text encoder, no LoRA). "
        "Training runs in the background; refreshing the page does not stop it."
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
            base = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label="基础模型 / base model")
            steps = gr.Slider(10, 5000, value=200, step=10, label="训练步数 / training steps")
            learning_rate = gr.Number(value=1e-5, label="学习率 / learning rate")
            prompt = gr.Textbox(label="验证提示词（前后对比用）/ validation prompt (for the before/after comparison)")
            with gr.Accordion("高级设置 / Advanced", open=False):
                batch_size = gr.Slider(1, 16, value=1, step=1, label="批大小 / batch size")
                accumulation = gr.Slider(1, 16, value=1, step=1, label="梯度累积 / gradient accumulation")
                resolution = gr.Number(value=0, precision=0, label="分辨率（0 = 模型原生）/ resolution (0 = native)")
                train_text_encoder = gr.Checkbox(value=True, label="训练文本编码器 / train the text encoder")
                mixed_precision = gr.Dropdown(["no", "bf16", "fp16"], value="no", label="混合精度 / mixed precision")
                checkpointing = gr.Checkbox(value=False, label="梯度检查点 / gradient checkpointing")
                ema = gr.Checkbox(value=False, label="EMA")
                seed = gr.Number(value=0, precision=0, label="随机种子 / seed")
                domain_id = gr.Textbox(label="新领域 id（可选）/ new domain id (optional)")
            password = gr.Textbox(type="password", label="密码 / password", visible=needs_password)
            with gr.Row():
                start_button = gr.Button("开始训练 / Start", variant="primary")
                stop_button = gr.Button("停止 / Stop", variant="stop")
    status = gr.Markdown()
    progress = gr.HTML()
    loss_plot = gr.LinePlot(x="step", y="loss", title="损失 / loss", x_title="step", y_title="loss")
    samples = gr.Gallery(label="验证图（固定种子）/ validation samples (fixed seed)", columns=6, height="auto")
    comparison = gr.Gallery(label="同一种子：微调前 / 后 · same seed: before / after", columns=4, height="auto")
    new_domain = gr.Textbox(visible=False)

    def on_check(files, rows):
        return report_markdown(check_rows(files, rows))

    def on_start(files, rows, base_id, n_steps, lr, text, bs, acc, res, te, mp, ckpt, use_ema, seed_value, new_id, pw):
        settings = JobSettings(
            base=base_id,
            max_steps=int(n_steps),
            learning_rate=float(lr),
            batch_size=int(bs),
            gradient_accumulation_steps=int(acc),
            resolution=int(res or 0) or None,
            train_text_encoder=bool(te),
            mixed_precision=mp,
            gradient_checkpointing=bool(ckpt),
            use_ema=bool(use_ema),
            seed=int(seed_value or 0),
            validation_prompts=(text.strip(),) if text and text.strip() else (),
            validation_every=max(10, int(n_steps) // 5),
            domain_id=(new_id or "").strip() or None,
        )
        outcome = start_job(jobs, files, rows, settings, pw, allowed_bases=set(registry.domains))
        return outcome.job_id, outcome.message

    def on_poll(current):
        view = view_job(jobs, current)
        if view.new_domain and view.new_domain not in registry.domains:
            registry.reload_domains()
        return view.job_id, view.status_markdown, view.progress_html, view.loss_plot, view.samples, view.comparison, view.new_domain or ""

    uploads.change(lambda files: caption_rows(files), inputs=uploads, outputs=captions)
    check_button.click(on_check, inputs=[uploads, captions], outputs=report)
    start_button.click(
        on_start,
        inputs=[uploads, captions, base, steps, learning_rate, prompt, batch_size, accumulation, resolution,
                train_text_encoder, mixed_precision, checkpointing, ema, seed, domain_id, password],
        outputs=[job_id, report],
    )
    stop_button.click(lambda current, pw: stop_job(jobs, current, pw), inputs=[job_id, password], outputs=status)
    timer = gr.Timer(POLL_SECONDS)
    poll_outputs = [job_id, status, progress, loss_plot, samples, comparison, new_domain]
    timer.tick(on_poll, inputs=job_id, outputs=poll_outputs, show_progress="hidden")
    return {"new_domain": new_domain, "status": status, "loss_plot": loss_plot, "timer": timer, "job_id": job_id}
