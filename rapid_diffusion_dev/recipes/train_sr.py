"""The demo domain's own super-resolution model: a compact SRVGG net trained on its world.

Pairs come from :mod:`rapid_diffusion.demo.world`: scenes rendered at 256x256 (HR) and
box-downsampled to 64x64 (LR), which is exactly how the world renders its 64x64 training
images for the demo diffusion model. The loss is MSE: PSNR is the target, and an L1-trained
model draws sharp edges that are sometimes a pixel off, which costs more than Lanczos' blur.
Everything is seeded.

    rapid-diffusion dev train-sr --out rapid_diffusion/data/assets/demo-sr.safetensors --steps 2000 --seed 0
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rapid_diffusion.upscaling.esrgan import SRVGGNetCompact, Upscaler

SCALE = 4
HR_SIZE = 256


@dataclass(frozen=True)
class SRTrainConfig:
    out: Path
    steps: int = 2000
    seed: int = 0
    num_feat: int = 32
    num_conv: int = 8
    train_images: int = 384
    eval_images: int = 32
    batch_size: int = 16
    lr_patch: int = 32
    learning_rate: float = 2e-3


def render_world(count: int, seed: int, split: str) -> list[Image.Image]:
    """``count`` 256x256 world scenes (``split``: "train" or "test")."""
    from rapid_diffusion.demo import world

    images, _, _ = world.sample_batch(np.random.default_rng(seed), count, size=HR_SIZE, split=split)
    return [Image.fromarray(a) for a in images]


def downsample(image: Image.Image, method=Image.BOX) -> Image.Image:
    return image.resize((image.width // SCALE, image.height // SCALE), method)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])).permute(0, 3, 1, 2)


def random_batch(lr: torch.Tensor, hr: torch.Tensor, cfg: SRTrainConfig, gen: torch.Generator):
    """Aligned random crops (LR ``lr_patch``, HR x4) with random flips and 90-degree turns."""
    n, _, h, w = lr.shape
    p = cfg.lr_patch
    idx = torch.randint(n, (cfg.batch_size,), generator=gen)
    ys = torch.randint(h - p + 1, (cfg.batch_size,), generator=gen)
    xs = torch.randint(w - p + 1, (cfg.batch_size,), generator=gen)
    lr_crops, hr_crops = [], []
    for i, y, x in zip(idx.tolist(), ys.tolist(), xs.tolist()):
        a = lr[i, :, y : y + p, x : x + p]
        b = hr[i, :, y * SCALE : (y + p) * SCALE, x * SCALE : (x + p) * SCALE]
        turns = int(torch.randint(4, (1,), generator=gen))
        a, b = torch.rot90(a, turns, (1, 2)), torch.rot90(b, turns, (1, 2))
        if torch.rand(1, generator=gen) < 0.5:
            a, b = a.flip(2), b.flip(2)
        lr_crops.append(a)
        hr_crops.append(b)
    return torch.stack(lr_crops), torch.stack(hr_crops)


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float(10 * math.log10(255.0**2 / max(mse, 1e-10)))


def evaluate(model: torch.nn.Module, hr_images: list[Image.Image]) -> dict[str, float]:
    """Mean PSNR (dB, RGB) of x4 upscales of box-downsampled held-out images."""
    upscaler = Upscaler(model, torch.device("cpu"), torch.float32)
    lows = [downsample(im) for im in hr_images]
    outputs = {
        "esrgan": upscaler(lows)[0],
        "lanczos": [im.resize((HR_SIZE, HR_SIZE), Image.LANCZOS) for im in lows],
        "bicubic": [im.resize((HR_SIZE, HR_SIZE), Image.BICUBIC) for im in lows],
    }
    return {name: float(np.mean([psnr(o, h) for o, h in zip(outs, hr_images)])) for name, outs in outputs.items()}


def train_sr(cfg: SRTrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate on held-out scenes, save safetensors (+ metadata); returns the report."""
    from safetensors.torch import save_file

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    hr_images = render_world(cfg.train_images, cfg.seed, "train")
    hr = to_tensor(hr_images)
    lr = to_tensor([downsample(im) for im in hr_images])
    held_out = render_world(cfg.eval_images, cfg.seed + 1000, "test")

    model = SRVGGNetCompact(cfg.num_feat, cfg.num_conv, SCALE)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.learning_rate, total_steps=cfg.steps, pct_start=0.05)
    model.train()
    for step in range(1, cfg.steps + 1):
        lr_batch, hr_batch = random_batch(lr, hr, cfg, gen)
        loss = F.mse_loss(model(lr_batch), hr_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, cfg.steps // 10) == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps}  mse {loss.item():.6f}  {time.perf_counter() - start:.0f}s")
    model.eval().requires_grad_(False)

    scores = evaluate(model, held_out)
    report = {
        "psnr_esrgan_db": round(scores["esrgan"], 2),
        "psnr_lanczos_db": round(scores["lanczos"], 2),
        "psnr_bicubic_db": round(scores["bicubic"], 2),
        "gain_over_lanczos_db": round(scores["esrgan"] - scores["lanczos"], 2),
        "eval_images": cfg.eval_images,
        "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    recipe = {k: v for k, v in asdict(cfg).items() if k != "out"}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(cfg.out), metadata={"recipe": json.dumps(recipe), "report": json.dumps(report)})
    log(
        f"held-out PSNR ({cfg.eval_images} world images, 64->256): esrgan {report['psnr_esrgan_db']:.2f} dB, "
        f"lanczos {report['psnr_lanczos_db']:.2f} dB, bicubic {report['psnr_bicubic_db']:.2f} dB "
        f"(+{report['gain_over_lanczos_db']:.2f} dB over lanczos)"
    )
    log(f"saved {cfg.out} ({report['parameters']} parameters, {report['train_seconds']}s)")
    return report
