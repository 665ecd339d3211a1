"""The "微调 / Fine-tune" tab: upload pairs, name the model, pick a preset, start; watch, stop, resume, compare.

``build_finetune_tab(service)`` is called inside a ``gr.Tab`` context by ``ui.py`` with
``AppService.finetune``. The layout is here; every event calls one :class:`FinetuneService` method
(which checks access, the data and the settings) and turns its answer into widget values. The tab
polls the job every two seconds, so a browser refresh shows the running job again. None of the
tab's events is in the public API.
"""

from __future__ import annotations

from PIL import Image

from ..messages import say
from ..service.finetune import FinetuneService, Form, JobView, duration_words
from ..training.options import DEFAULT_PRESET, PRESET_LABELS, PRIOR_LABELS, defaults

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
# Each setting's label by its TrainConfig field, and the name a refusal of its value uses (Chinese, English).
LABELS = {
    "name": ("新模型的名字", "name of the new model"),
    "base": ("基础模型", "base model"),
    "prior_preservation": ("保留原有能力", "keep what the model knew"),
    "validation_prompts": ("对比用提示词", "prompt for the before/after comparison"),
    "max_steps": ("训练步数", "training steps"),
    "learning_rate": ("学习率", "learning rate"),
    "batch_size": ("每步图片数", "pictures per step"),
    "gradient_accumulation_steps": ("累积几次再更新", "passes per update"),
    "resolution": ("分辨率", "resolution"),
    "train_text_encoder": ("也训练文字理解部分", "also train the text understanding"),
    "mixed_precision": ("精度", "precision"),
    "gradient_checkpointing": ("省显存", "save memory"),
    "use_ema": ("权重平均", "weight averaging"),
    "seed": ("随机种子", "seed"),
}


def label(field_name: str, note_zh: str = "", note_en: str = "") -> str:
    """"训练步数 / training steps"; a Chinese note (in full-width brackets) takes the space's place."""
    zh, en = LABELS[field_name]
    return f"{zh}{note_zh or ' '}/ {en}{note_en}"


# ----------------------------------------------------------------------------- a job as widget values


def progress_html(view: JobView) -> str:
    if not view.max_steps:
        return ""
    left = view.eta_seconds
    left_text = "" if left is None else " · " + say("time_left", **dict(zip(("time_zh", "time_en"), duration_words(left))))
    return (
        f'<progress value="{view.step}" max="{view.max_steps}" style="width:100%"></progress>'
        f"<div>{view.step}/{view.max_steps} 步 / steps{left_text}</div>"
    )


def loss_plot_value(view: JobView) -> dict:
    """``gr.LinePlot``'s own wire format (columns + rows): smoothed training loss and validation loss."""
    train_rows = [[step, loss, TRAIN_SERIES] for step, loss in view.training_loss]
    validation_rows = [[step, loss, VALIDATION_SERIES] for step, loss in view.validation_loss]
    step, loss, series = PLOT_COLUMNS
    return {
        "columns": list(PLOT_COLUMNS),
        "data": train_rows + validation_rows,
        "datatypes": {step: "quantitative", loss: "quantitative", series: "nominal"},
        "mark": "line",
    }


def pictures(items: list[tuple[str, str]]) -> list[tuple[Image.Image, str]]:
    """A job's images as pixels, not paths: Gradio then serves copies from its own cache, and
    the job's folder (uploads, weights, logs) never becomes a path a browser can ask for."""
    shown = []
    for path, caption in items:
        with Image.open(path) as image:
            shown.append((image.convert("RGB"), caption))
    return shown


def figures_markdown(view: JobView) -> str:
    """The before/after figures as a list under the comparison."""
    return "\n".join(f"- {line}" for line in view.figures)


def drawable(plot: dict) -> dict | None:
    """The plot once training losses exist, else nothing: Gradio's LinePlot never draws the lines of
    a coloured plot whose first value had no rows (nor one whose first rows had only one curve)."""
    return plot if any(row[2] == TRAIN_SERIES for row in plot["data"]) else None


# ----------------------------------------------------------------------------- layout


