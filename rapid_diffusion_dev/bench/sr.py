"""Timing of x4 super-resolution (ESRGAN against the Lanczos baseline), kept out of the upscaler
itself, and the paper's setting as a command: the 23-block RRDBNet (RealESRGAN_x4plus's shape).

Without ``--weights`` the network has random weights: its time does not depend on their values,
and nothing needs downloading. On CUDA it runs in fp16 (what the registry uses), fp32 beside it.

    python -m rapid_diffusion_dev.bench.sr --device cuda --size 256 --json sr.json     # 256 -> 1024
    python -m rapid_diffusion_dev.bench.sr --device cpu --size 64                       # 64 -> 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from rapid_diffusion.generation.pipeline import lanczos_upscaler
from rapid_diffusion.upscaling.esrgan import DEMO_SR_WEIGHTS, Upscaler, load_sr_model

from .speed import bench_upscaler


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Super-resolution speed at the paper's setting (23-block RRDBNet, x4).")
    parser.add_argument("--weights", type=Path, default=None, help="an ESRGAN checkpoint (default: random 23-block RRDBNet)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="input side in pixels (output is 4x)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tile", type=int, default=256, help="tile side in input pixels (0: whole image)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtypes = [torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]
    results = []
    for dtype in dtypes:
        upscaler = bench_upscaler(str(args.weights or "rrdb23"), device, dtype, tile=args.tile or None)
        with torch.inference_mode():
            record = time_upscaler(upscaler, size=args.size, runs=args.runs)
        record["dtype"] = str(dtype).removeprefix("torch.")
        record["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        results.append(record)
        print(f"{record['model']} {record['dtype']} on {record['device']}: {record['input']} -> {record['output']} "
              f"mean {record['mean_s']:.3f} s, min {record['min_s']:.3f} s ({args.runs} runs)")
    if len(results) == 2:
        print(f"fp16 vs fp32: {results[1]['mean_s'] / results[0]['mean_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
