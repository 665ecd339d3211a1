"""Optimisation levels for a loaded ``StableDiffusionPipeline``: ``none``, ``flash``, ``compile``,
``openvino`` and ``auto``.

* ``flash``: the UNet's attention runs through :mod:`rapid_diffusion.speed.attention` with the best
  backend for the device (flash-attn / FlashAttention-3 on CUDA, else PyTorch SDPA); on CUDA
  an fp32 pipeline is moved to bf16 (fp16 where bf16 is unsupported).
* ``compile``: ``flash`` plus fused QKV projections, channels-last memory format and
  ``torch.compile`` of the UNet and the VAE decoder (inductor: Triton on CUDA with CUDA graphs,
  C++/OpenMP on CPU with weight freezing), then a warm-up of every batch bucket at each serving
  size so a user's request never waits for a compilation. Compiled artifacts are saved under
  ``HOME/cache/torch-compile`` and loaded back by the next process.
* ``openvino``: :mod:`rapid_diffusion.speed.openvino` (CPU only, when OpenVINO is importable).
* ``openvino-int8``: ``openvino`` with the weights of the UNet, text encoder and VAE decoder
  compressed to int8 by NNCF (``nncf.compress_weights``, weight-only, activations stay f32): for
  a CPU host where an SD1.5-size model does not fit, or is too slow, at f32. Needs the ``int8``
  extra; without NNCF it falls back to ``openvino`` with a log line. Never chosen by ``auto``.
* ``auto``: what measured fastest on the device: ``compile`` on CUDA; on CPU ``openvino`` when
  importable (2.4-3.0x plain and 1.8-2.0x ``compile`` on the demo model, benchmarks/README.md),
  else ``compile`` when a C++ compiler exists, else ``none``. ``flash`` is never chosen: on the
  H100 it measured slower than plain (0.625 vs 0.581 s per image).

Shape policy (``compile`` and ``openvino``): UNet and VAE batches are padded to a bucket
(1, 2, 4, 8; larger batches run in chunks of 8) so only four batch sizes exist per size; the
warm-up compiles every bucket a request can reach (CFG doubles the UNet batch) at the domain's
size and at ``RAPID_DIFFUSION_WARM_SIZES``.

Each step falls back with a log line when its backend is missing (no flash-attn, no CUDA, no
compiler toolchain, no OpenVINO); :func:`apply_optimization` returns the level actually applied.
"""

from __future__ import annotations

import importlib.util
import locale
import shutil
from contextlib import contextmanager
from typing import Callable, Sequence

import torch

from ..domains import OPTIMIZATION_LEVELS
from ..settings import settings
from .attention import best_backend, set_attention_backend
from .openvino import BATCH_BUCKETS, bucket_for, openvino_missing, pad_batch

LEVELS = OPTIMIZATION_LEVELS
SLOW_LEVELS = ("compile", "openvino", "openvino-int8", "auto")
WARMUP_STEPS = 2
WARMUP_PROMPT = "预热"


def apply_optimization(
    pipe,
    level: str,
    log: Callable[[str], None] = print,
    height: int | None = None,
    width: int | None = None,
    *,
    max_images: int | None = None,
    precision: str | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> str:
    """Optimise ``pipe`` in place for ``level``; returns the level applied after fallbacks.

    ``max_images`` (default ``RAPID_DIFFUSION_MAX_IMAGES``) bounds the batch buckets warmed;
    ``sizes`` (height, width) replaces the serving sizes (the domain's and ``WARM_SIZES``).
    """
    if level not in LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(LEVELS)}, got {level!r}")
    if level == "auto":
        level = auto_level(pipe.device, log)
    if level == "none":
        return "none"
    sizes = list(sizes) if sizes else serving_sizes(pipe, height, width)
    max_images = max_images or settings().max_images
    if level in ("openvino", "openvino-int8"):
        return apply_openvino(pipe, sizes, max_images, log, precision, int8=level == "openvino-int8")
    use_half_precision_on_cuda(pipe, log)
    backend = use_fast_attention(pipe, log)
    if level == "flash":
        return "flash"
    return apply_compile(pipe, backend, sizes, max_images, log)


def auto_level(device: torch.device, log: Callable[[str], None]) -> str:
    """The fastest level measured on this kind of device, among those that can run here."""
    device = torch.device(device)
    if device.type == "cpu":
        missing = openvino_missing(device)
        if missing is None:
            log("auto: OpenVINO (the fastest measured on CPU)")
            return "openvino"
        log(f"auto: {missing}; trying torch.compile")
    missing = compiler_missing(device)
    if missing is None:
        log(f"auto: torch.compile on {device.type}")
        return "compile"
    log(f"auto: torch.compile unavailable ({missing}); plain diffusers")
    return "none"


