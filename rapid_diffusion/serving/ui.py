"""Gradio Blocks web UI: Generate, Models and Fine-tune tabs, plus the named ``/generate`` API.

A thin face over :class:`rapid_diffusion.service.app.AppService`: each event converts widgets to
one service call, shows the result, and turns the service's errors into one curated sentence
(``gr.Error``). It validates nothing itself.
Images are served as the PNG files ``GenerationResult.png_bytes`` writes, settings embedded.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr
import torch

from ..domains import OPTIMIZATION_LEVELS, DomainSpec
from ..messages import say
from ..generation.pipeline import GenerationCancelled, GenerationResult
from ..generation.preview import PreviewCallback
from ..service.inputs import request_from_inputs
from ..generation.samplers import SAMPLER_LABELS
from ..service.app import AppService, UserFacingError
from .models_ui import build_models_tab
from .named_api import build_named_api
from .ui_common import GPU_GROUP, STATE_LABELS, acceleration_label, generate_on_gpu, level_label, save_pngs, spec_or_error
from ..settings import settings

log = logging.getLogger(__name__)

# Each widget's label, and the name a refusal of its value uses (Chinese, English).
LABELS = {
    "prompt": ("提示词", "Prompt"),
    "negative_prompt": ("反向提示词", "Negative prompt"),
    "num_inference_steps": ("步数", "Steps"),
    "guidance_scale": ("引导系数", "Guidance scale"),
    "seed": ("种子", "Seed"),
    "num_images": ("图片数量", "Images per run"),
    "height": ("尺寸", "Size"),
    "width": ("尺寸", "Size"),
    "sampler": ("采样器", "Sampler"),
    "super_resolution": ("超分辨率 x4", "Super-resolution"),
}


def label(field_name: str, note: str = "") -> str:
    zh, en = LABELS[field_name]
    return f"{zh} / {en}{note}"


COMMON_SIZES = ("512x512", "512x768", "768x512", "768x768", "256x256")

class StopFlags:
    """One stop flag per browser session: the Stop button sets it, the denoising loop reads it."""

    def __init__(self):
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            self._flags[session] = threading.Event()
            return self._flags[session]

    def stop(self, session: str) -> None:
        with self._lock:
            flag = self._flags.get(session)
        if flag is not None:
            flag.set()

    def finish(self, session: str, flag: threading.Event) -> None:
        with self._lock:
            if self._flags.get(session) is flag:
                del self._flags[session]


@dataclass
class UiContext:
    service: AppService
    stop_flags: StopFlags = field(default_factory=StopFlags)

    def spec(self, domain_id: str | None) -> DomainSpec:
        return spec_or_error(self.service, domain_id)


def build_ui(service: AppService | None = None) -> gr.Blocks:
    """The whole app: nothing is loaded here; models load on first use."""
    ctx = UiContext(service or AppService())
    with gr.Blocks(title="Rapid Diffusion 中文文图生成", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# Rapid Diffusion · 领域中文文图生成\n"
            "Fast domain-specific Chinese text-to-image (PAI-Diffusion models). "
            "选择领域，输入中文提示词，点击「生成」。 / Pick a domain, type a Chinese prompt, press Generate."
        )
        # "wrap": on a phone the third tab goes to a second row instead of hiding behind "⋯".
        with gr.Tabs(overflow_behavior="wrap"):
            with gr.Tab("文生图 / Text to image"):
                domain = build_generate_tab(ctx)
            with gr.Tab("模型 / Models") as models_tab:
                models = build_models_tab(ctx.service, demo, models_tab)
            with gr.Tab("微调 / Fine-tune"):
                finetune = build_finetune(ctx)
        build_named_api(ctx.service)
        refresh_picker = [lambda d: domain_picker_update(ctx, d if d in ctx.service.domains else None), domain, domain]
        demo.load(*refresh_picker, api_visibility="private")
        for changed in filter(None, [finetune.get("new_domain"), models.get("changed")]):
            changed.change(*refresh_picker, api_visibility="private")
        if "picker" in models and "new_domain" in finetune:
            finetune["new_domain"].change(lambda m: gr.update(choices=ctx.service.models.choices(), value=m),
                                          models["picker"], models["picker"], api_visibility="private")
        if "mine" in finetune:  # the fine-tuned models as they are now: at page load, and after the Models tab changed one
            for trigger in filter(None, [demo.load, models.get("changed") and models["changed"].change]):
                trigger(lambda: gr.update(choices=ctx.service.finetune.finetuned_choices(), value=None), None, finetune["mine"],
                        api_visibility="private")
    return demo


CSS = """
/* The gallery grows with its images: four or eight show whole, not cut off behind a scrollbar. */
#gallery .grid-wrap { max-height: none; height: auto; }
/* Gradio 6.31's page drops an error's title (gr.Error(title=...)) and always shows "Error": say it Chinese first. */
span.toast-title.error { font-size: 0; }
span.toast-title.error::before { content: "出错了 / Error"; font-size: var(--text-lg); }
"""
# Gradio's status tracker announces "common.complete" to screen readers, a key none of its locales defines.
I18N = gr.I18n(en={"common.complete": "Complete"}, **{"zh-CN": {"common.complete": "完成"}, "zh": {"common.complete": "完成"}})


def build_generate_tab(ctx: UiContext) -> gr.Dropdown:
    initial = ctx.service.default_domain()
    spec = ctx.service.spec(initial) if initial else None
    with gr.Row():
        with gr.Column(scale=5):
            domain = gr.Dropdown(domain_choices(ctx.service), value=initial, label="领域 / Domain")
            domain_info = gr.Markdown(domain_markdown(ctx.service, spec) if spec else "没有领域 / No domains configured", elem_id="domain-card")
            prompt = gr.Textbox(label=label("prompt"), lines=3, placeholder=placeholder(spec), elem_id="prompt")
            token_info = gr.Markdown(elem_id="token-info")
            examples = gr.Dropdown(list(spec.examples) if spec else [], value=None, label="示例提示词 / Example prompts")
            negative = gr.Textbox(label=label("negative_prompt"), value=spec.negative_prompt if spec else "", lines=2)
            with gr.Row():
                generate_btn = gr.Button(
                    "生成 / Generate", variant="primary", elem_id="generate", interactive=usable(ctx.service, spec)
                )
                stop_btn = gr.Button("停止 / Stop", variant="stop", elem_id="stop")
            with gr.Accordion("参数 / Settings", open=True):
                with gr.Row():
                    steps = gr.Slider(1, 150, value=spec.num_inference_steps if spec else 20, step=1, label=label("num_inference_steps"))
                    guidance = gr.Slider(0, 30, value=spec.guidance_scale if spec else 7.5, step=0.5, label=label("guidance_scale"))
                with gr.Row():
                    # No precision: Gradio would round 1.5 to 2 silently; the core refuses non-integers.
                    seed = gr.Number(value=-1, label=label("seed", " (-1 = 随机 random)"), scale=3, elem_id="seed")
                    random_seed_btn = gr.Button("随机 / Random", scale=1)
                    reuse_seed_btn = gr.Button("复用种子 / Reuse seed", scale=1)
                with gr.Row():
                    num_images = gr.Slider(1, 8, value=1, step=1, label=label("num_images"), scale=2)
                    sampler = gr.Dropdown(
                        [(label, name) for name, label in SAMPLER_LABELS.items()],
                        value=spec.sampler if spec else "pndm",
                        label=label("sampler"),
                        scale=3,
                    )
                with gr.Row():
                    size = gr.Dropdown(
                        size_choices(spec), value=size_of(spec), allow_custom_value=True, label=label("height", " (宽x高 WxH)")
                    )
                    super_resolution = gr.Checkbox(value=spec.super_resolution if spec else False, label=label("super_resolution"))
                    optimization = gr.Dropdown(
                        list(OPTIMIZATION_LEVELS),
                        value=spec.optimization if spec else "none",
                        label="加速 / Optimisation (GPU)",
                        visible=torch.cuda.is_available(),
                    )
                live_preview = gr.Checkbox(value=False, label="实时预览 / Live preview", elem_id="live-preview")
        with gr.Column(scale=6):
            gallery = gr.Gallery(label="结果 / Images", columns=2, height="auto", object_fit="contain", format="png", elem_id="gallery")
            timings = gr.Markdown(elem_id="timings")
            details = gr.Textbox(
                label="每张图片的参数 / Settings per image", lines=2, max_lines=8, interactive=False, buttons=["copy"], elem_id="details"
            )
            files = gr.File(label="下载 PNG（含参数）/ Download PNGs (settings embedded)", file_count="multiple", interactive=False)
    last_seeds = gr.State([])
    reuse_seed = gr.State(None)

    defaults = [domain_info, generate_btn, prompt, examples, negative, steps, guidance, sampler, size, super_resolution, optimization]
    domain.change(lambda d: domain_defaults(ctx, d), domain, defaults, api_visibility="private")
    examples.change(lambda e: e or gr.skip(), examples, prompt, api_visibility="private")
    for trigger in (prompt.change, domain.change):
        trigger(
            lambda d, p: token_count_markdown(ctx, d, p),
            [domain, prompt],
            token_info,
            show_progress="hidden",
            trigger_mode="always_last",
            concurrency_limit=None,
            api_visibility="private",
        )
    random_seed_btn.click(lambda: -1, None, seed, api_visibility="private")
    reuse_seed_btn.click(lambda s: gr.skip() if s is None else s, reuse_seed, seed, api_visibility="private")
    gallery.select(select_seed, last_seeds, reuse_seed, api_visibility="private")

    inputs = [domain, prompt, negative, steps, guidance, seed, num_images, sampler, size, super_resolution, optimization, live_preview]
    event = generate_btn.click(
        make_ui_generate(ctx),
        inputs,
        [gallery, timings, details, files, last_seeds, reuse_seed],
        concurrency_id=GPU_GROUP,
        concurrency_limit=ctx.service.gate.slots,
        api_visibility="undocumented",
        api_name="generate_ui",
        show_progress_on=[gallery],
    )
    # The first generation loads the model: the picker and the card then say so, together.
    event.then(
        lambda d: (domain_picker_update(ctx, d), domain_markdown(ctx.service, ctx.spec(d))),
        domain,
        [domain, domain_info],
        show_progress="hidden",
        api_visibility="private",
    )
    stop_btn.click(make_stop(ctx), None, None, cancels=[event], concurrency_limit=None, api_visibility="private")
    return domain


def select_seed(seeds: list[int], evt: gr.SelectData) -> int | None:
    return seeds[evt.index] if seeds and evt.index < len(seeds) else None


def make_stop(ctx: UiContext):
    def stop(request: gr.Request) -> None:
        """Set the flag the denoising loop reads; the toast is shown here, since ``cancels`` ends the event itself."""
        ctx.stop_flags.stop(request.session_hash or "")
        gr.Info(say("stopped"), title=say("stopped_title"))

    return stop


def make_ui_generate(ctx: UiContext):
    def generate_from_ui(
        domain_id: str,
        prompt: str,
        negative_prompt: str,
        num_inference_steps: float,
        guidance_scale: float,
        seed: float | None,
        num_images: float,
        sampler: str,
        size: str,
        super_resolution: bool,
        optimization: str,
        live_preview: bool,
        request: gr.Request,
        progress=gr.Progress(),
    ):
        """A generator: with ``live_preview``, the gallery shows each preview as it comes, then the images."""
        spec = ctx.spec(domain_id)
        gen_request = request_from_inputs(
            prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            seed=seed, num_images=num_images, size=size, sampler=sampler, super_resolution=super_resolution,
        )
        level = optimization if torch.cuda.is_available() else None
        if ctx.service.state(spec) != "loaded":
            progress(0, desc="加载模型（首次使用）/ Loading the model (first use)")
        session = request.session_hash or ""
        flag = ctx.stop_flags.start(session)

        def run(preview):
            return generate_on_gpu(ctx.service, gen_request, spec.id, level, progress_reporter(progress), flag.is_set, preview, LABELS)

        try:
            if live_preview:
                result = yield from stream_previews(run)
            else:
                result = run(None)
        except GenerationCancelled:
            gr.Info(say("stopped"))
            yield (gr.skip(),) * 6
            return
        finally:
            ctx.stop_flags.finish(session, flag)
        paths = save_pngs(result)
        captions = [(str(path), f"种子 seed {s}") for path, s in zip(paths, result.seeds)]
        details = "\n".join(result.summary(i) for i in range(len(result.images)))
        yield captions, timings_markdown(result), details, [str(p) for p in paths], result.seeds, result.seeds[0]

    return generate_from_ui


def stream_previews(run: Callable[[PreviewCallback], GenerationResult]):
    """Run ``run(preview)`` in a worker thread and yield a gallery update per preview; returns the result.

    The denoising loop only puts images on a queue; this generator (Gradio's event) sends them."""
    updates: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = run(lambda step, images: updates.put((step, images)))
        except BaseException as exc:  # re-raised in the event's thread below
            outcome["error"] = exc
        finally:
            updates.put(None)

    # In this event's context: on ZeroGPU, spaces.GPU reads the visitor's request (their quota) from it.
    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), name="generate-with-previews", daemon=True).start()
    while (update := updates.get()) is not None:
        step, images = update
        # the previous run's timings and settings go while this run's previews show
        yield [(image, f"预览 preview · {step}") for image in images], "", "", *(gr.skip(),) * 3
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def progress_reporter(progress: gr.Progress):
    def report(done: int, total: int) -> None:
        progress((done, total), desc="去噪 / Denoising", unit="steps")

    return report