def build_finetune_tab(service: FinetuneService) -> dict:
    """Lay out the tab in the current Blocks context; returns its main components by name.

    ``new_domain`` (a hidden textbox) changes when a model is added or deleted; ``ui.py`` listens
    to it to refresh the Generate tab's domain picker.
    """
    import gradio as gr

    off = service.unavailable_reason()
    if off:
        gr.Markdown(off)
        return {}
    schema = defaults()
    first_base = service.default_base()
    steps0, lr0, batch0, accumulation0 = service.preset_fields(first_base, DEFAULT_PRESET)

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
            name = gr.Textbox(value="我的模型", label=label("name"), max_length=40)
            base = gr.Dropdown(choices=service.base_choices(), value=first_base, label=label("base"))
            preset = gr.Radio(
                [(label, key) for key, label in PRESET_LABELS.items()], value=DEFAULT_PRESET,
                label="训练强度 / how much training",
            )
            keep = gr.Dropdown(
                [(label, key) for key, label in PRIOR_LABELS.items()], value=schema["prior_preservation"],
                label=label("prior_preservation"),
                info="训练前先让原模型画一些上传以外的图，一起训练，新模型就不会忘掉原来会画的东西（多花一点时间）/ "
                     "before training, the base model draws pictures outside your upload and trains on them too, "
                     "so the new model does not forget what it could draw (takes a little longer)",
            )
            duration = gr.Markdown(service.duration(first_base, DEFAULT_PRESET, schema["prior_preservation"]))
            prompt = gr.Textbox(
                label=label("validation_prompts", "（可不填：默认用几对留出的图片的描述）",
                            " (optional: captions of a few held-out pairs by default)"),
            )
            with gr.Accordion("高级设置 / Advanced", open=False):
                steps = gr.Slider(10, 10000, value=steps0, step=10, label=label("max_steps"))
                learning_rate = gr.Dropdown(LEARNING_RATES, value=lr0, allow_custom_value=True,
                                            label=label("learning_rate", "（越大学得越快，也越容易学坏）"))
                batch_size = gr.Slider(1, 16, value=batch0, step=1, label=label("batch_size"))
                accumulation = gr.Slider(1, 16, value=accumulation0, step=1, label=label("gradient_accumulation_steps"))
                resolution = gr.Number(value=schema["resolution"] or 0, precision=0, label=label("resolution", "（0 = 模型原生）", " (0 = native)"))
                train_text_encoder = gr.Checkbox(value=schema["train_text_encoder"], label=label("train_text_encoder"))
                mixed_precision = gr.Dropdown(PRECISION_CHOICES, value=schema["mixed_precision"], label=label("mixed_precision"))
                checkpointing = gr.Checkbox(value=schema["gradient_checkpointing"], label=label("gradient_checkpointing", "（更慢）", " (slower)"))
                ema = gr.Checkbox(value=schema["use_ema"], label=label("use_ema", "（结果更平稳）", " (smoother result)"))
                seed = gr.Number(value=schema["seed"], precision=0, label=label("seed"))
            password = gr.Textbox(type="password", label="微调密码 / fine-tune password", visible=service.password_required())
            with gr.Row():
                start_button = gr.Button("开始训练 / Start", variant="primary")
                stop_button = gr.Button("停止并保存 / Stop & save", variant="stop")
                resume_button = gr.Button("继续训练 / Resume")
    status = gr.Markdown()
    progress = gr.HTML()
    loss_plot = gr.LinePlot(x=PLOT_COLUMNS[0], y=PLOT_COLUMNS[1], color=PLOT_COLUMNS[2], title="损失（越低越好）/ loss (lower is better)",
                            x_title=STEP_AXIS, y_title=LOSS_AXIS, color_title=SERIES)
    samples = gr.Gallery(label="训练中的样图（固定种子）/ samples while training (fixed seed)", columns=6, height=240, object_fit="contain")
    comparison = gr.Gallery(label="同一种子：微调前 / 微调后，两两并排（你的留出图片的描述，然后是上传以外的提示词）· "
                                  "same seed: before / after, side by side (your held-out captions, then prompts from outside the upload)",
                            columns=4, height=480, object_fit="contain", elem_id="before-after")
    figures = gr.Markdown(elem_id="comparison-figures")
    with gr.Row():
        mine = gr.Dropdown(service.finetuned_choices(), value=None, label="我的微调模型 / my fine-tuned models", scale=3)
        delete_button = gr.Button("删除模型 / Delete model", variant="stop", scale=1)
    with gr.Row(visible=False, elem_id="finetune-confirm") as confirm_row:  # deleting asks first
        confirm_text = gr.Markdown()
        confirm_button = gr.Button("确认删除 / Yes, delete", variant="stop")
        cancel_button = gr.Button("取消 / Cancel")
    deleted = gr.Markdown(elem_id="finetune-deleted")  # the poll never writes here, so the sentence stays
    new_domain = gr.Textbox(visible="hidden")  # rendered (so its change event fires), never shown

    form_inputs = [name, base, steps, learning_rate, batch_size, accumulation, resolution, train_text_encoder,
                   mixed_precision, checkpointing, ema, seed, prompt, keep]

    def on_check(files, rows, pw):
        return service.check(files, rows, pw)

    def on_start(files, rows, pw, *values):
        outcome = service.start(files, rows, Form(*values), pw, names=LABELS)
        return outcome.job_id, outcome.message

    def on_stop(current, pw):
        return service.stop(current, pw)

    def on_resume(current, pw):
        outcome = service.resume(current, pw)
        return outcome.job_id or current, outcome.message

    def on_poll(current, pw, known, seen):
        view = service.view(current, pw)
        if view is None:
            return None, "", "", None, [], [], "", gr.skip(), None
        unchanged = view.revision == seen  # re-sending an unchanged plot restarts its drawing every tick
        heavy = (gr.skip(),) * 4 if unchanged else (
            drawable(loss_plot_value(view)), pictures(view.samples), pictures(view.comparison), figures_markdown(view))
        domain = view.new_domain if view.new_domain and view.new_domain != known else gr.skip()
        return (view.job_id, view.status_markdown, progress_html(view), *heavy, domain, view.revision)

    def on_ask_delete(domain_id):
        if not domain_id:
            return gr.update(visible=False), "", say("no_model_picked")
        names = dict((model_id, label) for label, model_id in service.finetuned_choices())
        return gr.update(visible=True), f"**{say('confirm_delete', name=names.get(domain_id, domain_id))}**", ""

    def on_delete(domain_id, pw):
        return gr.update(visible=False), service.delete(domain_id, pw), f"deleted:{domain_id}"

    def on_preset(base_id, preset_key, keep_key):
        return (*service.preset_fields(base_id, preset_key), service.duration(base_id, preset_key, keep_key))

    def refresh_lists(current_base):
        bases = service.base_choices()
        keep = current_base if current_base in {domain_id for _, domain_id in bases} else first_base
        return gr.update(choices=bases, value=keep), gr.update(choices=service.finetuned_choices(), value=None)

    private = dict(api_visibility="private")
    uploads.change(service.caption_rows, inputs=uploads, outputs=captions, **private)
    check_button.click(on_check, inputs=[uploads, captions, password], outputs=report, **private)
    for trigger in (base.change, preset.change, keep.change):
        trigger(on_preset, inputs=[base, preset, keep], outputs=[steps, learning_rate, batch_size, accumulation, duration], **private)
    start_button.click(on_start, inputs=[uploads, captions, password, *form_inputs], outputs=[job_id, report], **private)
    stop_button.click(on_stop, inputs=[job_id, password], outputs=status, **private)
    resume_button.click(on_resume, inputs=[job_id, password], outputs=[job_id, report], **private)
    delete_button.click(on_ask_delete, inputs=mine, outputs=[confirm_row, confirm_text, deleted], **private)
    cancel_button.click(lambda: (gr.update(visible=False), ""), outputs=[confirm_row, deleted], **private)
    confirm_button.click(on_delete, inputs=[mine, password], outputs=[confirm_row, deleted, new_domain], **private)
    new_domain.change(refresh_lists, inputs=base, outputs=[base, mine], **private)
    timer = gr.Timer(POLL_SECONDS)
    seen = gr.State(None)
    poll_outputs = [job_id, status, progress, loss_plot, samples, comparison, figures, new_domain, seen]
    timer.tick(on_poll, inputs=[job_id, password, new_domain, seen], outputs=poll_outputs, show_progress="hidden", **private)
    return {"new_domain": new_domain, "status": status, "loss_plot": loss_plot, "timer": timer, "job_id": job_id, "mine": mine}
