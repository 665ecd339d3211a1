"""Ahead-of-time compilation of the UNet: ``compile`` and ``auto`` on ZeroGPU, as Hugging Face's
ZeroGPU guide ("Make your ZeroGPU Spaces go brrr with ahead-of-time compilation") does it.

ZeroGPU lends a GPU only inside a ``spaces.GPU`` call, in a forked worker that lives for a few
calls, so ``torch.compile`` would compile again in every new worker. Instead, once at start-up per
domain (:func:`compile_ahead_of_time`):

1. **On the GPU** (``on_gpu`` runs a task there: ``spaces.GPU`` on ZeroGPU): ``spaces.aoti_capture``
   around a one-step generation records the UNet's real call; ``torch.export.export`` turns the UNet
   into a program with dynamic shapes (:func:`dynamic_shapes`); ``spaces.aoti_compile`` (AOTInductor)
   builds the binary, which comes back to the main process.
2. **In the main process** the UNet's ``forward`` becomes :class:`AheadOfTimeForward`: a call the
   binary covers runs it, any other runs the UNet's own eager ``forward``.

Shapes: the batch is dynamic from 1 to twice the image limit (classifier-free guidance doubles
it), and the latent height and width in steps of the UNet's stride (``2**downsamplers``: 8 latent
pixels, 64 image pixels on SD) from two strides up to ``RAPID_DIFFUSION_MAX_SIDE``. So one binary
serves every size of the UI's list (256 to 768 and the domain's own, all multiples of 64) and every
image count: the warm-up is one compilation, not one per shape. A side that is not a multiple of 64
(allowed: requests take multiples of 8) runs eager, as does anything else outside the exported
ranges (checked per call against the captured example, see :class:`CoveredCall`).

Why not ``spaces.aoti_apply``: it drains the UNet's parameters to save memory, which would leave
the shapes outside the binary nothing to run on. Keeping them costs one more copy of the UNet's
weights (1.7 GB for SD 1.5 in fp16; a ZeroGPU slice has 70 GB).

Why the whole UNet and not the guide's regional compilation (one compiled
``BasicTransformerBlock`` reused by its siblings): SD's UNet has them in three widths (320, 640,
1280 channels) and spends much of its time outside them (ResNet blocks, convolutions, group norms),
which would stay eager. Whether the whole-UNet compile meets the 60 s warm-up is for
``rapid-diffusion dev bench --aot`` on a GPU to show (benchmarks/README.md).

Any failure (no compiler, export refused, compilation failed, the GPU call refused) leaves the
eager UNet serving and returns ``failed`` with the reason, logged like the other levels' fallbacks.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..settings import settings
from .levels import WARMUP_PROMPT, compiler_missing
from .warmup import Acceleration

AHEAD_OF_TIME_LEVELS = ("compile", "auto")  # openvino runs on the CPU only
CUDA_INDUCTOR_CONFIGS = {"conv_1x1_as_mm": True, "epilogue_fusion": False}  # diffusers' SD recipe, no autotuning (cold start)

OnGpu = Callable[[Callable[[], Any]], Any]  # runs a task where the GPU is (spaces.GPU on ZeroGPU), returns its result


@dataclass(frozen=True)
class ShapeRange:
    """What the exported UNet accepts: batch ``1..max_batch``; latent sides ``stride * k`` for
    ``k`` in ``min_steps..max_steps``."""

    max_batch: int
    stride: int
    min_steps: int
    max_steps: int

    def side_range(self, vae_scale: int) -> tuple[int, int, int]:
        """(smallest, largest, step) image side in pixels."""
        pixels = self.stride * vae_scale
        return self.min_steps * pixels, self.max_steps * pixels, pixels

    def describe(self, vae_scale: int) -> str:
        low, high, step = self.side_range(vae_scale)
        return f"UNet batch 1-{self.max_batch}, sides {low}-{high} px in steps of {step}"


def shape_range(pipe) -> ShapeRange:
    """The shapes a request may reach (``RAPID_DIFFUSION_MAX_IMAGES``, ``RAPID_DIFFUSION_MAX_SIDE``)."""
    stride = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    latent_max = settings().max_side // int(pipe.vae_scale_factor)
    return ShapeRange(2 * settings().max_images, stride, 2, max(2, latent_max // stride))


def capture_unet_call(pipe, capture, height: int, width: int):
    """The UNet's call in a one-step generation with guidance (``spaces.aoti_capture``: the call is
    recorded, not run); ``call.args`` and ``call.kwargs`` hold what the pipeline passes."""
    with capture(pipe.unet) as call:
        pipe(WARMUP_PROMPT, height=height, width=width, num_inference_steps=1, guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(0))
    return call


def call_signature(unet, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A UNet call by parameter name (``sample``, ``timestep``, ...): a tensor as its
    :class:`TensorSpec`, any other value as it is. Picklable: it crosses back from the GPU worker."""
    arguments = bind_call(unet, args, kwargs)
    return {name: TensorSpec(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for name, v in arguments.items()}


def bind_call(unet, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A UNet call's arguments by the name of the class's ``forward`` parameter (not the instance's
    ``forward``, which :func:`install` replaces)."""
    arguments = inspect.signature(type(unet).forward).bind(unet, *args, **kwargs).arguments
    return {name: value for name, value in list(arguments.items())[1:]}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def dynamic_dims(signature: dict[str, Any]) -> dict[str, dict[int, str]]:
    """Which dimensions vary: the sample's batch, height and width, and the batch of every other
    tensor batched like it (the text embeddings); everything else is static."""
    batch = signature["sample"].shape[0]
    dims: dict[str, dict[int, str]] = {}
    for name, value in signature.items():
        if name == "sample":
            dims[name] = {0: "batch", 2: "height", 3: "width"}
        elif isinstance(value, TensorSpec) and value.shape and value.shape[0] == batch:
            dims[name] = {0: "batch"}
    return dims


def dynamic_shapes(signature: dict[str, Any], shapes: ShapeRange) -> dict[str, Any]:
    """``torch.export``'s ``dynamic_shapes`` for a captured call (``None``: static)."""
    side = {"batch": torch.export.Dim("batch", min=1, max=shapes.max_batch),
            "height": shapes.stride * torch.export.Dim("latent_height", min=shapes.min_steps, max=shapes.max_steps),
            "width": shapes.stride * torch.export.Dim("latent_width", min=shapes.min_steps, max=shapes.max_steps)}
    dims = dynamic_dims(signature)
    return {name: {dim: side[kind] for dim, kind in dims[name].items()} if name in dims else None for name in signature}


def export_unet(unet, call, shapes: ShapeRange) -> torch.export.ExportedProgram:
    signature = call_signature(unet, call.args, call.kwargs)
    return torch.export.export(unet, args=tuple(call.args), kwargs=dict(call.kwargs),
                               dynamic_shapes=dynamic_shapes(signature, shapes))


def inductor_configs(device: torch.device) -> dict:
    return dict(CUDA_INDUCTOR_CONFIGS) if torch.device(device).type == "cuda" else {}


class CoveredCall:
    """Whether a UNet call is one the exported program accepts: the captured call's argument
    names, other values, dtypes and static dimensions, with the dynamic ones in range."""

    def __init__(self, unet, signature: dict[str, Any], shapes: ShapeRange):
        self.unet = unet
        self.example = signature
        self.dynamic = dynamic_dims(signature)
        self.shapes = shapes

    def __call__(self, args: tuple, kwargs: dict) -> bool:
        try:
            arguments = bind_call(self.unet, args, kwargs)
        except TypeError:
            return False
        if arguments.keys() != self.example.keys() or not isinstance(arguments["sample"], torch.Tensor):
            return False
        batch = arguments["sample"].shape[0]
        return batch <= self.shapes.max_batch and all(self.matches(name, value, batch) for name, value in arguments.items())

    def matches(self, name: str, value: Any, batch: int) -> bool:
        example = self.example[name]
        if not isinstance(example, TensorSpec):
            return not isinstance(value, torch.Tensor) and (value is example or value == example)
        if not isinstance(value, torch.Tensor) or value.dtype != example.dtype or value.dim() != len(example.shape):
            return False
        dynamic = self.dynamic.get(name, {})
        return all(self.size_fits(dynamic.get(dim), size, expected, batch)
                   for dim, (size, expected) in enumerate(zip(value.shape, example.shape)))

    def size_fits(self, kind: str | None, size: int, expected: int, batch: int) -> bool:
        if kind is None:
            return size == expected
        if kind == "batch":
            return size == batch
        steps, remainder = divmod(size, self.shapes.stride)
        return remainder == 0 and self.shapes.min_steps <= steps <= self.shapes.max_steps


class AheadOfTimeForward:
    """The UNet's ``forward`` after compilation: the compiled binary for the calls it covers, the
    module's own eager ``forward`` for the rest."""

    def __init__(self, compiled: Callable, eager: Callable, covers: CoveredCall):
        self.compiled = compiled
        self.eager = eager
        self.covers = covers

    def __call__(self, *args, **kwargs):
        if self.covers(args, kwargs):
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


def compile_ahead_of_time(
    pipe,
    level: str,
    on_gpu: OnGpu,
    log: Callable[[str], None] = print,
    *,
    height: int | None = None,
    width: int | None = None,
) -> Acceleration:
    """Compile ``pipe``'s UNet ahead of time and route its calls to the binary; returns what serves.

    ``on_gpu(task)`` runs ``task`` (capture, export, compile) where the GPU is and returns the
    compiled binary; the capture's example generation is at ``height`` x ``width`` (the model's
    native size by default). Levels other than ``compile`` and ``auto`` stay eager.
    """
    if level not in AHEAD_OF_TIME_LEVELS:
        reason = f"{level}: no ahead-of-time path (OpenVINO runs on the CPU only); plain diffusers"
        log(reason)
        return Acceleration("eager", level, "none", reason)
    missing = compiler_missing(pipe.device)
    if missing:
        return failed(level, f"ahead-of-time compilation unavailable ({missing}); plain diffusers", log)
    shapes = shape_range(pipe)
    side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    example = (height or side, width or side)

    def compile_on_gpu():
        import spaces

        call = capture_unet_call(pipe, spaces.aoti_capture, *example)
        exported = export_unet(pipe.unet, call, shapes)
        return spaces.aoti_compile(exported, inductor_configs(pipe.device)), call_signature(pipe.unet, call.args, call.kwargs)

    start = time.perf_counter()
    try:
        compiled, signature = on_gpu(compile_on_gpu)
    except Exception as exc:  # export and inductor failures come in many classes (UserError, BackendCompilerFailed, gr.Error, ...)
        return failed(level, f"ahead-of-time compilation failed ({type(exc).__name__}: {str(exc)[:3000]}); plain diffusers", log)
    install(pipe, compiled, signature, shapes)
    seconds = time.perf_counter() - start
    path = f"ahead of time (spaces.aoti) in {seconds:.1f}s: {shapes.describe(int(pipe.vae_scale_factor))}; other shapes run eager"
    log(f"compiled the UNet {path}")
    return Acceleration("compiled", level, "aot", path)


def install(pipe, compiled: Callable, signature: dict[str, Any], shapes: ShapeRange) -> None:
    """The UNet's ``forward`` becomes :class:`AheadOfTimeForward` (its parameters stay: see the module note)."""
    unet = pipe.unet
    eager = type(unet).forward.__get__(unet)
    unet.forward = AheadOfTimeForward(compiled, eager, CoveredCall(unet, signature, shapes))


def failed(level: str, reason: str, log: Callable[[str], None]) -> Acceleration:
    log(reason)
    return Acceleration("failed", level, "none", reason)