def timings_markdown(result: GenerationResult) -> str:
    """The run's stage timings, after the run's notes (a dropped tail, an English prompt, an SR
    fallback): shown beside the images they concern rather than as toasts over the next run."""
    stages = " · ".join(f"{name} {seconds:.2f}s" for name, seconds in result.timings.items())
    device = f"{result.settings['device']} / {result.settings['dtype']}"
    notes = "".join(f"⚠️ {note}\n\n" for note in result.notes)
    return f"{notes}**耗时 / Timings** ({device}): {stages}"


def size_of(spec: DomainSpec | None) -> str:
    return f"{spec.width}x{spec.height}" if spec else "512x512"


def size_choices(spec: DomainSpec | None) -> list[str]:
    return list(dict.fromkeys([size_of(spec), *COMMON_SIZES]))


def domain_choices(service: AppService) -> list[tuple[str, str]]:
    return [(f"{spec.title} · {STATE_LABELS.get(service.state(spec), '')}", spec.id) for spec in service.domains.values()]


def domain_picker_update(ctx: UiContext, current: str | None):
    return gr.update(choices=domain_choices(ctx.service), value=current or ctx.service.default_domain())


def domain_markdown(service: AppService, spec: DomainSpec) -> str:
    """The domain card: what it is, its model by name (never a server path), and what 生成 will do."""
    availability = service.availability(spec)
    state = STATE_LABELS.get(availability.state, availability.state)
    source = "本机文件 / files on this machine" if spec.model.is_local else f"`{spec.model.name}`"
    card = f"**{spec.title}** — {spec.description}\n\n模型 / Model: {source} · 状态 / State: **{state}**"
    card += acceleration_markdown(service, spec)
    return f"{card}\n\n{'ℹ️' if availability.usable else '⛔'} {availability.note}" if availability.note else card


