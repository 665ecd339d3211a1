"""The memory preflight: a rough upper estimate of what training needs, against what is free, with advice."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .options import TrainConfig


@dataclass(frozen=True)
class Preflight:
    needed_bytes: int
    available_bytes: int | None
    device: str
    advice: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.needed_bytes <= self.available_bytes

    def message(self) -> str:
        gib = 2**30
        have = f"{self.available_bytes / gib:.1f} GiB" if self.available_bytes is not None else "unknown"
        head = (
            f"内存检查：训练约需 {self.needed_bytes / gib:.1f} GiB，可用 {have}，{'够用' if self.fits else '不够'} / "
            f"memory check on {self.device}: needs about {self.needed_bytes / gib:.1f} GiB, "
            f"available {have}: {'fits' if self.fits else 'does not fit'}"
        )
        if self.fits:
            return head
        return head + "\n" + "\n".join(f"  - {line}" for line in self.advice)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def estimate_memory(pipe, config: TrainConfig, resolution: int, device: torch.device, eight_bit: bool) -> int:
    """A rough upper estimate of training memory: weights, gradients, optimizer, EMA, activations.

    Activations are scaled from SD1.5 (about 8 GiB at 512 px, batch 1, fp32, no checkpointing).
    """
    low_precision = config.mixed_precision in ("fp16", "bf16")
    trained = count_parameters(pipe.unet) + (count_parameters(pipe.text_encoder) if config.train_text_encoder else 0)
    frozen = count_parameters(pipe.vae) + (0 if config.train_text_encoder else count_parameters(pipe.text_encoder))
    optimizer_bytes = 2 if eight_bit else 8
    total = trained * (4 + 4 + optimizer_bytes) + frozen * (2 if low_precision else 4)
    if config.use_ema:
        total += count_parameters(pipe.unet) * 4
    width = pipe.unet.config.block_out_channels[0]
    activations = 8 * 2**30 * config.batch_size * (resolution / 512) ** 2 * (width / 320)
    activations /= 4 if config.gradient_checkpointing else 1
    activations /= 2 if low_precision else 1
    return int(total + activations)


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def preflight(pipe, config: TrainConfig, resolution: int, device: torch.device, processes_per_device: int = 1) -> Preflight:
    eight_bit = wants_8bit_adam(config, device)
    needed = estimate_memory(pipe, config, resolution, device, eight_bit) * processes_per_device
    advice = []
    if not config.gradient_checkpointing:
        advice.append("开启梯度检查点 / turn on --gradient-checkpointing (about 4x less activation memory)")
    if config.mixed_precision == "no":
        advice.append("使用混合精度 / use --mixed-precision bf16 (or fp16 on older GPUs)")
    if device.type == "cuda" and not eight_bit:
        advice.append("安装 bitsandbytes 以使用 8-bit AdamW / install bitsandbytes for 8-bit AdamW")
    if config.use_ema:
        advice.append("关闭 EMA / drop --ema")
    if config.train_text_encoder:
        advice.append("不训练文本编码器 / --no-train-text-encoder")
    if config.batch_size > 1:
        advice.append("减小批大小，用梯度累积代替 / lower --batch-size and raise --gradient-accumulation-steps")
    advice.append(f"降低分辨率 / lower --resolution (now {resolution})")
    return Preflight(needed, available_memory(device), str(device), tuple(advice))


def wants_8bit_adam(config: TrainConfig, device: torch.device) -> bool:
    if not config.use_8bit_adam or device.type != "cuda":
        return False
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True

