"""Full fine-tuning (no LoRA) of a PAI-Diffusion pipeline on image-text pairs, with accelerate.

The UNet is trained, the text encoder too by default (as in the PAI-Diffusion paper), the VAE
stays frozen. ``--output DIR`` becomes the new model's diffusers pipeline folder, as in diffusers'
own training scripts (``StableDiffusionPipeline.from_pretrained(DIR)``), with the run files and
``checkpoints/`` beside the model (layout: :mod:`rapid_diffusion.training.run_files`). The tokenizer is
saved with ``vocab.txt`` and ``special_tokens_map.json`` too, which transformers 4.x needs.

The options are :class:`rapid_diffusion.training.options.TrainConfig` (one schema: flags, job JSON
and UI defaults). The result is registered as a domain (``$RAPID_DIFFUSION_HOME/domains/<id>.yaml``).
Runs under ``accelerate launch`` with any number of processes: ``python -m rapid_diffusion.training.train ARGS``.
A ``STOP`` file in the run folder, or SIGTERM, saves a checkpoint and the model so far, then ends.
A full disk ends the run ``failed`` with partial files removed; ``--resume`` continues later.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..domains import DomainSpec, ModelSource
from .data import DataReport, Pair, check_path
from ..messages import say as message
from ..models.conditioning import own_conditioning
from .run_files import (
    CHECKPOINT_PREFIX,
    MODEL_TMP,
    STOP_FILE,
    TMP_CHECKPOINT_PREFIX,
    RunFiles,
    checkpoint_step,
    complete_checkpoints,
    read_losses,
)
from ..domains import write_domain_yaml
from ..generation.pipeline import tokenize
from ..models.registry import load_pipeline
from .core import denoising_loss
from .options import TrainConfig, TrainingError, add_arguments, config_from_args, derived_domain_id, embedding_lr_scale, unet_timestep_limit

__all__ = ["TrainConfig", "TrainingError", "TrainResult", "train", "main", "parse_args", "complete_checkpoints", "read_losses"]

DISK_FULL = (
    "磁盘已满，训练已停止；已删除未写完的文件。请释放空间后点击「继续训练」（命令行：--resume） / "
    "disk full: the run stopped and its partial files were removed; free some space, then resume"
)


# ----------------------------------------------------------------------------- data


class PairDataset(torch.utils.data.Dataset):
    """Images resized once (short side = resolution), cropped and flipped per draw, with PIL/numpy."""

    def __init__(self, pairs: list[Pair], tokenizer, resolution: int, center_crop: bool, random_flip: bool, seed: int, knowledge=None):
        self.images = [resize_short_side(pair.image(), resolution) for pair in pairs]
        texts = [pair.text for pair in pairs]
        if knowledge is None:
            self.input_ids, self.entity_ids = tokenize(tokenizer, texts), None
        else:
            tokens = knowledge.tokenize(tokenizer, texts)
            self.input_ids, self.entity_ids = tokens.input_ids, tokens.entity_ids
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = crop(self.images[index], self.resolution, None if self.center_crop else self.rng)
        if self.random_flip and self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        item = {"pixel_values": to_tensor(image), "input_ids": self.input_ids[index]}
        if self.entity_ids is not None:
            item["entity_ids"] = self.entity_ids[index]
        return item


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def crop(image: Image.Image, side: int, rng: random.Random | None) -> Image.Image:
    """A ``side`` square: centred, or at a random offset when ``rng`` is given."""
    dx, dy = image.width - side, image.height - side
    left, top = (rng.randint(0, dx), rng.randint(0, dy)) if rng else (dx // 2, dy // 2)
    return image.crop((left, top, left + side, top + side))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], what the VAE encoder expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- base model


def resolve_base(base: str) -> tuple[Path, DomainSpec | None]:
    """A domain id, a local diffusers folder or a hub id -> the local folder (+ the domain, if any)."""
    from ..models.registry import ModelRegistry, adhoc_spec

    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    if base in registry.domains:
        spec = registry.spec(base)
        return registry.resolve_folder(spec), spec
    return registry.resolve_folder(adhoc_spec(ModelSource.parse(base))), None


# ----------------------------------------------------------------------------- knowledge


def prepare_knowledge(config: TrainConfig, base_folder: Path, hidden_size: int, say):
    """The entity knowledge a ``--knowledge`` run trains: the run's own (on resume), else the
    base model's ``knowledge/`` (continued), else TransE trained now on the graph with a zero
    projection. Saved in the run folder so that a resumed run uses the very same vectors."""
    from ..knowledge import KNOWLEDGE_DIR, EntityEmbeddings, GraphError, Knowledge, KnowledgeGraph, TransEConfig, has_knowledge, train_transe

    try:
        graph = KnowledgeGraph.load(config.knowledge)
        run_copy = Path(config.output) / KNOWLEDGE_DIR
        if config.resume and has_knowledge(Path(config.output)):
            return Knowledge.load(run_copy, config.knowledge)
        if has_knowledge(base_folder):
            say(f"knowledge: continuing the base model's {KNOWLEDGE_DIR}/ / 继续训练基础模型的知识投影")
            return Knowledge.load(base_folder / KNOWLEDGE_DIR, config.knowledge)
        model, loss = train_transe(graph, TransEConfig(seed=config.seed))
    except (GraphError, OSError, KeyError) as exc:
        raise TrainingError(f"知识图谱无法使用 / knowledge graph {config.knowledge}: {exc}") from exc
    say(f"knowledge: TransE on {len(graph.entities)} entities, {len(graph.triples)} triples, loss {loss:.4f}")
    return Knowledge.create(graph, EntityEmbeddings.from_model(model, graph), hidden_size)


def plain_text_encoder(module):
    """The ``CLIPTextModel`` inside a knowledge wrapper (or the module itself)."""
    from ..knowledge import KnowledgeTextEncoder

    return module.text_encoder if isinstance(module, KnowledgeTextEncoder) else module


# ----------------------------------------------------------------------------- memory preflight


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


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(accelerator, folder: Path, step: int, keep: int) -> Path:
    """Write to ``tmp-checkpoint-N``, rename when every process is done, then prune old ones."""
    root = Path(folder) / "checkpoints"
    tmp = root / f"{TMP_CHECKPOINT_PREFIX}{step}"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_partial_files(folder: Path) -> None:
    """Half-written checkpoints and a half-saved model: never used, and they may fill the disk."""
    root = Path(folder) / "checkpoints"
    for partial in root.glob(f"{TMP_CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(Path(folder) / MODEL_TMP, ignore_errors=True)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC (or a quota) anywhere in the chain: torch and safetensors wrap the OSError."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ----------------------------------------------------------------------------- stop requests


class StopRequest:
    """Set by SIGTERM or by a ``STOP`` file in the run folder; ``close`` restores the old handler."""

    def __init__(self, folder: Path):
        self.file = Path(folder) / STOP_FILE
        self.event = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self.event.set())

    def requested(self) -> bool:
        return self.event.is_set() or self.file.exists()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    state: str
    step: int
    model_dir: Path | None
    domain_id: str | None
    losses: list[float]
    seconds: float


def train(config: TrainConfig, report: DataReport | None = None, log=print) -> TrainResult:
    """Run (or resume) a fine-tune; returns when done, stopped, or failed (state says which)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    main = accelerator.is_main_process
    files = RunFiles(config.output, enabled=main)
    say = log if main else (lambda *_: None)
    if main:
        (Path(config.output) / STOP_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    files.update(state="preparing", step=0, max_steps=config.max_steps, started_at=time.time(), pid=os.getpid(), name=config.name)
    stop = StopRequest(config.output)
    try:
        return _train(config, accelerator, files, say, report, set_seed, stop)
    except BaseException as exc:
        message = fail(files, exc)
        if is_disk_full(exc):
            raise TrainingError(message) from exc
        raise
    finally:
        stop.close()


def fail(files: RunFiles, exc: BaseException) -> str:
    """Mark the run failed with a sentence; after a full disk, delete the partial files first."""
    if is_disk_full(exc):
        if files.enabled:
            remove_partial_files(files.folder)
        message = DISK_FULL
    elif isinstance(exc, TrainingError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = "已中断 / interrupted"
    else:
        message = f"{type(exc).__name__}: {exc}"
    try:
        files.update(state="failed", message=message)
    except OSError:
        pass  # the disk is still full: status.json keeps its last complete version
    return message


def split_holdout(pairs: list[Pair], config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Keep a few pairs out of training, seeded: their loss is the validation loss, and their
    captions are the validation prompts (the before/after comparison) unless prompts were given."""
    count = config.holdout
    if count is None:
        count = 4 if len(pairs) >= 32 else 2 if len(pairs) >= 8 else 0
    count = min(count, len(pairs) - 1)
    held = set(random.Random(config.seed).sample(range(len(pairs)), count)) if count > 0 else set()
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def _train(config, accelerator, files: RunFiles, say, report, set_seed, stop: StopRequest) -> TrainResult:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    start = time.time()
    config.validate()
    if accelerator.device.type == "cpu" and config.mixed_precision == "fp16":
        raise TrainingError("CPU 不支持 fp16 混合精度 / fp16 mixed precision needs a GPU: use bf16 or no")
    report = report or check_path(config.data)
    for line in report.lines():
        say(line)
    files.update(state="checking", data=report.summary(), skipped=[i.message for i in report.issues])
    if not report.usable:
        raise TrainingError("没有可用的图文对 / no usable image-text pairs")
    train_pairs, held_out = split_holdout(report.pairs, config)

    config.domain_id = claim_domain_id(config)
    folder, base_spec = resolve_base(config.base)
    pipe = load_fp32_pipeline(folder)
    if own_conditioning(pipe.text_encoder) is not None:
        raise TrainingError(message("finetune_pooled_base", base=config.base))
    native_side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    resolution = config.resolution or native_side
    check = preflight(pipe, config, resolution, accelerator.device, accelerator.num_processes if accelerator.device.type == "cpu" else 1)
    say(check.message())
    files.update(preflight=check.message(), memory_fits=check.fits)
    if not check.fits and not config.skip_preflight:
        raise TrainingError(check.message())

    set_seed(config.seed)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet_max_timestep = unet_timestep_limit(config, native_side)
    if unet_max_timestep is not None and accelerator.num_processes > 1:
        say("多进程训练时 UNet 从所有时间步学习 / with several processes the UNet learns from every timestep "
            f"(--unet-max-timestep {unet_max_timestep} needs one process: a batch of only the noisiest steps would leave its gradients unsynchronised)")
        unet_max_timestep = None
    if unet_max_timestep is not None:
        say(f"UNet 只从 {unet_max_timestep} 以下的时间步学习 / the UNet learns from timesteps below {unet_max_timestep} "
            f"of {noise_scheduler.config.num_train_timesteps} (the text encoder from all)")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    vae.requires_grad_(False)
    frozen = [vae] if config.train_text_encoder else [vae, text_encoder]
    for module in frozen:
        module.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    text_encoder.requires_grad_(config.train_text_encoder)
    unet.train()
    text_encoder.train(config.train_text_encoder)
    knowledge = None
    if config.knowledge is not None:
        from ..knowledge import KNOWLEDGE_DIR, KnowledgeTextEncoder

        knowledge = prepare_knowledge(config, folder, text_encoder.config.hidden_size, say)
        knowledge.injector.to(accelerator.device)
        if accelerator.is_main_process:
            knowledge.save(Path(config.output) / KNOWLEDGE_DIR)
        say(f"knowledge: {len(knowledge.entity_rows)} entities injected / 知识注入：{len(knowledge.entity_rows)} 个实体")
        text_encoder = KnowledgeTextEncoder(text_encoder, knowledge.injector)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    ema = None
    if config.use_ema:
        ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    groups = parameter_groups(unet, plain_text_encoder(text_encoder), config, embedding_lr_scale(config, native_side))
    trained = [p for group in groups for p in group["params"]]
    if knowledge is not None:
        groups.append({"params": list(knowledge.injector.parameters()), "lr": config.projection_lr})
        trained = trained + groups[-1]["params"]
    optimizer = make_optimizer(groups, config, accelerator.device)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    dataset = PairDataset(train_pairs, tokenizer, resolution, config.center_crop, config.random_flip, config.seed, knowledge)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size * accelerator.num_processes,
        generator=torch.Generator().manual_seed(config.seed),
    )
    text_is_trained = config.train_text_encoder or knowledge is not None
    models = [unet, text_encoder] if text_is_trained else [unet]
    *models, optimizer, loader, lr_scheduler = accelerator.prepare(*models, optimizer, loader, lr_scheduler)
    unet = models[0]
    text_encoder = models[1] if text_is_trained else text_encoder

    step = resume_if_asked(config, accelerator, files, say)
    held_batch = holdout_batch(held_out, tokenizer, resolution, knowledge) if held_out else None
    validator = Validator(config, pipe, accelerator, files, resolution, base_spec, knowledge, held_out, held_batch, vae, noise_scheduler, weight_dtype)
    if step == 0:
        validator.render(0, unet, text_encoder, ema)

    updates_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    losses: list[float] = []
    files.update(state="running", step=step, resolution=resolution, pairs=len(dataset), held_out=len(held_out), processes=accelerator.num_processes)
    run_start, run_start_step = time.time(), step
    while step < config.max_steps:
        epoch, done_in_epoch = divmod(step, updates_per_epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * config.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(*models):
                loss = diffusion_loss(batch, unet, text_encoder, vae, noise_scheduler, weight_dtype, snr_gamma=config.snr_gamma or None, unet_max_timestep=unet_max_timestep)
                if loss.requires_grad:  # not when every sample was a noisiest one and the text encoder is frozen
                    accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
            if not math.isfinite(mean_loss):
                files.update(state="failed", step=step, message=nan_message(step, mean_loss))
                say(nan_message(step, mean_loss))
                return TrainResult("failed", step, None, None, losses, time.time() - start)
            losses.append(mean_loss)
            files.log_loss(step, mean_loss, lr_scheduler.get_last_lr()[0])
            remaining = (time.time() - run_start) / (step - run_start_step) * (config.max_steps - step)
            files.update(step=step, loss=mean_loss, eta_seconds=remaining, seconds_per_step=(time.time() - run_start) / (step - run_start_step))
            if main_should_log(step, config.max_steps):
                say(f"step {step}/{config.max_steps} loss {mean_loss:.4f} eta {remaining:.0f}s")
            if stop.requested():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                return finish_early(config, accelerator, files, say, validator, step, (folder, unet, text_encoder, ema, resolution, base_spec, knowledge), losses, start)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
                save_checkpoint(accelerator, config.output, step, config.keep_checkpoints)
            if config.validation_every and step % config.validation_every == 0 and step < config.max_steps:
                validator.render(step, unet, text_encoder, ema)
            if step >= config.max_steps:
                break

    files.update(state="saving", step=step, message="正在保存模型 / saving the model")
    validator.render(step, unet, text_encoder, ema, final=True)
    model_dir, domain_id = save_result(config, accelerator, folder, unet, text_encoder, ema, resolution, base_spec, knowledge)
    seconds = time.time() - start
    files.update(
        state="done", step=step, model_dir=str(model_dir) if model_dir else None, domain_id=domain_id, seconds=seconds,
        message=f"完成：新模型「{config.name or domain_id}」已可在「生成」中使用 / done: the new model is in the Generate tab",
    )
    return TrainResult("done", step, model_dir, domain_id, losses, seconds)


def finish_early(config, accelerator, files, say, validator, step, model, losses, start) -> TrainResult:
    """A stop request: a checkpoint to resume from, and the weights so far as a usable model.

    ``model`` is what :func:`save_result` needs: (base folder, unet, text encoder, ema, resolution,
    base spec, knowledge)."""
    files.update(state="saving", message="正在保存检查点和模型 / stopping: saving a checkpoint and the model")
    save_checkpoint(accelerator, config.output, step, config.keep_checkpoints)
    _, unet, text_encoder, ema, *_ = model
    validator.render(step, unet, text_encoder, ema, final=True)
    model_dir, domain_id = save_result(config, accelerator, *model, stopped=True)
    files.update(
        state="stopped", step=step, model_dir=str(model_dir) if model_dir else None, domain_id=domain_id,
        message=f"已在第 {step} 步提前停止，模型已保存可用；可点击「继续训练」 / stopped early at step {step}: "
                "the model so far is saved and usable; resume to continue",
    )
    say(f"stopped at step {step}; checkpoint and model saved")
    return TrainResult("stopped", step, model_dir, domain_id, losses, time.time() - start)


def nan_message(step: int, loss: float) -> str:
    return (
        f"第 {step} 步损失为 NaN/inf，训练已停止 / loss became {loss} at step {step}; "
        "the run stopped. Lower the learning rate, or use bf16 / fp32 instead of fp16."
    )


def main_should_log(step: int, max_steps: int) -> bool:
    return step == 1 or step == max_steps or step % max(1, max_steps // 20) == 0


def parameter_groups(unet, text_encoder, config: TrainConfig, embedding_scale: float) -> list[dict]:
    """The UNet and (if trained) the text encoder at ``config.learning_rate``; the text encoder's
    token embeddings at ``embedding_scale`` times that (``training.options.EMBEDDING_LR_SCALE``), in a
    group of their own only when the factor is not 1 (so checkpoints of earlier runs still resume)."""
    if not config.train_text_encoder:
        return [{"params": list(unet.parameters())}]
    if embedding_scale == 1.0:
        return [{"params": list(unet.parameters()) + list(text_encoder.parameters())}]
    embeddings = text_encoder.get_input_embeddings().weight
    rest = [p for p in text_encoder.parameters() if p is not embeddings]
    return [
        {"params": list(unet.parameters()) + rest},
        {"params": [embeddings], "lr": embedding_scale * config.learning_rate},
    ]


def make_optimizer(parameters: list, config: TrainConfig, device: torch.device):
    """AdamW over ``parameters`` (tensors or param groups); 8-bit (bitsandbytes) where it is
    installed and a GPU is present."""
    if wants_8bit_adam(config, device):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=1e-2)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-2)


def diffusion_loss(batch, unet, text_encoder, vae, noise_scheduler, weight_dtype, noise=None, timesteps=None, snr_gamma=None, unet_max_timestep=None) -> torch.Tensor:
    """The denoising objective on a batch of pairs (random timesteps, or the given ones).

    Latents are the VAE posterior *mean*: for SD's VAE the posterior variance is tiny (the same as
    sampling), while small VAEs trained with a weak KL term (the demo model's) have a variance
    as large as the signal, and sampling from it would teach the UNet noise.
    """
    pixels = batch["pixel_values"].to(device=vae.device, dtype=weight_dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    return denoising_loss(unet, noise_scheduler, latents, encode_captions(text_encoder, batch), noise, timesteps, snr_gamma=snr_gamma, unet_max_timestep=unet_max_timestep)


def encode_captions(text_encoder, batch) -> torch.Tensor:
    """Last hidden states; with knowledge, the linked entities' projections are injected."""
    if "entity_ids" in batch:
        return text_encoder(batch["input_ids"], batch["entity_ids"])
    return text_encoder(batch["input_ids"], return_dict=False)[0]


def resume_if_asked(config: TrainConfig, accelerator, files: RunFiles, say) -> int:
    """Load the newest complete checkpoint when ``--resume``; returns the step to continue from.
    The loss histories are cut at that step (0 without a checkpoint), so no step appears twice."""
    if accelerator.is_main_process:
        remove_partial_files(config.output)
    accelerator.wait_for_everyone()
    found = complete_checkpoints(config.output) if config.resume else []
    step = 0
    if found:
        accelerator.load_state(str(found[-1]))
        step = checkpoint_step(found[-1])
        say(f"resumed from {found[-1].name} / 从第 {step} 步继续")
    elif config.resume:
        say("no checkpoint to resume from; starting at step 0 / 没有检查点，从头开始")
    files.truncate_losses(step)
    return step


def holdout_batch(pairs: list[Pair], tokenizer, resolution: int, knowledge) -> dict:
    """The held-out pairs as one batch, centre-cropped and never flipped (the same every time)."""
    dataset = PairDataset(pairs, tokenizer, resolution, center_crop=True, random_flip=False, seed=0, knowledge=knowledge)
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])


class Validator:
    """Renders the validation prompts at a fixed seed (step 0 shows the base model, the "before")
    and measures the loss on the held-out pairs at fixed timesteps and noise (comparable over steps)."""

    VALIDATION_TIMESTEPS = (0.1, 0.3, 0.5, 0.7, 0.9)

    def __init__(self, config: TrainConfig, pipe, accelerator, files: RunFiles, resolution: int, base_spec: DomainSpec | None,
                 knowledge=None, held_out=(), held_batch=None, vae=None, noise_scheduler=None, weight_dtype=torch.float32):
        self.prompts = list(config.validation_prompts) or [pair.text for pair in held_out]
        self.knowledge = knowledge
        self.seed = config.seed
        self.steps = config.validation_inference_steps
        self.pipe = pipe
        self.accelerator = accelerator
        self.files = files
        self.resolution = resolution
        self.negative_prompt = base_spec.negative_prompt if base_spec else ""
        self.guidance_scale = base_spec.guidance_scale if base_spec else 7.5
        self.held_batch = held_batch
        self.vae, self.noise_scheduler, self.weight_dtype = vae, noise_scheduler, weight_dtype
        files.update(validation_prompts=self.prompts, validation_seed=self.seed)

    def render(self, step: int, unet, text_encoder, ema, final: bool = False) -> None:
        if self.accelerator.is_main_process:
            if self.held_batch is not None:
                self.files.log_validation_loss(step, self._validation_loss(unet, text_encoder))
            if self.prompts:
                folder = self.files.folder / "samples" / f"step-{step:06d}"
                folder.mkdir(parents=True, exist_ok=True)
                for i, image in enumerate(self._images(unet, text_encoder, ema)):
                    image.save(folder / f"{i}.png")
                self.files.update(latest_samples=str(folder), **({"final_samples": str(folder)} if final else {}))
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def _validation_loss(self, unet, text_encoder) -> float:
        """Mean loss over the held-out pairs x a few fixed timesteps, with seeded noise."""
        unet, text_encoder = self.accelerator.unwrap_model(unet), self.accelerator.unwrap_model(text_encoder)
        modes = [(m, m.training) for m in (unet, text_encoder)]
        for module, _ in modes:
            module.eval()
        try:
            device = self.accelerator.device
            batch = {k: v.to(device) for k, v in self.held_batch.items()}
            total = self.noise_scheduler.config.num_train_timesteps
            generator = torch.Generator().manual_seed(self.seed)
            losses = []
            for fraction in self.VALIDATION_TIMESTEPS:
                size = len(batch["input_ids"])
                timesteps = torch.full((size,), int(fraction * (total - 1)), device=device, dtype=torch.long)
                noise = torch.randn((size, *self._latent_shape()), generator=generator).to(device)
                with self.accelerator.autocast():
                    losses.append(diffusion_loss(batch, unet, text_encoder, self.vae, self.noise_scheduler, self.weight_dtype, noise, timesteps).item())
            return float(np.mean(losses))
        finally:
            for module, was_training in modes:
                module.train(was_training)

    def _latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, side, side

    @torch.no_grad()
    def _images(self, unet, text_encoder, ema) -> list[Image.Image]:
        from diffusers import StableDiffusionPipeline

        unwrapped = self.accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(unwrapped.parameters())
            ema.copy_to(unwrapped.parameters())
        plain = plain_text_encoder(self.accelerator.unwrap_model(text_encoder))
        components = dict(self.pipe.components, unet=unwrapped, text_encoder=plain)
        pipe = StableDiffusionPipeline(**components, requires_safety_checker=False).to(self.accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        modes = [(m, m.training) for m in (unwrapped, components["text_encoder"])]
        for module, _ in modes:
            module.eval()
        try:
            images = []
            for prompt in self.prompts:
                generator = torch.Generator(self.accelerator.device).manual_seed(self.seed)
                with self.accelerator.autocast():
                    images += pipe(
                        **self._prompt_arguments(pipe, prompt),
                        num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale,
                        height=self.resolution,
                        width=self.resolution,
                        generator=generator,
                    ).images
            return images
        finally:
            for module, was_training in modes:
                module.train(was_training)
            if ema is not None:
                ema.restore(unwrapped.parameters())

    def _prompt_arguments(self, pipe, prompt: str) -> dict:
        """The prompt as text, or as embeddings with the entities injected (the way generation does)."""
        if self.knowledge is None:
            return {"prompt": prompt, "negative_prompt": self.negative_prompt or None}
        from ..knowledge import KnowledgeTextEncoder

        encoder = KnowledgeTextEncoder(pipe.text_encoder, self.knowledge.injector)

        def embed(text: str) -> torch.Tensor:
            tokens = self.knowledge.tokenize(pipe.tokenizer, [text])
            device = pipe.text_encoder.device
            return encoder(tokens.input_ids.to(device), tokens.entity_ids.to(device)).to(pipe.text_encoder.dtype)

        return {"prompt_embeds": embed(prompt), "negative_prompt_embeds": embed(self.negative_prompt)}


# ----------------------------------------------------------------------------- result


def save_result(config, accelerator, base_folder: Path, unet, text_encoder, ema, resolution, base_spec, knowledge=None, stopped=False) -> tuple[Path | None, str | None]:
    """Save the pipeline into ``--output`` itself and register a domain.

    The pipeline is written to ``model.tmp`` first, then its folders are moved into the output,
    ``model_index.json`` last (a folder without it is not a model yet); ``model.tmp`` never
    survives, whatever fails. Frozen components are taken from the base folder again, so a
    mixed-precision run does not round them through fp16/bf16.
    """
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None, None
    result = load_fp32_pipeline(base_folder)
    result.unet = accelerator.unwrap_model(unet).to("cpu")
    if ema is not None:
        ema.copy_to(result.unet.parameters())
    if config.train_text_encoder:
        result.text_encoder = plain_text_encoder(accelerator.unwrap_model(text_encoder)).to("cpu")
    output = Path(config.output)
    tmp = output / MODEL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer_for_transformers_4(result.tokenizer, tmp / "tokenizer")
        if knowledge is not None:
            from ..knowledge import KNOWLEDGE_DIR

            knowledge.save(tmp / KNOWLEDGE_DIR)
        publish_pipeline(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    domain_id = register_domain(config, output, resolution, base_spec, with_knowledge=knowledge is not None, stopped=stopped)
    return output, domain_id


def save_tokenizer_for_transformers_4(tokenizer, folder: Path) -> None:
    """``vocab.txt`` + ``special_tokens_map.json`` beside transformers 5's ``tokenizer.json``:
    transformers 4.x's BertTokenizer (EasyNLP, diffusers < 0.36 users) loads only from those."""
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, ensure_ascii=False, indent=1), encoding="utf-8")


def publish_pipeline(tmp: Path, output: Path) -> None:
    """Move a saved pipeline's entries into ``output``; ``model_index.json`` goes first out, last in."""
    (output / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)


def claim_domain_id(config: TrainConfig) -> str:
    """The new domain's id, checked before any training: it never replaces another domain.

    An id the user chose that is taken (by a shipped, configured or earlier fine-tuned domain)
    is refused; a derived id (from the model's name) gets a numeric suffix. Re-running or
    resuming the same output folder keeps the id its own earlier run registered.
    """
    from ..domains import load_domains, user_domains_dir

    taken = {
        spec.id for spec in load_domains().values()
        if not (spec.source_file and spec.source_file.parent == user_domains_dir() and _registered_by(spec, config))
    }
    if config.domain_id is not None:
        if config.domain_id in taken:
            raise TrainingError(
                f"领域 id「{config.domain_id}」已被占用，请换一个 / domain id '{config.domain_id}' is already taken; choose another"
            )
        return config.domain_id
    base = derived_domain_id(config.name, config.output)
    candidates = [base] + [f"{base[:60]}-{n}" for n in range(2, 1000)]
    return next(c for c in candidates if c not in taken)


def _registered_by(spec: DomainSpec, config: TrainConfig) -> bool:
    return spec.model.is_local and Path(config.output).resolve() == spec.model.path


def register_domain(config: TrainConfig, model_dir: Path, resolution: int, base_spec: DomainSpec | None,
                    with_knowledge: bool = False, stopped: bool = False) -> str:
    """The new model's domain YAML; the picker shows "<name>（基于 <base>）"."""
    domain_id = config.domain_id or claim_domain_id(config)
    examples = list(dict.fromkeys([*config.validation_prompts, *read_status_prompts(config), *(base_spec.examples if base_spec else ())]))
    examples += ["一只猫", "一幅山水画", "一碗面条"][: max(0, 3 - len(examples))]
    name = (config.name or Path(config.output).name).strip()
    base_zh, base_en = (short_title(base_spec.title_zh), short_title(base_spec.title_en)) if base_spec else (config.base, config.base)
    zh = f"{name}（基于 {base_zh}）" + ("·提前停止" if stopped else "")
    en = f"{name} (based on {base_en})" + (" · stopped early" if stopped else "")
    data = {
        "title": {"zh": zh, "en": en},
        "description": finetune_description(base_zh, base_en, len(read_losses(config.output)), stopped),
        "model": {"path": str(Path(model_dir).resolve())},
        "examples": examples,
        "height": max(64, resolution // 8 * 8),
        "width": max(64, resolution // 8 * 8),
        "offline_ready": True,
    }
    if with_knowledge:
        data["knowledge_graph"] = str((Path(model_dir) / "knowledge").resolve())
    if base_spec:
        data.update(
            num_inference_steps=base_spec.num_inference_steps,
            guidance_scale=base_spec.guidance_scale,
            sampler=base_spec.sampler,
            negative_prompt=base_spec.negative_prompt,
        )
    write_domain_yaml(domain_id, data)
    return domain_id


def finetune_description(base_zh: str, base_en: str, steps: int, stopped: bool) -> str:
    """The model card's line, Chinese first: what it was tuned from and for how long."""
    zh = f"在「{base_zh}」上用你的图文对完整微调 {steps} 步" + ("（提前停止）" if stopped else "")
    en = f"full fine-tune of {base_en} on {steps} steps of your pairs" + (" (stopped early)" if stopped else "")
    return f"{zh} / {en}"


def short_title(title: str) -> str:
    """"演示（几何图形）" -> "演示", "Demo (shapes)" -> "Demo": no brackets inside the new title's brackets."""
    return re.sub(r"\s*[（(][^（）()]*[）)]$", "", title) or title


def read_status_prompts(config: TrainConfig) -> list[str]:
    """The validation prompts the run used (the held-out captions, when none were given)."""
    from .run_files import read_status

    return [p for p in read_status(config.output).get("validation_prompts", []) if p.strip()]


# ----------------------------------------------------------------------------- entry point


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="rapid-diffusion train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags (and ``--config run.json``) -> TrainConfig, like diffusers' training scripts."""
    return config_from_args(build_parser().parse_args(argv))


def run(config: TrainConfig) -> int:
    """Train and print where the model went; exit status 0 done, 3 stopped, 1 failed."""
    result = train(config)
    if result.model_dir is not None:
        print(f"model: {result.model_dir}")
        print(f"domain: {result.domain_id}")
    return {"done": 0, "stopped": 3}.get(result.state, 1)


def main(argv: list[str] | None = None) -> int:
    from ..models.registry import ModelUnavailableError

    try:
        return run(parse_args(argv))
    except (TrainingError, ModelUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def load_fp32_pipeline(folder: Path):
    """The base as fp32 master weights on the CPU whatever the checkpoint's dtype (accelerate moves
    what trains), through the one loader the registry uses: safetensors or ``weights_only``."""
    return load_pipeline(folder, torch.device("cpu"), torch.float32)


if __name__ == "__main__":
    sys.exit(main())