def acceleration_markdown(service: AppService, spec: DomainSpec) -> str:
    """What the domain runs on once loaded: 编译中 while its optimised pipeline is built, then 已加速."""
    if spec.optimization == "none" or service.state(spec) != "loaded":
        return f" · 加速 / Acceleration: {level_label(spec.optimization)}"
    acceleration = service.registry.acceleration(spec)
    reason = f"（{acceleration.reason}）" if acceleration.state == "failed" and acceleration.reason else ""
    return f" · 加速 / Acceleration: **{acceleration_label(acceleration)}**{reason}"


def usable(service: AppService, spec: DomainSpec | None) -> bool:
    return spec is not None and service.availability(spec).usable


def placeholder(spec: DomainSpec | None) -> str:
    """The domain's first example, so the hint matches what the model was made for."""
    return f"例如 / e.g. {spec.examples[0]}" if spec and spec.examples else ""


def domain_defaults(ctx: UiContext, domain_id: str | None):
    """When the domain changes, show its description and load its defaults into the widgets."""
    if not domain_id:
        return (gr.skip(),) * 11
    spec = ctx.spec(domain_id)
    return (
        domain_markdown(ctx.service, spec),
        gr.update(interactive=usable(ctx.service, spec)),
        gr.update(placeholder=placeholder(spec)),
        gr.update(choices=list(spec.examples), value=None),
        spec.negative_prompt,
        spec.num_inference_steps,
        spec.guidance_scale,
        spec.sampler,
        gr.update(choices=size_choices(spec), value=size_of(spec)),
        spec.super_resolution,
        spec.optimization,
    )


