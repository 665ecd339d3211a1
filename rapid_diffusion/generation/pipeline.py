"""Request -> images: the one generation path every face (CLI, UI, JSON API) goes through.

``generate`` runs a diffusers ``StableDiffusionPipeline`` in timed stages (text encoder,
UNet denoising loop, VAE decode, super-resolution) so each stage can be measured, and so
the prompt encoding can be replaced (knowledge-enhanced encoder) without copying the loop.
Image ``i`` of a request is drawn from its own generator seeded with ``seed + i``: any one
image can be reproduced alone by asking for ``seed + i`` with ``num_images=1``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, PngImagePlugin

from .domains import SAMPLER_NAMES, DomainSpec
from .errors import ModelUnavailableError
from .preview import PreviewCallback, previewer
from .samplers import SAMPLER_TITLES, make_scheduler
from .settings import settings

MAX_SEED = 2**32 - 1


class RequestError(ValueError):
    """A request field is invalid. ``field`` names it; ``reason`` (English) and ``reason_zh``
    (Chinese) say the allowed range."""

    def __init__(self, field_name: str, message: str, zh: str):
        self.field = field_name
        self.reason = message
        self.reason_zh = zh
        super().__init__(f"{field_name}: {message}")


class GenerationCancelled(RuntimeError):
    """The caller asked to stop (the UI's stop button) before the denoising loop finished."""


@dataclass(frozen=True)
class Limits:
    """Bounds a request must respect; a public host can tighten them through the environment."""

    max_prompt_chars: int = 1000
    max_steps: int = 150
    max_guidance: float = 30.0
    max_images: int = 8
    min_side: int = 64
    max_side: int = 1024

    @classmethod
    def from_env(cls) -> "Limits":
        current = settings()
        return cls(max_images=current.max_images, max_side=current.max_side, max_steps=current.max_steps)


@dataclass(frozen=True)
class GenerationRequest:
    """What a user asks for. ``None`` means "the domain's default" until :meth:`resolve`."""

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    sampler: str | None = None
    super_resolution: bool | None = None

    def resolve(self, spec: DomainSpec, limits: Limits | None = None) -> "GenerationRequest":
        """Fill the domain's defaults, pick a seed if none was given, and validate every field.

        A picked seed leaves room for the largest batch: image ``i`` uses ``seed + i``.
        """
        limits = limits or Limits.from_env()
        filled = replace(
            self,
            negative_prompt=spec.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            num_inference_steps=spec.num_inference_steps if self.num_inference_steps is None else self.num_inference_steps,
            guidance_scale=spec.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            seed=random.randint(0, MAX_SEED + 1 - limits.max_images) if self.seed is None else self.seed,
            height=spec.height if self.height is None else self.height,
            width=spec.width if self.width is None else self.width,
            sampler=spec.sampler if self.sampler is None else self.sampler,
            super_resolution=spec.super_resolution if self.super_resolution is None else self.super_resolution,
        )
        filled.validate(limits)
        return filled

    def validate(self, limits: Limits) -> None:
        _check_text("prompt", self.prompt, limits.max_prompt_chars, required=True)
        _check_text("negative_prompt", self.negative_prompt, limits.max_prompt_chars, required=False)
        _check_int("num_inference_steps", self.num_inference_steps, 1, limits.max_steps)
        _check_number("guidance_scale", self.guidance_scale, 0.0, limits.max_guidance)
        _check_int("num_images", self.num_images, 1, limits.max_images)
        _check_int("seed", self.seed, 0, MAX_SEED)
        if self.seed + self.num_images - 1 > MAX_SEED:
            raise RequestError(
                "seed",
                f"must be between 0 and {MAX_SEED + 1 - self.num_images} for {self.num_images} images "
                f"(image i uses seed + i, at most {MAX_SEED}), got {self.seed}",
                f"生成 {self.num_images} 张图时须在 0 到 {MAX_SEED + 1 - self.num_images} 之间（第 i 张用 seed + i）",
            )
        for name in ("height", "width"):
            _check_int(name, getattr(self, name), limits.min_side, limits.max_side)
            if getattr(self, name) % 8:
                raise RequestError(name, f"must be a multiple of 8, got {getattr(self, name)}", f"须为 8 的倍数（收到 {getattr(self, name)}）")
        if self.sampler not in SAMPLER_NAMES:
            raise RequestError(
                "sampler", f"must be one of {', '.join(SAMPLER_NAMES)}, got {self.sampler!r}", f"须为 {', '.join(SAMPLER_NAMES)} 之一"
            )
        if not isinstance(self.super_resolution, bool):
            raise RequestError("super_resolution", f"must be true or false, got {self.super_resolution!r}", "须为 true 或 false")


def _check_text(name: str, value: Any, max_chars: int, required: bool) -> None:
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {type(value).__name__}", "须为文本")
    if required and not value.strip():
        raise RequestError(name, "must not be empty", "不能为空")
    if len(value) > max_chars:
        raise RequestError(name, f"must be at most {max_chars} characters, got {len(value)}", f"最多 {max_chars} 个字符（收到 {len(value)} 个）")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        raise RequestError(
            name,
            f"must be valid Unicode text; a lone surrogate U+{code:04X} is at position {exc.start}",
            f"含无效字符（第 {exc.start} 位的孤立代理 U+{code:04X}）",
        ) from None


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer between {low} and {high}, got {value!r}", f"须为 {low} 到 {high} 之间的整数")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}", f"须在 {low} 到 {high} 之间（收到 {value}）")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(name, f"must be a number between {low} and {high}, got {value!r}", f"须为 {low} 到 {high} 之间的数")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}", f"须在 {low} 到 {high} 之间（收到 {value}）")


