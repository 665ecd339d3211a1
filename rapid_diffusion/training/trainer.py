"""The one diffusion training loop of the runtime: full fine-tuning (no LoRA) with accelerate.

:func:`train` checks the pairs, loads the base, runs the memory preflight, draws the prior pairs
(prior preservation, :mod:`.prior`), then trains the UNet (and the text encoder, by default) on
the user's pairs plus, each step, a batch of prior pairs at the chosen weight
(``core.prior_preservation_loss``). It validates, checkpoints, stops on request and saves the
result as a registered domain; at the end it writes the before/after figures (:mod:`.comparison`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..messages import say as message
from ..models.conditioning import own_conditioning
from .checkpoints import StopRequest, fail, is_disk_full, resume_if_asked, save_checkpoint
from .comparison import finish_comparison
from .core import diffusion_loss, plain_text_encoder, prior_preservation_loss
from .data import DataReport, Pair, check_path
from .dataset import PairDataset, holdout_batch, seeded_batch, split_holdout
from .options import (
    OUTSIDE_SHOWN,
    prior_batch_size,
    TrainConfig,
    TrainingError,
    embedding_lr_scale,
    prior_images,
    unet_timestep_limit,
)
from .preflight import preflight, wants_8bit_adam
from .prior import base_examples, comparison_prompts, generate_prior_pairs, outside_prompts, prior_pairs, prior_plan, wants_prior
from .publish import claim_domain_id, load_fp32_pipeline, resolve_base, save_result
from .run_files import STOP_FILE, RunFiles
from .validation import Sampling, Validator

FIT_PAIRS_WITHOUT_HOLDOUT = 4  # too few pairs to hold any out: the "closer to your pictures" figure uses this many training pairs


@dataclass
class TrainResult:
    state: str
    step: int
    model_dir: Path | None
    domain_id: str | None
    losses: list[float]
    seconds: float


@dataclass
class Run:
    """Everything one run trains with, set up once (what the loop used to thread by hand)."""

    config: TrainConfig
    accelerator: object
    files: RunFiles
    say: object
    base_folder: Path
    base_spec: object
    resolution: int
    native_side: int
    pipe: object
    unet: object
    text_encoder: object
    vae: object
    noise_scheduler: object
    weight_dtype: torch.dtype
    unet_max_timestep: int | None
    knowledge: object = None
    ema: object = None
    prior: PairDataset | None = None
    losses: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.time)

    def model(self) -> tuple:
        """What :func:`.publish.save_result` needs after the config and the accelerator."""
        return self.base_folder, self.unet, self.text_encoder, self.ema, self.resolution, self.base_spec, self.knowledge


def train(config: TrainConfig, report: DataReport | None = None, log=print) -> TrainResult:
    """Run (or resume) a fine-tune; returns when done, stopped, or failed (state says which)."""
    from accelerate import Accelerator

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
        return _train(config, accelerator, files, say, report, stop)
    except BaseException as exc:
        text = fail(files, exc)
        if is_disk_full(exc):
            raise TrainingError(text) from exc
        raise
    finally:
        stop.close()


def _train(config: TrainConfig, accelerator, files: RunFiles, say, report: DataReport | None, stop: StopRequest) -> TrainResult:
    from accelerate.utils import set_seed

    if accelerator.device.type == "cpu" and config.mixed_precision == "fp16":
        raise TrainingError("CPU 不支持 fp16 混合精度 / fp16 mixed precision needs a GPU: use bf16 or no")
    train_pairs, held_out = split_holdout(checked_pairs(config, report, files, say), config)
    config.domain_id = claim_domain_id(config)
    run = load_run(config, accelerator, files, say)
    set_seed(config.seed)
    examples = base_examples(run.base_spec)
    if wants_prior(config):
        run.prior = prior_dataset(run, [pair.text for pair in train_pairs + held_out], examples)
    prepare_models(run)
    optimizer, lr_scheduler = make_optimization(run)
    dataset = PairDataset(train_pairs, run.pipe.tokenizer, run.resolution, config.center_crop, config.random_flip, config.seed, run.knowledge)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size * accelerator.num_processes,
        generator=torch.Generator().manual_seed(config.seed),
    )
    text_is_trained = config.train_text_encoder or run.knowledge is not None
    models = [run.unet, run.text_encoder] if text_is_trained else [run.unet]
    *models, optimizer, loader, lr_scheduler = accelerator.prepare(*models, optimizer, loader, lr_scheduler)
    run.unet = models[0]
    run.text_encoder = models[1] if text_is_trained else run.text_encoder

    step = resume_if_asked(config, accelerator, files, say)
    fit_pairs = held_out or train_pairs[:FIT_PAIRS_WITHOUT_HOLDOUT]
    validator = Validator(
        config, run.pipe, accelerator, files, Sampling.of(config, run.base_spec, run.resolution),
        comparison_prompts(examples, OUTSIDE_SHOWN), run.knowledge, held_out,
        holdout_batch(fit_pairs, run.pipe.tokenizer, run.resolution, run.knowledge), run.vae, run.noise_scheduler, run.weight_dtype,
    )
    if step == 0:
        fit_before = validator.render(0, run.unet, run.text_encoder, run.ema)
        files.update_comparison(fit_on="held_out" if held_out else "training", fit_pairs=len(fit_pairs), fit_loss_before=fit_before)
    files.update(state="running", step=step, resolution=run.resolution, pairs=len(dataset), held_out=len(held_out),
                 prior_pairs=len(run.prior) if run.prior else 0, processes=accelerator.num_processes)
    return loop(run, step, models, optimizer, lr_scheduler, loader, validator, stop)


def loop(run: Run, step: int, models: list, optimizer, lr_scheduler, loader, validator: Validator, stop: StopRequest) -> TrainResult:
    """The steps, from ``step`` to ``max_steps``: loss, optimizer, logging, stop requests, checkpoints, validation."""
    config, accelerator, files = run.config, run.accelerator, run.files
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    updates_per_epoch = max(1, math.ceil(len(loader) / config.gradient_accumulation_steps))
    run_start, run_start_step = time.time(), step
    while step < config.max_steps:
        epoch, done_in_epoch = divmod(step, updates_per_epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, done_in_epoch * config.gradient_accumulation_steps):
            with accelerator.accumulate(*models):
                total, loss, prior_loss = step_loss(run, batch, step)
                if total.requires_grad:  # not when every sample was a noisiest one and the text encoder is frozen
                    accelerator.backward(total)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if run.ema is not None:
                run.ema.step(accelerator.unwrap_model(run.unet).parameters())
            mean_loss = accelerator.gather(loss.detach().reshape(1)).mean().item()
            mean_prior = None if prior_loss is None else accelerator.gather(prior_loss.detach().reshape(1)).mean().item()
            if not all(math.isfinite(value) for value in (mean_loss, mean_prior) if value is not None):
                files.update(state="failed", step=step, message=nan_message(step, mean_loss))
                run.say(nan_message(step, mean_loss))
                return TrainResult("failed", step, None, None, run.losses, time.time() - run.start)
            run.losses.append(mean_loss)
            files.log_loss(step, mean_loss, lr_scheduler.get_last_lr()[0], mean_prior)
            seconds_per_step = (time.time() - run_start) / (step - run_start_step)
            remaining = seconds_per_step * (config.max_steps - step)
            files.update(step=step, loss=mean_loss, eta_seconds=remaining, seconds_per_step=seconds_per_step)
            if should_log(step, config.max_steps):
                run.say(f"step {step}/{config.max_steps} loss {mean_loss:.4f} eta {remaining:.0f}s")
            if stop.requested():
                accelerator.set_trigger()
            if accelerator.check_trigger():
                return finish(run, step, validator, stopped=True)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.max_steps:
                save_checkpoint(accelerator, config.output, step, config.keep_checkpoints)
            if config.validation_every and step % config.validation_every == 0 and step < config.max_steps:
                validator.render(step, run.unet, run.text_encoder, run.ema)
            if step >= config.max_steps:
                break
    return finish(run, step, validator, stopped=False)


def step_loss(run: Run, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss to train on (the user's pairs', plus the prior pairs' at their weight), the user's
    pairs' loss (what is logged and plotted: "loss" means the same with prior preservation on or
    off) and the prior pairs' own loss (None without prior preservation)."""
    common = dict(snr_gamma=run.config.snr_gamma or None, unet_max_timestep=run.unet_max_timestep)
    models = (run.unet, run.text_encoder, run.vae, run.noise_scheduler, run.weight_dtype)
    instance = diffusion_loss(batch, *models, **common)
    if run.prior is None:
        return instance, instance, None
    seed = run.config.seed + step * run.accelerator.num_processes + run.accelerator.process_index
    size = prior_batch_size(len(batch["input_ids"]))
    prior_batch = {k: v.to(run.accelerator.device) for k, v in seeded_batch(run.prior, size, seed).items()}
    prior = diffusion_loss(prior_batch, *models, **common)
    return prior_preservation_loss(instance, prior, run.config.prior_weight), instance, prior


