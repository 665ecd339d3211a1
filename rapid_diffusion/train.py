"""Full fine-tuning (no LoRA) of a PAI-Diffusion pipeline on image-text pairs, with accelerate.

The UNet is trained, the text encoder too by default (as in the PAI-Diffusion paper), the VAE
stays frozen. The run folder (``--output``) holds everything a job needs to be watched and
resumed::

    status.json            state, step, loss, ETA, message (rewritten atomically)
    loss.jsonl             one {"step", "loss", "lr"} per optimizer step
    samples/step-000000/   validation images at a fixed seed (step 0 = the base model)
    checkpoints/checkpoint-<step>/   complete accelerate states (written to tmp-*, then renamed)
    knowledge/             with ``--knowledge``: the TransE vectors the run trains against
    model/                 the final diffusers pipeline (safetensors; + knowledge/ with ``--knowledge``)

The result is registered as a domain (``$RAPID_DIFFUSION_HOME/domains/<id>.yaml``). Runs under
``accelerate launch`` with any number of processes: ``python -m rapid_diffusion.train ARGS``.
A ``STOP`` file in the run folder, or SIGTERM, saves a checkpoint and ends the run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from .data import DataReport, Pair, check_path
from .domains import DomainSpec, ModelSource
from .paths import home_dir

STOP_FILE = "STOP"
CHECKPOINT_PREFIX = "checkpoint-"
MIXED_PRECISION = ("no", "fp16", "bf16")


class TrainingError(RuntimeError):
    """The run cannot start or had to stop (bad data, no memory, NaN loss); the message says why."""


@dataclass
class TrainConfig:
    base: str
    data: Path
    output: Path
    max_steps: int = 500
    learning_rate: float = 1e-5
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    resolution: int | None = None
    train_text_encoder: bool = True
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_ema: bool = False
    use_8bit_adam: bool = True
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int | None = None
    max_grad_norm: float = 1.0
    center_crop: bool = True
    random_flip: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 100
    validation_inference_steps: int = 20
    resume: bool = False
    domain_id: str | None = None
    skip_preflight: bool = False
    knowledge: Path | None = None
    knowledge_lr: float | None = None

    def validate(self) -> None:
        """Bounds that keep a request from a browser or an API reasonable; raises TrainingError."""
        checks = [
            (1 <= self.max_steps <= 100_000, "max_steps must be between 1 and 100000"),
            (0 < self.learning_rate <= 1, "learning rate must be in (0, 1]"),
            (1 <= self.batch_size <= 64, "batch size must be between 1 and 64"),
            (1 <= self.gradient_accumulation_steps <= 64, "gradient accumulation must be between 1 and 64"),
            (self.resolution is None or (32 <= self.resolution <= 2048 and self.resolution % 8 == 0),
             "resolution must be a multiple of 8 between 32 and 2048"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed precision must be one of {', '.join(MIXED_PRECISION)}"),
            (self.domain_id is None or re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", self.domain_id) is not None,
             "domain id: lowercase letters, digits, '-' or '_' (max 64)"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise TrainingError("; ".join(problems))

    @property
    def projection_lr(self) -> float:
        """The knowledge projection starts at zero: it gets 10x the model's rate unless told."""
        return self.knowledge_lr if self.knowledge_lr is not None else 10 * self.learning_rate

    @property
    def warmup_steps(self) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else min(100, self.max_steps // 10)


# ----------------------------------------------------------------------------- status files


class RunFiles:
    """The run folder's status, loss history and samples; written by the main process only."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.folder = Path(folder)
        self.enabled = enabled
        self.status: dict = {}
        if enabled:
            self.folder.mkdir(parents=True, exist_ok=True)

    def update(self, **fields) -> None:
        self.status.update(fields, updated_at=time.time())
        if self.enabled:
            write_json_atomic(self.folder / "status.json", self.status)

    def log_loss(self, step: int, loss: float, lr: float) -> None:
        if self.enabled:
            with (self.folder / "loss.jsonl").open("a", encoding="utf-8") as history:
                history.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")

    def truncate_losses(self, after_step: int) -> None:
        """Drop loss entries past a resumed checkpoint, so the history has no repeats."""
        path = self.folder / "loss.jsonl"
        if self.enabled and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
            path.write_text("".join(line + "\n" for line in kept))


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_losses(folder: Path) -> list[dict]:
    path = Path(folder) / "loss.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """The same padding and truncation the pipeline uses at inference."""
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ----------------------------------------------------------------------------- base model


def resolve_base(base: str) -> tuple[Path, DomainSpec | None]:
    """A domain id, a local diffusers folder or a hub id -> the local folder (+ the domain, if any)."""
    from .registry import ModelRegistry, adhoc_spec

    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    if base in registry.domains:
        spec = registry.spec(base)
        return registry.resolve_folder(spec), spec
    return registry.resolve_folder(adhoc_spec(ModelSource.parse(base))), None


def load_base_pipeline(folder: Path):
    """fp32 master weights whatever the checkpoint's dtype (fp16 checkpoints are common)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        dtype=torch.float32,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- knowledge


def prepare_knowledge(config: TrainConfig, base_folder: Path, hidden_size: int, say):
    """The entity knowledge a ``--knowledge`` run trains: the run's own (on resume), else the
    base model's ``knowledge/`` (continued), else TransE trained now on the graph with a zero
    projection. Saved in the run folder so that a resumed run uses the very same vectors."""
    from .knowledge import KNOWLEDGE_DIR, EntityEmbeddings, GraphError, Knowledge, KnowledgeGraph, TransEConfig, has_knowledge, train_transe

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
    from .knowledge import KnowledgeTextEncoder

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
            f"内存预检 / memory preflight on {self.device}: needs about {self.needed_bytes / gib:.1f} GiB, "
            f"available {have}: {'fits / 够用' if self.fits else 'does not fit / 不够'}"
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


def complete_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first; half-written ``tmp-*`` folders never count."""
    root = Path(folder) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def save_checkpoint(accelerator, folder: Path, step: int, keep: int) -> Path:
    """Write to ``tmp-checkpoint-N``, rename when every process is done, then prune old ones."""
    root = Path(folder) / "checkpoints"
    tmp = root / f"tmp-{CHECKPOINT_PREFIX}{step}"
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


def remove_partial_checkpoints(folder: Path) -> None:
    root = Path(folder) / "checkpoints"
    for partial in root.glob(f"tmp-{CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)


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
    files.update(state="preparing", step=0, max_steps=config.max_steps, started_at=time.time(), pid=os.getpid())
    stop = StopRequest(config.output)
    try:
        return _train(config, accelerator, files, say, report, set_seed, stop)
    except TrainingError as exc:
        files.update(state="failed", message=str(exc))
        raise
    except Exception as exc:
        files.update(state="failed", message=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        stop.close()


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

    config.domain_id = claim_domain_id(config)
    folder, base_spec = resolve_base(config.base)
    pipe = load_base_pipeline(folder)
    resolution = config.resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    check = preflight(pipe, config, resolution, accelerator.device, accelerator.num_processes if accelerator.device.type == "cpu" else 1)
    say(check.message())
    files.update(preflight=check.message())
    if not check.fits and not config.skip_preflight:
        raise TrainingError(check.message())

    set_seed(config.seed)
    unet, text_encoder, vae, tokenizer = pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
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
        from .knowledge import KNOWLEDGE_DIR, KnowledgeTextEncoder

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

    trained = list(unet.parameters()) + (list(plain_text_encoder(text_encoder).parameters()) if config.train_text_encoder else [])
    groups = [{"params": trained}]
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
    dataset = PairDataset(report.pairs, tokenizer, resolution, config.center_crop, config.random_flip, config.seed, knowledge)
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
    validator = Validator(config, pipe, accelerator, files, resolution, base_spec, knowledge)
    if step == 0:
        validator.render(0, unet, text_encoder, ema)

    updates_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    losses: list[float] = []
    files.update(state="running", step=step, resolution=resolution, pairs=len(dataset), processes=accelerator.num_processes)
    run_start, run_start_step = time.time(), step
    while step < config.max_steps:
        epoch, done_in_epoch = divmod(step, updates_per_epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * config.gradient_accumulation_steps)
        for batch in batches:
            with accelerator.accumulate(*models):
                loss = diffusion_loss(batch, unet, text_encoder, vae, noise_scheduler, weight_dtype)
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
            eta = (time.time() - run_start) / (step - run_start_step) * (config.max_steps - step)
            files.update(step=step, loss=mean_loss, eta_seconds=eta)
            if main_should_log(step, config.max_steps):
                say(f"step {step}/{config.max_steps} loss {mean_loss:.4f} eta {eta:.0f}s")
            if stop.requested():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                files.update(state="saving", message="stopping: saving a checkpoint / 正在保存检查点")
                save_checkpoint(accelerator, config.output, step, config.keep_checkpoints)
                files.update(state="stopped", message=f"已停止于第 {step} 步 / stopped at step {step}; resume with --resume")
                say(f"stopped at step {step}; checkpoint saved")
                return TrainResult("stopped", step, None, None, losses, time.time() - start)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
                save_checkpoint(accelerator, config.output, step, config.keep_checkpoints)
            if config.validation_every and step % config.validation_every == 0 and step < config.max_steps:
                validator.render(step, unet, text_encoder, ema)
            if step >= config.max_steps:
                break

    files.update(state="saving", step=step, message="saving the model / 正在保存模型")
    validator.render(step, unet, text_encoder, ema, final=True)
    model_dir, domain_id = save_result(config, accelerator, folder, unet, text_encoder, ema, resolution, base_spec, knowledge)
    seconds = time.time() - start
    files.update(
        state="done", step=step, model_dir=str(model_dir) if model_dir else None, domain_id=domain_id, seconds=seconds,
        message=f"完成：新领域「{domain_id}」/ done: new domain '{domain_id}'",
    )
    return TrainResult("done", step, model_dir, domain_id, losses, seconds)


def nan_message(step: int, loss: float) -> str:
    return (
        f"第 {step} 步损失为 NaN/inf，训练已停止 / loss became {loss} at step {step}; "
        "the run stopped. Lower the learning rate, or use bf16 / fp32 instead of fp16."
    )


def main_should_log(step: int, max_steps: int) -> bool:
    return step == 1 or step == max_steps or step % max(1, max_steps // 20) == 0


def make_optimizer(parameters: list, config: TrainConfig, device: torch.device):
    """AdamW over ``parameters`` (tensors or param groups); 8-bit (bitsandbytes) where it is
    installed and a GPU is present."""
    if wants_8bit_adam(config, device):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=1e-2)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-2)


def diffusion_loss(batch, unet, text_encoder, vae, noise_scheduler, weight_dtype) -> torch.Tensor:
    """The standard denoising objective: predict the noise (or v) added at a random timestep.

    Latents are the VAE posterior *mean*: for SD's VAE the posterior variance is tiny (the same as
    sampling), while small VAEs trained with a weak KL term (the demo model's) have a variance
    as large as the signal, and sampling from it would teach the UNet noise.
    """
    pixels = batch["pixel_values"].to(dtype=weight_dtype)
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    latents = latents.float()
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = encode_captions(text_encoder, batch)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, hidden.to(noisy.dtype) if hidden.dtype != noisy.dtype else hidden, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float())


def encode_captions(text_encoder, batch) -> torch.Tensor:
    """Last hidden states; with knowledge, the linked entities' projections are injected."""
    if "entity_ids" in batch:
        return text_encoder(batch["input_ids"], batch["entity_ids"])
    return text_encoder(batch["input_ids"], return_dict=False)[0]


def resume_if_asked(config: TrainConfig, accelerator, files: RunFiles, say) -> int:
    """Load the newest complete checkpoint when ``--resume``; returns the step to continue from."""
    if accelerator.is_main_process:
        remove_partial_checkpoints(config.output)
    accelerator.wait_for_everyone()
    if not config.resume:
        return 0
    found = complete_checkpoints(config.output)
    if not found:
        say("no checkpoint to resume from; starting at step 0 / 没有检查点，从头开始")
        return 0
    accelerator.load_state(str(found[-1]))
    step = checkpoint_step(found[-1])
    files.truncate_losses(step)
    say(f"resumed from {found[-1].name} / 从第 {step} 步继续")
    return step


class Validator:
    """Renders the validation prompts at a fixed seed; step 0 shows the base model (the "before")."""

    def __init__(self, config: TrainConfig, pipe, accelerator, files: RunFiles, resolution: int, base_spec: DomainSpec | None, knowledge=None):
        self.prompts = list(config.validation_prompts)
        self.knowledge = knowledge
        self.seed = config.seed
        self.steps = config.validation_inference_steps
        self.pipe = pipe
        self.accelerator = accelerator
        self.files = files
        self.resolution = resolution
        self.negative_prompt = base_spec.negative_prompt if base_spec else ""
        self.guidance_scale = base_spec.guidance_scale if base_spec else 7.5

    def render(self, step: int, unet, text_encoder, ema, final: bool = False) -> None:
        if not self.prompts:
            return
        if self.accelerator.is_main_process:
            folder = self.files.folder / "samples" / f"step-{step:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(self._images(unet, text_encoder, ema)):
                image.save(folder / f"{i}.png")
            self.files.update(latest_samples=str(folder), **({"final_samples": str(folder)} if final else {}))
        self.accelerator.wait_for_everyone()

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
        from .knowledge import KnowledgeTextEncoder

        encoder = KnowledgeTextEncoder(pipe.text_encoder, self.knowledge.injector)

        def embed(text: str) -> torch.Tensor:
            tokens = self.knowledge.tokenize(pipe.tokenizer, [text])
            device = pipe.text_encoder.device
            return encoder(tokens.input_ids.to(device), tokens.entity_ids.to(device)).to(pipe.text_encoder.dtype)

        return {"prompt_embeds": embed(prompt), "negative_prompt_embeds": embed(self.negative_prompt)}


# ----------------------------------------------------------------------------- result


def save_result(config, accelerator, base_folder: Path, unet, text_encoder, ema, resolution, base_spec, knowledge=None) -> tuple[Path | None, str | None]:
    """Save the pipeline (safetensors, written to ``model.tmp`` then renamed) and register a domain.

    Frozen components are taken from the base folder again, so a mixed-precision run does not
    round them through fp16/bf16.
    """
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None, None
    result = load_base_pipeline(base_folder)
    result.unet = accelerator.unwrap_model(unet).to("cpu")
    if ema is not None:
        ema.copy_to(result.unet.parameters())
    if config.train_text_encoder:
        result.text_encoder = plain_text_encoder(accelerator.unwrap_model(text_encoder)).to("cpu")
    final = Path(config.output) / "model"
    tmp = Path(config.output) / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.save_pretrained(tmp, safe_serialization=True)
    if knowledge is not None:
        from .knowledge import KNOWLEDGE_DIR

        knowledge.save(tmp / KNOWLEDGE_DIR)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    domain_id = write_domain_yaml(config, final, resolution, base_spec, with_knowledge=knowledge is not None)
    return final, domain_id


def default_domain_id(output: Path) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", Path(output).resolve().name.lower()).strip("-_") or "model"
    return f"ft-{slug}"[:64]


def claim_domain_id(config: TrainConfig) -> str:
    """The new domain's id, checked before any training: it never replaces another domain.

    An id the user chose that is taken (by a shipped, configured or earlier fine-tuned domain)
    is refused; a derived id gets a numeric suffix. Re-running or resuming the same output
    folder may keep the id its own earlier run registered.
    """
    from .domains import load_domains, user_domains_dir

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
    base = default_domain_id(config.output)
    candidates = [base] + [f"{base[:60]}-{n}" for n in range(2, 1000)]
    return next(c for c in candidates if c not in taken)


def _registered_by(spec: DomainSpec, config: TrainConfig) -> bool:
    return spec.model.is_local and (Path(config.output) / "model").resolve() == spec.model.path


def write_domain_yaml(config: TrainConfig, model_dir: Path, resolution: int, base_spec: DomainSpec | None, with_knowledge: bool = False) -> str:
    """``$RAPID_DIFFUSION_HOME/domains/<id>.yaml`` for the new model; it shows up in the domain picker."""
    domain_id = config.domain_id or claim_domain_id(config)
    examples = list(dict.fromkeys(list(config.validation_prompts) + list(base_spec.examples if base_spec else ())))
    examples += ["一只猫", "一幅山水画", "一碗面条"][: max(0, 3 - len(examples))]
    base_name = base_spec.title_zh if base_spec else config.base
    data = {
        "id": domain_id,
        "title": {"zh": f"微调：{base_name}", "en": f"Fine-tuned: {base_spec.title_en if base_spec else config.base}"},
        "description": f"Full fine-tune of {config.base} for {config.max_steps} steps on {config.data}",
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
    folder = home_dir() / "domains"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{domain_id}.yaml"
    tmp = folder / f".{domain_id}.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    os.replace(tmp, target)
    return domain_id


def config_from_args(args) -> TrainConfig:
    return TrainConfig(
        base=args.base,
        data=Path(args.data),
        output=Path(args.output),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        resolution=args.resolution,
        train_text_encoder=args.train_text_encoder,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        use_ema=args.ema,
        use_8bit_adam=args.use_8bit_adam,
        lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validation_prompts=list(args.validation_prompt or []),
        validation_every=args.validation_every,
        validation_inference_steps=args.validation_inference_steps,
        resume=args.resume,
        domain_id=args.domain_id,
        skip_preflight=args.skip_preflight,
        knowledge=args.knowledge,
        knowledge_lr=args.knowledge_lr,
    )


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
