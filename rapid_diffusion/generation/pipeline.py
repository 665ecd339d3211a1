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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, PngImagePlugin

from ..domains import DomainSpec
from .preview import PreviewCallback, previewer
from .request import GenerationRequest, PromptReport, inspect_prompt
from .samplers import SAMPLER_TITLES, make_scheduler


class GenerationCancelled(RuntimeError):
    """The caller asked to stop (the UI's stop button) before the denoising loop finished."""


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


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """The same padding and truncation the pipeline uses at inference."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


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
    notes = report.notes()
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


def batch_key(request: GenerationRequest) -> tuple:
    """Requests with equal keys can share a UNet batch: same size, steps, guidance and sampler."""
    return (request.height, request.width, request.num_inference_steps, request.guidance_scale, request.sampler)


def generate(
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
    """Generate images for ``requests`` with ``pipe`` (a loaded ``StableDiffusionPipeline``): the one
    generation function. Several requests must share one :func:`batch_key`; they run as one UNet batch,
    one result each. Each request is resolved against ``spec`` (defaults, validation) here, once.

    The caller owns concurrency: a pipeline runs one batch at a time (the registry model's lock, see
    ``LoadedModel.run``). ``encode_prompt`` replaces the pipeline's text encoding (the knowledge-enhanced
    encoder), ``upscaler`` the Lanczos stand-in for super-resolution.

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
