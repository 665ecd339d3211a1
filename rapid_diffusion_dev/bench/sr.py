"""Timing of x4 super-resolution (ESRGAN against the Lanczos baseline), kept out of the
upscaler itself: ``bench --sr`` and ``benchmarks/sr_speed.py`` use it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .pipeline import lanczos_upscaler
from .upscale import DEMO_SR_WEIGHTS, Upscaler, load_sr_model


def benchmark_image(size: int, seed: int = 0) -> Image.Image:
    """A deterministic test card: smooth gradients plus hard-edged blocks."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    array = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1)
    for _ in range(6):
        y, x, s = *rng.integers(0, size, 2), int(rng.integers(size // 8, size // 3))
        array[y : y + s, x : x + s] = rng.integers(0, 256, 3)
    return Image.fromarray(array.astype(np.uint8))


def time_upscaler(upscaler: Callable, size: int = 64, runs: int = 3) -> dict:
    """Seconds per image for ``upscaler`` on a ``size`` x ``size`` input (one warm-up run)."""
    image = benchmark_image(size)
    upscaler([image])
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        images, method = upscaler([image])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {
        "method": method,
        "model": getattr(upscaler, "description", method),
        "device": str(getattr(upscaler, "device", "cpu")),
        "input": f"{size}x{size}",
        "output": f"{images[0].width}x{images[0].height}",
        "runs": runs,
        "mean_s": sum(seconds) / runs,
        "min_s": min(seconds),
    }


def benchmark_sr(
    weights: Path | None = None,
    size: int = 64,
    runs: int = 3,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tile: int | None = 256,
) -> list[dict]:
    """Time ESRGAN (``weights``, default the demo model) and the Lanczos baseline at one size."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    upscaler = Upscaler(load_sr_model(weights or DEMO_SR_WEIGHTS), device, dtype, tile=tile)
    return [time_upscaler(upscaler, size, runs), time_upscaler(lanczos_upscaler, size, runs)]