@dataclass(frozen=True)
class PromptReport:
    """How the prompt fits the text encoder's window (BERT tokens, one per Chinese character)."""

    num_tokens: int
    max_tokens: int
    dropped_text: str = ""

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_text)

    def message(self) -> str:
        if not self.truncated:
            return ""
        return (
            f"提示词超出文本编码器的 {self.max_tokens} 个 token 窗口，末尾 {len(self.dropped_text)} 个字符被忽略："
            f"「{self.dropped_text}」 / The prompt exceeds the text encoder's {self.max_tokens}-token window; "
            f"the last {len(self.dropped_text)} characters are dropped."
        )


def inspect_prompt(tokenizer, text: str) -> PromptReport:
    """Count the prompt's tokens and say which characters fall outside the encoder's window."""
    max_tokens = int(tokenizer.model_max_length)
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if len(ids) <= max_tokens:
        return PromptReport(len(ids), max_tokens)
    last_kept = encoded["offset_mapping"][max_tokens - 2]
    return PromptReport(len(ids), max_tokens, text[last_kept[1]:].strip())


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float]
    settings: dict[str, Any]
    prompt_report: PromptReport
    notes: list[str] = field(default_factory=list)

    def image_settings(self, index: int) -> dict[str, Any]:
        """Everything needed to reproduce image ``index`` alone."""
        return {**self.settings, "seed": self.seeds[index], "num_images": 1}

    def output_settings(self, index: int) -> dict[str, Any]:
        """:meth:`image_settings` plus the size of the image as delivered (after super-resolution)."""
        width, height = self.images[index].size
        return {**self.image_settings(index), "output_width": width, "output_height": height}

    def file_stem(self, index: int) -> str:
        """A file name stem that images of other runs do not share, e.g. ``demo-44-pndm-20steps-sr4-1a2b3c4d``:
        domain, seed, sampler, steps, super-resolution factor, and a short hash of all the settings."""
        image = self.output_settings(index)
        parts = [image["domain"], str(image["seed"]), image["sampler"], f"{image['num_inference_steps']}steps"]
        if image["super_resolution"]:
            parts.append(f"sr{upscale_factor(image)}")
        digest = hashlib.sha256(json.dumps(image, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
        return "-".join(parts + [digest[:8]])

    def summary(self, index: int) -> str:
        """Image ``index``'s settings as one readable line (seed, size, sampler, steps, guidance)."""
        image = self.output_settings(index)
        return " · ".join([
            f"种子 seed {image['seed']}",
            size_summary(image),
            SAMPLER_TITLES[image["sampler"]],
            f"{image['num_inference_steps']} 步 steps",
            f"引导 guidance {image['guidance_scale']:g}",
        ])

    def png_bytes(self, index: int) -> bytes:
        buffer = io.BytesIO()
        self.images[index].save(buffer, format="PNG", pnginfo=png_metadata(self.output_settings(index)))
        return buffer.getvalue()

    def save(self, out_dir: Path) -> list[Path]:
        """Write every image as ``<file_stem>.png`` (settings embedded) into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(len(self.images)):
            path = out_dir / f"{self.file_stem(i)}.png"
            path.write_bytes(self.png_bytes(i))
            paths.append(path)
        return paths


def upscale_factor(settings: dict[str, Any]) -> int:
    """How many times larger the delivered image is than the generated one (1 without super-resolution)."""
    return settings.get("output_width", settings["width"]) // settings["width"]


def size_summary(settings: dict[str, Any]) -> str:
    """``64×64``, or ``256×256 (64×64 → 超分辨率 super-resolution ×4)`` after super-resolution."""
    generated = f"{settings['width']}×{settings['height']}"
    if upscale_factor(settings) == 1:
        return generated
    output = f"{settings['output_width']}×{settings['output_height']}"
    return f"{output} ({generated} → 超分辨率 super-resolution ×{upscale_factor(settings)})"


def png_metadata(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """Settings as PNG text chunks: ``rapid_diffusion`` (JSON) and ``parameters`` (A1111 style).

    ``Size`` is the size of the file; an upscaled image also says the size it was generated at.
    """
    info = PngImagePlugin.PngInfo()
    info.add_itxt("rapid_diffusion", json.dumps(settings, ensure_ascii=False, sort_keys=True))
    line = (
        f"{settings['prompt']}\nNegative prompt: {settings.get('negative_prompt', '')}\n"
        f"Steps: {settings['num_inference_steps']}, Sampler: {settings['sampler']}, "
        f"CFG scale: {settings['guidance_scale']}, Seed: {settings['seed']}, "
        f"Size: {png_size_text(settings)}, Model: {settings.get('model', '')}"
    )
    info.add_itxt("parameters", line)
    return info


def png_size_text(settings: dict[str, Any]) -> str:
    """``64x64``, or ``256x256, generated at 64x64, super-resolution x4``."""
    generated = f"{settings['width']}x{settings['height']}"
    if upscale_factor(settings) == 1:
        return generated
    output = f"{settings['output_width']}x{settings['output_height']}"
    return f"{output}, generated at {generated}, super-resolution x{upscale_factor(settings)}"


def read_png_settings(path_or_bytes: Path | bytes) -> dict[str, Any]:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        return json.loads(image.text["rapid_diffusion"])


ProgressCallback = Callable[[int, int], None]
PromptEncoder = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
Upscaler = Callable[[list[Image.Image]], tuple[list[Image.Image], str]]


def generate(
    request: GenerationRequest,
    spec: DomainSpec,
    *,
    registry,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    preview: PreviewCallback | None = None,
    preview_every: int = 5,
) -> GenerationResult:
    """Generate images for ``request`` with the domain ``spec``: the call every face makes.

    ``preview(step, images)``, if given, gets cheap RGB projections of the latents every
    ``preview_every`` sampler steps (see :mod:`.preview`).

    The domain's pipeline is loaded through ``registry`` (a :class:`~.registry.ModelRegistry`,
    passed in so that the pipeline never reaches for a global) on first use; its lock makes one
    request at a time run on it.
    """
    model = registry.get(spec)
    with model.lock:
        if model.pipe is None:
            raise ModelUnavailableError(
                f"域「{spec.title_zh}」的模型刚被卸载，请重试。 / The model of domain '{spec.id}' was unloaded; try again."
            )
        return run_pipeline(
            model.pipe,
            request,
            spec=spec,
            progress=progress,
            should_stop=should_stop,
            preview=preview,
            preview_every=preview_every,
            encode_prompt=model.encode_prompt,
            upscaler=model.upscaler,
        )


def run_pipeline(
    pipe,
    request: GenerationRequest,
    *,
    spec: DomainSpec,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    preview: PreviewCallback | None = None,
    preview_every: int = 5,
    encode_prompt: PromptEncoder | None = None,
    upscaler: Upscaler | None = None,
) -> GenerationResult:
    """Run one request through ``pipe`` (a loaded ``StableDiffusionPipeline``): a batch of one.

    ``request`` is resolved against ``spec`` (defaults, validation) here, once. The caller
    owns concurrency: a pipeline runs one request at a time (the registry's model lock).
    """
    return run_batch(
        pipe, [request], spec=spec, progress=progress, should_stop=should_stop, preview=preview,
        preview_every=preview_every, encode_prompt=encode_prompt, upscaler=upscaler,
    )[0]


def finish_request(
    pipe,
    request: GenerationRequest,
    images: list[Image.Image],
    seeds: list[int],
    timings: dict[str, float],
    report: PromptReport,
    *,
    spec: DomainSpec,
    encode_prompt: PromptEncoder | None = None,
    upscaler: Upscaler | None = None,
) -> GenerationResult:
    """Notes, super-resolution and settings of one request's decoded images (alone or batched)."""
    notes = [report.message()] if report.truncated else []
    describe_entities = getattr(encode_prompt, "describe", None)
    if describe_entities is not None:
        notes += [f"知识图谱 / Knowledge graph: {line}" for line in describe_entities(request.prompt)]
    if request.super_resolution:
        start = time.perf_counter()
        images, method = (upscaler or lanczos_upscaler)(images)
        timings["super_resolution"] = _synchronized_elapsed(start, pipe.device)
        if method != "esrgan":
            notes.append(f"超分辨率使用 {method} 插值（未加载 ESRGAN 权重） / Upscaled with {method}, not ESRGAN")
    else:
        method = None
    timings["total"] = sum(timings.values())

    settings = {
        **asdict(request),
        "domain": spec.id,
        "model": spec.model.name,
        "upscaler": method,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
    }
    return GenerationResult(images, seeds, timings, settings, report, notes)


def model_scheduler_config(pipe) -> dict[str, Any]:
    """The config of the scheduler the model shipped with, kept aside on first use: every request
    replaces ``pipe.scheduler`` with its sampler, whose config may lack some of the model's fields."""
    if "model_scheduler_config" not in pipe.__dict__:
        pipe.__dict__["model_scheduler_config"] = dict(pipe.scheduler.config)
    return pipe.__dict__["model_scheduler_config"]


def generate_batch(
    requests: list[GenerationRequest],
    spec: DomainSpec,
    *,
    registry,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """:func:`generate` for several requests of one shape (see :func:`run_batch`), under one model lock."""
    model = registry.get(spec)
    with model.lock:
        if model.pipe is None:
            raise ModelUnavailableError(
                f"域「{spec.title_zh}」的模型刚被卸载，请重试。 / The model of domain '{spec.id}' was unloaded; try again."
            )
        return run_batch(
            model.pipe, requests, spec=spec, progress=progress, should_stop=should_stop,
            encode_prompt=model.encode_prompt, upscaler=model.upscaler,
        )


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share a UNet batch: same size, steps, guidance and sampler."""
    return (request.height, request.width, request.num_inference_steps, request.guidance_scale, request.sampler)


def run_batch(
    pipe,
    requests: list[GenerationRequest],
    *,
    spec: DomainSpec,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    preview: PreviewCallback | None = None,
    preview_every: int = 5,
    encode_prompt: PromptEncoder | None = None,
    upscaler: Upscaler | None = None,
) -> list[GenerationResult]:
    """Run several requests with one :func:`batch_key` as one UNet batch, one result each.

    Each image keeps its own generator (``seed + i`` of its request), so it equals the image of
    the request run alone, up to the float rounding of a larger batch. Stage timings are the
    batch's, shared by its requests. ``preview(step, images)`` gets a cheap RGB view of the
    latents every ``preview_every`` steps (nothing is computed without it).
    """
    requests = [request.resolve(spec) for request in requests]
    if len({batch_key(r) for r in requests}) != 1:
        raise ValueError("a batch needs one size, step count, guidance and sampler")
    first = requests[0]
    pipe.scheduler = make_scheduler(first.sampler, model_scheduler_config(pipe))
    do_cfg = first.guidance_scale > 1.0
    timings: dict[str, float] = {}

    start = time.perf_counter()
    encoder = encode_prompt or pipe.encode_prompt
    with torch.inference_mode():
        encoded = [
            encoder(r.prompt, pipe.device, r.num_images, do_cfg, negative_prompt=r.negative_prompt or None) for r in requests
        ]
    timings["text_encoder"] = _synchronized_elapsed(start, pipe.device)

    seeds = [[r.seed + i for i in range(r.num_images)] for r in requests]
    start = time.perf_counter()
    latents = pipe(
        prompt_embeds=torch.cat([positive for positive, _ in encoded]),
        negative_prompt_embeds=torch.cat([negative for _, negative in encoded]) if do_cfg else None,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        height=first.height,
        width=first.width,
        generator=[torch.Generator("cpu").manual_seed(seed) for group in seeds for seed in group],
        output_type="latent",
        callback_on_step_end=_step_callback(
            progress, should_stop, first.num_inference_steps, previewer(pipe, preview, preview_every)
        ),
    ).images
    if should_stop is not None and should_stop():
        raise GenerationCancelled("generation stopped by the user / 已停止生成")
    timings["unet"] = _synchronized_elapsed(start, pipe.device)

    start = time.perf_counter()
    images = decode_latents(pipe, latents)
    timings["vae_decode"] = _synchronized_elapsed(start, pipe.device)
    results, offset = [], 0
    for request, request_seeds in zip(requests, seeds):
        own = images[offset:offset + request.num_images]
        offset += request.num_images
        report = inspect_prompt(pipe.tokenizer, request.prompt)
        results.append(
            finish_request(pipe, request, own, request_seeds, dict(timings), report, spec=spec,
                           encode_prompt=encode_prompt, upscaler=upscaler)
        )
    return results


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    with torch.inference_mode():
        scaled = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(scaled, return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=[True] * len(decoded))


def lanczos_upscaler(images: list[Image.Image], scale: int = 4) -> tuple[list[Image.Image], str]:
    """The labelled stand-in for ESRGAN when no weights are available."""
    return [im.resize((im.width * scale, im.height * scale), Image.LANCZOS) for im in images], "lanczos"


def _step_callback(
    progress: ProgressCallback | None,
    should_stop: Callable[[], bool] | None,
    num_steps: int,
    show_preview: Callable[[int, torch.Tensor], None] | None = None,
):
    """Report (done, total) in the request's sampler steps: one call per step, ``total == num_steps``.

    A sampler may evaluate the UNet more often than it makes steps (PNDM's PLMS warm-up spends two
    evaluations on its first step: 21 for 20 steps); evaluation ``k`` of ``n`` completes step
    ``k * num_steps // n``. The stop flag is read after every evaluation; ``show_preview(step,
    latents)`` is called once per step.
    """
    reported = 0

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        nonlocal reported
        done = (step + 1) * num_steps // pipe.num_timesteps
        if done > reported:
            reported = done
            if progress is not None:
                progress(done, num_steps)
            if show_preview is not None:
                show_preview(done, callback_kwargs["latents"])
        if should_stop is not None and should_stop():
            pipe._interrupt = True
        return callback_kwargs

    return on_step_end


def _synchronized_elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