def serving_sizes(pipe, height: int | None, width: int | None) -> list[tuple[int, int]]:
    """The domain's size (the model's native size if none), then ``RAPID_DIFFUSION_WARM_SIZES``."""
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    sizes = [(height or side, width or side), *settings().warm_size_list]
    return list(dict.fromkeys(sizes))


@contextmanager
def keeping_locale():
    """Put the process's LC_CTYPE back afterwards: in one test run, building the OpenVINO pipeline
    with the bf16 hint left it at "C", and every later ``open()`` without an encoding read ASCII
    (torch's own inductor templates included)."""
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


def apply_openvino(pipe, sizes, max_images: int, log: Callable[[str], None], precision: str | None, int8: bool = False) -> str:
    from . import openvino as openvino_backend

    missing = openvino_missing(pipe.device)
    if missing:
        log(f"OpenVINO unavailable ({missing}); plain diffusers")
        return "none"
    if int8 and (nncf_missing := openvino_backend.nncf_missing()):
        log(f"int8 weights unavailable ({nncf_missing}); using level 'openvino' (f32 weights)")
        int8 = False
    try:
        with keeping_locale():
            modules = openvino_backend.convert_pipeline(pipe, *sizes[0], log, precision, int8=int8)
            openvino_backend.install(pipe, modules)
            shapes = openvino_backend.warm_up_shapes(pipe, sizes, max_images)
    except Exception as exc:  # conversion failures come in many classes (OpConversionFailure, RuntimeError, ...)
        log(f"OpenVINO failed ({type(exc).__name__}: {str(exc)[:3000]}); plain diffusers")
        uninstall(pipe)
        return "none"
    kind = "static" if openvino_backend.keeps_static_copies(pipe) else "dynamic-shape (large model: no static copies)"
    log(f"OpenVINO: {shapes} {kind} shapes warmed for sizes {sizes}, batch buckets {openvino_backend.batch_buckets(pipe)}")
    return "openvino-int8" if int8 else "openvino"


def apply_compile(pipe, backend: str, sizes, max_images: int, log: Callable[[str], None]) -> str:
    from .compile_cache import load_compile_artifacts, save_compile_artifacts

    missing = compiler_missing(pipe.device)
    if missing:
        log(f"torch.compile unavailable ({missing}); using level 'flash'")
        return "flash"
    fuse_projections(pipe, backend)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    cache_file = load_compile_artifacts(pipe, sizes, log)
    compile_modules(pipe)
    try:
        warm_up(pipe, sizes, max_images)
    except Exception as exc:  # inductor failures come in many classes (BackendCompilerFailed, CppCompileError, ...)
        log(f"torch.compile failed at warm-up ({type(exc).__name__}: {str(exc)[:200]}); using level 'flash'")
        uninstall(pipe)
        return "flash"
    save_compile_artifacts(cache_file, log)
    log(f"compiled UNet and VAE decoder ({compile_description(pipe.device)}), attention backend '{backend}'")
    return "compile"


def use_half_precision_on_cuda(pipe, log: Callable[[str], None]) -> None:
    """flash-attn kernels and tensor cores need fp16/bf16; bf16 where supported (no fp16 VAE overflow)."""
    if pipe.device.type != "cuda" or pipe.unet.dtype != torch.float32:
        return
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    pipe.to(dtype=dtype)
    log(f"converted the pipeline from float32 to {str(dtype).replace('torch.', '')} for CUDA kernels")


def use_fast_attention(pipe, log: Callable[[str], None]) -> str:
    """Install the dispatch processor with the best backend; SDPA if that backend cannot load."""
    backend = best_backend(pipe.device, pipe.unet.dtype)
    try:
        set_attention_backend(pipe.unet, backend)
    except RuntimeError as exc:
        log(f"attention backend '{backend}' unavailable ({exc}); using PyTorch SDPA")
        backend = "native"
        set_attention_backend(pipe.unet, backend)
    log(f"UNet attention backend: {backend}")
    return backend


def triton_installed() -> bool:
    """Triton, inductor's CUDA kernel compiler (a public check: is the package importable)."""
    return importlib.util.find_spec("triton") is not None


def compiler_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot build kernels for ``device``; None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if triton_installed() else "Triton is not installed"
    if device.type == "cpu":
        return None if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++") else "no C++ compiler on PATH"
    return f"no inductor backend for device type '{device.type}'"


def fuse_projections(pipe, backend: str) -> None:
    """One matmul for Q, K and V (K and V in cross-attention); keeps the dispatch processor."""
    pipe.fuse_qkv_projections(unet=True, vae=True)
    set_attention_backend(pipe.unet, backend)


def compile_options(device: torch.device) -> dict:
    """CUDA: CUDA graphs (``reduce-overhead``). CPU: weight freezing (constant folding, oneDNN prepacking)."""
    if torch.device(device).type == "cuda":
        return {"mode": "reduce-overhead"}
    return {"options": {"freezing": True}}


