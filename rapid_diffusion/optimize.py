"""Optimisation levels for a loaded ``StableDiffusionPipeline``: ``none``, ``flash``, ``compile``.

* ``flash``: the UNet's attention runs through :mod:`rapid_diffusion.attention` with the best
  backend for the device (flash-attn / FlashAttention-3 on CUDA, else PyTorch SDPA); on CUDA
  an fp32 pipeline is moved to bf16 (fp16 where bf16 is unsupported).
* ``compile``: ``flash`` plus fused QKV projections, channels-last memory format and
  ``torch.compile`` of the UNet and the VAE decoder (inductor: Triton on CUDA with CUDA graphs,
  C++/OpenMP on CPU with weight freezing), then a warm-up generation at the domain's size so a
  user's first request does not pay for compilation.

Each step falls back with a log line when its backend is missing (no flash-attn, no CUDA, no
compiler toolchain); :func:`apply_optimization` returns the level actually applied.
"""

from __future__ import annotations

import shutil
from typing import Callable

import torch

from .attention import best_backend, set_attention_backend

LEVELS = ("none", "flash", "compile")
WARMUP_STEPS = 2
WARMUP_PROMPT = "预热"


def apply_optimization(
    pipe,
    level: str,
    log: Callable[[str], None] = print,
    height: int | None = None,
    width: int | None = None,
) -> str:
    """Optimise ``pipe`` in place for ``level``; returns the level applied after fallbacks."""
    if level not in LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(LEVELS)}, got {level!r}")
    if level == "none":
        return "none"
    use_half_precision_on_cuda(pipe, log)
    backend = use_fast_attention(pipe, log)
    if level == "flash":
        return "flash"
    missing = compiler_missing(pipe.device)
    if missing:
        log(f"torch.compile unavailable ({missing}); using level 'flash'")
        return "flash"
    fuse_projections(pipe, backend)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    compile_modules(pipe)
    try:
        warm_up(pipe, height, width)
    except Exception as exc:  # inductor failures come in many classes (BackendCompilerFailed, CppCompileError, ...)
        log(f"torch.compile failed at warm-up ({type(exc).__name__}: {str(exc)[:200]}); using level 'flash'")
        uncompile_modules(pipe)
        return "flash"
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


def compiler_missing(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot build kernels for ``device``; None when it can."""
    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed"
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
    """Compile the UNet's and the VAE decoder's ``forward``; hooks stay outside the graphs."""
    options = compile_options(pipe.device)
    pipe.unet.forward = torch.compile(pipe.unet.forward, fullgraph=True, **options)
    pipe.vae.decoder.forward = torch.compile(pipe.vae.decoder.forward, **options)
    if options.get("mode") == "reduce-overhead":
        pipe.unet.register_forward_hook(copy_out_of_cuda_graph)


def copy_out_of_cuda_graph(module, args, output):
    """A CUDA-graph replay overwrites the previous outputs, and PNDM keeps past UNet outputs
    (without CFG they are the raw outputs), so each output is copied out of the graph pool."""
    if isinstance(output, tuple):
        return tuple(tensor.clone() for tensor in output)
    return type(output)(sample=output.sample.clone())


def is_compiled(module: torch.nn.Module) -> bool:
    return "forward" in vars(module)


def uncompile_modules(pipe) -> None:
    for module in (pipe.unet, pipe.vae.decoder):
        vars(module).pop("forward", None)


def warm_up(pipe, height: int | None, width: int | None) -> None:
    """A short CFG generation at the serving size, so every graph compiles before a user waits.

    ``pipe(...)`` decodes under ``no_grad``, :func:`rapid_diffusion.pipeline.decode_latents`
    under ``inference_mode``: dynamo guards on the difference, so both are warmed.
    """
    from .pipeline import decode_latents

    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    height, width = height or side, width or side
    pipe(
        WARMUP_PROMPT,
        height=height,
        width=width,
        num_inference_steps=WARMUP_STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(0),
    )
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    decode_latents(pipe, torch.zeros(shape, device=pipe.device, dtype=pipe.vae.dtype))