def token_count_markdown(ctx: UiContext, domain_id: str | None, prompt: str | None) -> str:
    """Live token count; warns before the prompt is cut at the encoder's window."""
    if not domain_id or not prompt:
        return ""
    try:
        report = ctx.service.inspect_prompt(domain_id, prompt)
    except UserFacingError:
        return ""
    if report is None:
        return f"{len(prompt)} 字 / characters (模型下载后显示 token 数 / token count after the model is downloaded)"
    count = f"Token: {report.num_tokens} / {report.max_tokens}"
    notes = report.notes()
    return f"⚠️ {count} — {' '.join(notes)}" if notes else count


def build_finetune(ctx: UiContext) -> dict[str, Any]:
    """The Fine-tune tab from ``finetune_ui`` (its ``new_domain`` output refreshes the picker).

    Where fine-tuning is not allowed (off, or a public host without a password) the tab is a
    notice and none of its events exist, so a stranger has nothing to call.
    """
    if not settings().finetune_allowed:
        gr.Markdown(say("finetune_off"), elem_id="finetune-off")
        return {}
    try:
        from .finetune_ui import build_finetune_tab
    except ImportError:
        gr.Markdown("微调界面未安装 / The fine-tuning tab is not available in this build.")
        return {}
    return build_finetune_tab(ctx.service.finetune) or {}