def compile_description(device: torch.device) -> str:
    return "inductor, CUDA graphs" if torch.device(device).type == "cuda" else "inductor C++, frozen weights"


def compile_modules(pipe) -> None:
    """Compile the UNet's and the VAE decoder's ``forward`` behind batch buckets; hooks stay outside."""
    options = compile_options(pipe.device)
    pipe.unet.forward = bucketed(torch.compile(pipe.unet.forward, fullgraph=True, **options))
    pipe.vae.decoder.forward = bucketed(torch.compile(pipe.vae.decoder.forward, **options))
    if options.get("mode") == "reduce-overhead":
        pipe.unet.register_forward_hook(copy_out_of_cuda_graph)


def copy_out_of_cuda_graph(module, args, output):
    """A CUDA-graph replay overwrites the previous outputs, and PNDM keeps past UNet outputs
    (without CFG they are the raw outputs), so each output is copied out of the graph pool."""
    if isinstance(output, tuple):
        return tuple(tensor.clone() for tensor in output)
    return type(output)(sample=output.sample.clone())


def bucketed(forward: Callable) -> Callable:
    """Run ``forward`` at the batch bucket of its first argument (padded, or chunked beyond 8).

    Batch-first tensor arguments are padded alike; a 0-d timestep broadcasts as it is.
    """

    def run(sample, *args, **kwargs):
        batch = sample.shape[0]
        largest = BATCH_BUCKETS[-1]
        if batch > largest:
            parts = []
            for start in range(0, batch, largest):
                chunk_args, chunk_kwargs = slice_batch((sample, *args), kwargs, batch, start, start + largest)
                parts.append(run(*chunk_args, **chunk_kwargs))
            return join_outputs(parts)
        size = bucket_for(batch)
        if size == batch:
            return forward(sample, *args, **kwargs)
        padded_args, padded_kwargs = pad_arguments((sample, *args), kwargs, batch, size)
        return slice_output(forward(*padded_args, **padded_kwargs), batch)

    return run


def is_batched(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def pad_arguments(args: tuple, kwargs: dict, batch: int, size: int) -> tuple[tuple, dict]:
    pad = lambda v: pad_batch(v, size) if is_batched(v, batch) else v  # noqa: E731
    return tuple(pad(a) for a in args), {k: pad(v) for k, v in kwargs.items()}


def slice_batch(args: tuple, kwargs: dict, batch: int, start: int, stop: int) -> tuple:
    cut = lambda v: v[start:stop] if is_batched(v, batch) else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def slice_output(output, batch: int):
    """The first ``batch`` rows of a tensor, a tuple of tensors or a diffusers output."""
    if isinstance(output, torch.Tensor):
        return output[:batch]
    if isinstance(output, tuple):
        return tuple(o[:batch] for o in output)
    return type(output)(sample=output.sample[:batch])


def join_outputs(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return type(first)(sample=torch.cat([p.sample for p in parts]))


def is_compiled(module: torch.nn.Module) -> bool:
    return "forward" in vars(module)


def uninstall(pipe) -> None:
    """Back to the modules' own ``forward`` (after a failed compile or conversion)."""
    for module in (pipe.unet, pipe.vae.decoder, pipe.text_encoder):
        vars(module).pop("forward", None)
    vars(pipe).pop("openvino_modules", None)


def warm_up(pipe, sizes: Sequence[tuple[int, int]], max_images: int) -> None:
    """Short generations that reach every batch bucket at every serving size, so every graph
    compiles before a user waits: with CFG (UNet batch 2n) and without (UNet batch n).

    ``pipe(...)`` decodes under ``no_grad``, :func:`rapid_diffusion.generation.pipeline.decode_latents`
    under ``inference_mode``: dynamo guards on the difference, so both are warmed.
    """
    from ..generation.pipeline import decode_latents

    image_counts = sorted({min(b, max_images) for b in BATCH_BUCKETS})
    for height, width in sizes:
        for count in image_counts:
            for guidance in (7.5, 1.0):
                warm_call(pipe, height, width, count, guidance)
        scale = pipe.vae_scale_factor
        for count in image_counts:
            shape = (count, pipe.unet.config.in_channels, height // scale, width // scale)
            decode_latents(pipe, torch.zeros(shape, device=pipe.device, dtype=pipe.vae.dtype))


def warm_call(pipe, height: int, width: int, count: int, guidance: float) -> None:
    pipe(
        WARMUP_PROMPT,
        height=height,
        width=width,
        num_inference_steps=WARMUP_STEPS,
        guidance_scale=guidance,
        num_images_per_prompt=count,
        generator=torch.Generator("cpu").manual_seed(0),
    )