def finish(run: Run, step: int, validator: Validator, stopped: bool) -> TrainResult:
    """Save the model (and, when stopped early, a checkpoint to resume from), then the before/after figures."""
    config, accelerator, files = run.config, run.accelerator, run.files
    if stopped:
        files.update(state="saving", message="正在保存检查点和模型 / stopping: saving a checkpoint and the model")
        save_checkpoint(accelerator, config.output, step, config.keep_checkpoints)
    else:
        files.update(state="saving", step=step, message="正在保存模型 / saving the model")
    fit_after = validator.render(step, run.unet, run.text_encoder, run.ema, final=True)
    model_dir, domain_id = save_result(config, accelerator, *run.model(), stopped=stopped)
    if accelerator.is_main_process:
        finish_comparison(files, run.base_folder, validator.prompts, validator.outside_prompts, fit_after, step)
    seconds = time.time() - run.start
    if stopped:
        text = (f"已在第 {step} 步提前停止，模型已保存可用；可点击「继续训练」 / stopped early at step {step}: "
                "the model so far is saved and usable; resume to continue")
        run.say(f"stopped at step {step}; checkpoint and model saved")
    else:
        text = f"完成：新模型「{config.name or domain_id}」已可在「生成」中使用 / done: the new model is in the Generate tab"
    files.update(state="stopped" if stopped else "done", step=step, model_dir=str(model_dir) if model_dir else None,
                 domain_id=domain_id, seconds=seconds, message=text)
    return TrainResult("stopped" if stopped else "done", step, model_dir, domain_id, run.losses, seconds)


# ----------------------------------------------------------------------------- setting up


def checked_pairs(config: TrainConfig, report: DataReport | None, files: RunFiles, say) -> list[Pair]:
    report = report or check_path(config.data)
    for line in report.lines():
        say(line)
    files.update(state="checking", data=report.summary(), skipped=[i.message for i in report.issues])
    if not report.usable:
        raise TrainingError("没有可用的图文对 / no usable image-text pairs")
    return report.pairs


def load_run(config: TrainConfig, accelerator, files: RunFiles, say) -> Run:
    """The base model on the CPU in fp32, its size, and the memory preflight (which may refuse the run)."""
    from diffusers import DDPMScheduler

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
    run = Run(
        config, accelerator, files, say, folder, base_spec, resolution, native_side, pipe, pipe.unet, pipe.text_encoder, pipe.vae,
        DDPMScheduler.from_config(pipe.scheduler.config),
        {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32),
        unet_timestep_limit(config, native_side),
    )
    limit_unet_timesteps(run)
    return run


def limit_unet_timesteps(run: Run) -> None:
    if run.unet_max_timestep is not None and run.accelerator.num_processes > 1:
        run.say("多进程训练时 UNet 从所有时间步学习 / with several processes the UNet learns from every timestep "
                f"(--unet-max-timestep {run.unet_max_timestep} needs one process: a batch of only the noisiest steps would leave its gradients unsynchronised)")
        run.unet_max_timestep = None
    if run.unet_max_timestep is not None:
        run.say(f"UNet 只从 {run.unet_max_timestep} 以下的时间步学习 / the UNet learns from timesteps below {run.unet_max_timestep} "
                f"of {run.noise_scheduler.config.num_train_timesteps} (the text encoder from all)")


def prior_dataset(run: Run, captions: list[str], examples: list[str]) -> PairDataset:
    """Draw the prior pairs with the base model (the main process; once per run folder), then read them as a dataset."""
    config, accelerator = run.config, run.accelerator
    prompts = outside_prompts(captions, examples)
    plan = prior_plan(prompts, prior_images(run.native_side), config.seed)
    run.say(f"prior preservation ({config.prior_preservation}, weight {config.prior_weight:g}): {len(plan)} pairs from "
            f"{len(prompts)} prompts outside the upload / 保留原有能力：基础模型生成 {len(plan)} 张上传以外的图片")
    if accelerator.is_main_process:
        generate_prior_pairs(run.pipe.components, plan, Sampling.of(config, run.base_spec, run.resolution), accelerator.device,
                             accelerator.autocast, run.files)
    accelerator.wait_for_everyone()
    pairs = prior_pairs(config.output)
    return PairDataset(pairs, run.pipe.tokenizer, run.resolution, center_crop=True, random_flip=False, seed=config.seed)


def prepare_models(run: Run) -> None:
    """Frozen parts to the device (in the mixed precision), trained parts in train mode; knowledge, checkpointing, EMA."""
    from diffusers.training_utils import EMAModel

    config, accelerator = run.config, run.accelerator
    run.vae.requires_grad_(False)
    frozen = [run.vae] if config.train_text_encoder else [run.vae, run.text_encoder]
    for module in frozen:
        module.to(accelerator.device, **({} if run.weight_dtype == torch.float32 else {"dtype": run.weight_dtype}))
    run.text_encoder.requires_grad_(config.train_text_encoder)
    run.unet.train()
    run.text_encoder.train(config.train_text_encoder)
    if config.knowledge is not None:
        from ..knowledge import KNOWLEDGE_DIR, KnowledgeTextEncoder

        run.knowledge = prepare_knowledge(config, run.base_folder, run.text_encoder.config.hidden_size, run.say)
        run.knowledge.injector.to(accelerator.device)
        if accelerator.is_main_process:
            run.knowledge.save(Path(config.output) / KNOWLEDGE_DIR)
        run.say(f"knowledge: {len(run.knowledge.entity_rows)} entities injected / 知识注入：{len(run.knowledge.entity_rows)} 个实体")
        run.text_encoder = KnowledgeTextEncoder(run.text_encoder, run.knowledge.injector)
    if config.gradient_checkpointing:
        run.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            run.text_encoder.gradient_checkpointing_enable()
    if config.use_ema:
        run.ema = EMAModel(run.unet.parameters(), model_cls=type(run.unet), model_config=run.unet.config)
        run.ema.to(accelerator.device)
        accelerator.register_for_checkpointing(run.ema)


def make_optimization(run: Run) -> tuple:
    """The optimizer over the trained parameters (token embeddings at their own rate) and its schedule."""
    from diffusers.optimization import get_scheduler

    config, accelerator = run.config, run.accelerator
    groups = parameter_groups(run.unet, plain_text_encoder(run.text_encoder), config, embedding_lr_scale(config, run.native_side))
    if run.knowledge is not None:
        groups.append({"params": list(run.knowledge.injector.parameters()), "lr": config.projection_lr})
    optimizer = make_optimizer(groups, config, accelerator.device)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler


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


def nan_message(step: int, loss: float) -> str:
    return (
        f"第 {step} 步损失为 NaN/inf，训练已停止 / loss became {loss} at step {step}; "
        "the run stopped. Lower the learning rate, or use bf16 / fp32 instead of fp16."
    )


def should_log(step: int, max_steps: int) -> bool:
    return step == 1 or step == max_steps or step % max(1, max_steps // 20) == 0
