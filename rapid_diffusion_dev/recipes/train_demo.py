"""Train the demo model from scratch on the procedural world, on CPU, seeded.

Recipe: (1) an ``AutoencoderKL`` with scale factor 4 (64x64 RGB <-> 16x16x4 latents) on
foreground-weighted reconstruction + a tiny KL term, its posterior started narrow
(``start_posterior_narrow``); (2) the ``UNet2DConditionModel`` and a small ``CLIPTextModel``
jointly on the v-prediction diffusion loss, weighted on and around objects, with 10% empty
captions for classifier-free guidance and an EMA of both.

The noise schedule is DDPM's linear one (betas 1e-4 .. 0.02), not SD1.x's scaled-linear one
(0.00085 .. 0.012), in the same ``PNDMScheduler`` class. At SD's last timestep 6.8% of the
signal is left; for 512x512 images (64x64 latents) that hides the layout, but on 16x16 latents a
whole object still shows through, so a model trained that way learns to read *where* the object
is from the noise and never from the prompt: 左/右/上/下 were ignored and the seed alone decided the
position. DDPM's schedule leaves 0.64%.

The model predicts v (Salimans & Ho 2022), trained with plain MSE. Where the object cannot be seen
in the noise any more, layout has to come from the prompt; but an epsilon loss weighs the error
of the implied clean image there by the SNR (about 1e-4), and min-SNR weighting keeps that, so
such a model never learns 左/右 either. The v loss weighs it by SNR + 1 >= 1.

The result is saved with ``StableDiffusionPipeline.save_pretrained(..., safe_serialization=True)``
in fp32 with the PAI tokenizer (``factory.chinese_vocab()``).

    rapid-diffusion dev train-demo --out rapid_diffusion/data/assets/demo-model --seed 0
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rapid_diffusion.demo import judge, world
from rapid_diffusion.demo.evaluate import split_prompts, vae_colour_error
from rapid_diffusion.models.factory import assemble_pipeline, build_tokenizer, chinese_vocab, pndm_scheduler
from rapid_diffusion.paths import DEMO_MODEL_DIR
from rapid_diffusion.generation.pipeline import tokenize
from rapid_diffusion.training.core import averaged_copy, cosine_schedule, denoising_loss, make_ema

MODEL_MAX_LENGTH = 32


@dataclass
class DemoRecipeConfig:
    """Defaults: the current recipe (v5). v4, the same VAE stage and the same number of diffusion
    steps, took 119 minutes on 2 CPU cores on a day they ran slowly; v5's diffusion stage, 42 minutes
    on a faster day (v4's: 74).

    The diffusion stage runs 13,000 steps of a 15,600-step cosine schedule (v3: 10,000 of 12,000,
    still rising at its end), its loss weighted by ``object_weight`` (``diffusion_weight``); from step 5,000 on,
    every 1,000 steps the EMA weights are judged on the validation split and the best are kept
    (an earlier recipe stopped at 8,000 steps because the *test* eval said so; now nothing is
    chosen on the test split). On a machine whose cores are busy with other jobs, ``threads=1``
    can be the faster choice.
    """

    out: Path = DEMO_MODEL_DIR
    seed: int = 0
    num_scenes: int = 100000
    vae_steps: int = 7000
    vae_batch_size: int = 8
    vae_lr: float = 1e-3
    vae_foreground_weight: float = 10.0
    vae_edge_weight: float = 20.0
    vae_scenes: int = 40000
    vae_off_palette_rate: float = 0.5
    vae_initial_logvar: float = -10.0
    vae_eval_scenes: int = 100  # round trips judged after the VAE stage (and as many off-palette objects)
    object_weight: float = 5.0
    unet_steps: int = 13000
    schedule_steps: int | None = 15600
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    vae_channels: tuple[int, ...] = (32, 64, 64)
    unet_channels: tuple[int, ...] = (32, 64, 96)
    text_hidden: int = 64
    threads: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    device: str = "cpu"
    log_every: int = 50
    validate_every: int = 1000
    select_from: int = 5000
    guidance: float = 5.0
    validation_steps: int = 20
    guidance_choices: tuple[float, ...] = (3.0, 5.0, 7.5)
    init_from: Path | None = None
    vae_from: Path | None = None


def build_vae(channels: tuple[int, ...] = (32, 64, 64)) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        mid_block_add_attention=False,
        norm_num_groups=8,
        sample_size=world.IMAGE_SIZE,
    )


def build_unet(channels: tuple[int, ...] = (32, 64, 96), cross_attention_dim: int = 64) -> UNet2DConditionModel:
    """16x16 -> 8x8 -> 4x4, cross-attention below 16x16. The 4x4 level matters: a conv net only
    knows *where* a pixel is through its borders, and with two levels the model ignored 左/右/上/下."""
    depth = len(channels)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_text_encoder(hidden_size: int = 64) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(chinese_vocab()),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config)


def make_dataset(config: DemoRecipeConfig) -> tuple[np.ndarray, list[world.Scene]]:
    """Training scenes (never a validation or test combination) and their 64x64 renders."""
    rng = np.random.default_rng(config.seed)
    scenes = [world.sample_scene(rng, split="train") for _ in range(config.num_scenes)]
    images = np.stack([np.asarray(world.render(scene)) for scene in scenes])
    return images, scenes


def make_vae_images(config: DemoRecipeConfig) -> np.ndarray:
    """The VAE's own training images: half the objects in random colours (the diffusion data has a
    quarter), since the VAE has to carry any colour a fine-tune may bring, not only the palette."""
    rng = np.random.default_rng(config.seed + 4)
    scenes = (world.sample_scene(rng, split="train", off_palette_rate=config.vae_off_palette_rate) for _ in range(config.vae_scenes))
    return np.stack([np.asarray(world.render(scene)) for scene in scenes])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# The least difference (largest over RGB, in [-1, 1] units) that the VAE's loss counts as an
# object pixel or an outline.
VISIBLE_STEP = 0.1


def foreground_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) booleans: the pixels that differ from their image's border-median background."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return (x - background).abs().amax(dim=1, keepdim=True) > VISIBLE_STEP


def foreground_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): ``weight`` on object pixels (``foreground_mask``), else 1.
    Objects cover a few percent of a 64x64 scene; unweighted, the VAE spends itself on the
    background and blurs the colours and outlines that prompts name."""
    return 1.0 + (weight - 1.0) * foreground_mask(x).float()


def outline_mask(x: torch.Tensor, threshold: float = VISIBLE_STEP) -> torch.Tensor:
    """(B, 1, H, W) booleans: the pixels on either side of a step larger than ``threshold``
    between horizontal or vertical neighbours."""
    mask = torch.zeros_like(x[:, :1], dtype=torch.bool)
    across = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1, keepdim=True) > threshold
    down = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=1, keepdim=True) > threshold
    mask[..., :, 1:] |= across
    mask[..., :, :-1] |= across
    mask[..., 1:, :] |= down
    mask[..., :-1, :] |= down
    return mask


def reconstruction_weight(x: torch.Tensor, foreground: float, edge: float) -> torch.Tensor:
    """The VAE's per-pixel loss weights: ``foreground_weight`` plus ``edge`` on outlines.

    The foreground weight alone left the 2-px spikes of small stars and the arms of small crosses
    to the background's blur: the v3 VAE returned most small stars as pentagons (0-19% right, by
    sample). With +20 on the outline pixels, the v4 VAE's round trips are 100% on every shape and size.
    """
    return foreground_weight(x, foreground) + edge * outline_mask(x).float()


def start_posterior_narrow(vae: AutoencoderKL, logvar: float) -> None:
    """Start the posterior's log-variance at ``logvar`` instead of 0 (std 1).

    With the tiny KL weight nothing pulls the variance down fast: recipes that started at std 1
    ended with posterior noise about as large as the latents' own spread (std 0.74 against 0.63,
    and 0.35 against 0.81), so the decoder learnt to decode through noise and drew small stars,
    diamonds and crosses as blobs, a ceiling on every shape the diffusion model could draw.
    """
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] = logvar


def train_vae(images: np.ndarray, config: DemoRecipeConfig, log: Callable[[str], None]) -> AutoencoderKL:
    vae = build_vae(config.vae_channels).to(config.device).train()
    start_posterior_narrow(vae, config.vae_initial_logvar)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    scheduler = cosine_schedule(optimizer, 100, config.vae_steps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    start = time.time()
    for step in range(config.vae_steps):
        index = torch.randint(len(images), (config.vae_batch_size,), generator=generator).numpy()
        x = to_tensor(images[index]).to(config.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        weight = reconstruction_weight(x, config.vae_foreground_weight, config.vae_edge_weight)
        loss = (weight * (recon - x) ** 2).mean() / weight.mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % config.log_every == 0 or step == config.vae_steps - 1:
            log(f"vae step {step + 1}/{config.vae_steps} loss {loss.item():.5f} ({time.time() - start:.0f}s)")
    return vae.eval()


@torch.no_grad()
def reconstruction_adherence(vae: AutoencoderKL, device: str, num_scenes: int = 100, seed: int = 12345) -> dict[str, float]:
    """The judge's scores on VAE round trips of random palette-coloured objects (what a prompt can
    name): the ceiling the diffusion model can reach."""
    rng = np.random.default_rng(seed)
    totals: dict[str, list[float]] = {"colour": [], "shape": [], "position": []}
    for _ in range(num_scenes):
        scene = world.sample_scene(rng, split="all", max_objects=1, off_palette_rate=0.0)
        x = to_tensor(np.array(world.render(scene))[None]).to(device)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample[0].clamp(-1, 1).add(1).mul(127.5).round()
        image = Image.fromarray(y.permute(1, 2, 0).byte().cpu().numpy())
        scores = judge.score(judge.parse_caption(world.canonical_caption(scene)), judge.judge_image(image))
        for metric in totals:
            if metric in scores:  # an object in an unnamed colour has no colour to judge
                totals[metric].append(scores[metric])
    return {metric: float(np.mean(values)) for metric, values in totals.items()}


@torch.no_grad()
def latent_object_masks(images: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """(N, 1, 16, 16) booleans: the latent cells that hold an object pixel, and their neighbours
    (where the outline is decided)."""
    chunks = []
    for i in range(0, len(images), batch):
        cells = F.max_pool2d(foreground_mask(to_tensor(images[i : i + batch])).float(), 4)
        chunks.append(F.max_pool2d(cells, 3, stride=1, padding=1).bool())
    return torch.cat(chunks)


def diffusion_weight(masks: torch.Tensor, object_weight: float) -> torch.Tensor:
    """The diffusion loss's per-cell weights: ``object_weight`` on and around objects, else 1.

    With the plain mean, the v4 model drew colours and positions right but 8 of the 9 small stars
    in its test eval as blobs: a small object is 2% of the latent cells and its outline less.
    With x5 (v5), 4 of 9, and the test split's shape score went from 86.3% to 92.2%."""
    return 1.0 + (object_weight - 1.0) * masks.float()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, device: str, batch: int = 256) -> torch.Tensor:
    """Posterior means of every training image (unscaled)."""
    chunks = [vae.encode(to_tensor(images[i : i + batch]).to(device)).latent_dist.mean.cpu() for i in range(0, len(images), batch)]
    return torch.cat(chunks)


def demo_scheduler() -> PNDMScheduler:
    """PAI-Diffusion's PNDM settings with DDPM's linear betas and v-prediction (see the module docstring)."""
    return PNDMScheduler.from_config(
        pndm_scheduler().config, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"
    )


def noise_scheduler(folder: Path | None = None) -> DDPMScheduler:
    """The training-time view of the PNDM schedule the pipeline samples with (``folder``'s, if given)."""
    if folder is not None:
        return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    return DDPMScheduler.from_config(demo_scheduler().config)


VALIDATION_METRICS = ("colour", "shape", "position")


@torch.no_grad()
def validation_adherence(vae, unet, text_encoder, tokenizer, guidance: float, steps: int, seed: int = 0) -> dict[str, float]:
    """The judge's mean scores on the validation split's prompts (one image each, seeds ``seed + i``)."""
    pipe = assemble_pipeline({"vae": vae, "unet": unet, "text_encoder": text_encoder}, tokenizer, demo_scheduler())
    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt for prompt, _ in split_prompts("validation")]
    images = pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=world.IMAGE_SIZE,
        width=world.IMAGE_SIZE,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(len(prompts))],
    ).images
    scores = [judge.judge(image, prompt) for image, prompt in zip(images, prompts)]
    return {metric: float(np.mean([s.get(metric, 0.0) for s in scores])) for metric in VALIDATION_METRICS}


def summary(scores: dict[str, float]) -> str:
    return ", ".join(f"{metric} {value:.0%}" for metric, value in scores.items())


def is_validation_step(done: int, config: DemoRecipeConfig) -> bool:
    """The last step, and every ``validate_every`` steps from ``select_from`` on."""
    periodic = config.validate_every and done % config.validate_every == 0 and done >= config.select_from
    return done == config.unet_steps or bool(periodic)


def train_diffusion(latents, masks, scenes, tokenizer, vae, config: DemoRecipeConfig, log: Callable[[str], None], unet=None, text_encoder=None):
    """Train (or, given ``unet`` and ``text_encoder``, continue training) on the diffusion loss,
    weighted by ``diffusion_weight`` of the scenes' ``latent_object_masks``.

    From ``config.select_from`` on, every checkpoint's EMA weights are judged on the validation
    split (never the test split) at ``config.guidance``; the best one is what is returned and saved.
    """
    if unet is None:
        torch.manual_seed(config.seed)  # the same initial weights whether this run trained the VAE or kept one
    unet = (unet or build_unet(config.unet_channels, config.text_hidden)).to(config.device).train()
    text_encoder = (text_encoder or build_text_encoder(config.text_hidden)).to(config.device).train()
    ema_unet, ema_text = make_ema(unet, config.ema_decay), make_ema(text_encoder, config.ema_decay)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    horizon = config.schedule_steps or config.unet_steps
    lr_schedule = cosine_schedule(optimizer, config.warmup_steps, horizon)
    noise_schedule = noise_scheduler()
    rng = np.random.default_rng(config.seed + 2)
    generator = torch.Generator().manual_seed(config.seed + 3)
    start = time.time()
    best = None
    for step in range(config.unet_steps):
        index = rng.integers(len(scenes), size=config.batch_size)
        captions = ["" if rng.random() < config.caption_dropout else world.caption(scenes[i], rng) for i in index]
        ids = tokenize(tokenizer, captions).to(config.device)
        weight = diffusion_weight(masks[index], config.object_weight)
        loss = denoising_loss(unet, noise_schedule, latents[index].to(config.device), text_encoder(ids)[0], generator=generator, weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        if step % config.log_every == 0 or step == config.unet_steps - 1:
            log(f"diffusion step {step + 1}/{config.unet_steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
        if is_validation_step(step + 1, config):
            candidate = averaged_copy(unet, ema_unet).eval(), averaged_copy(text_encoder, ema_text).eval()
            scores = validation_adherence(vae, *candidate, tokenizer, config.guidance, config.validation_steps)
            log(f"validation at step {step + 1}: {summary(scores)}")
            if best is None or sum(scores.values()) > sum(best[2].values()):
                best = (*candidate, scores, step + 1)
                save_pipeline(config.out, vae, *candidate)
                log(f"best so far (step {step + 1}) saved to {config.out}")
    log(f"chosen on validation: step {best[3]} ({summary(best[2])})")
    return best[0], best[1]


def save_pipeline(out: Path, vae, unet, text_encoder) -> None:
    """fp32 copies of the modules on CPU (the originals are left as they are), safetensors."""
    tokenizer = build_tokenizer(out / "tokenizer", model_max_length=MODEL_MAX_LENGTH)
    components = {
        name: copy.deepcopy(module).to("cpu", torch.float32)
        for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))
    }
    assemble_pipeline(components, tokenizer, demo_scheduler()).save_pretrained(out, safe_serialization=True)


def load_modules(folder: Path) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """VAE, UNet and text encoder of a saved demo pipeline, in fp32 (to continue training)."""
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32)
    return vae.eval(), unet, text_encoder


def train_demo(config: DemoRecipeConfig, log: Callable[[str], None] = print) -> Path:
    """Run the whole recipe and write the pipeline folder to ``config.out``.

    With ``config.init_from`` (a pipeline folder) the VAE is kept and the UNet and text encoder
    continue training from that folder's weights; with ``config.vae_from`` only its VAE is kept.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    start = time.time()
    images, scenes = make_dataset(config)
    log(f"rendered {len(scenes)} training scenes ({time.time() - start:.0f}s)")
    unet = text_encoder = None
    if config.init_from:
        vae, unet, text_encoder = load_modules(config.init_from)
        log(f"continuing from {config.init_from}")
    elif config.vae_from:
        vae = AutoencoderKL.from_pretrained(config.vae_from, subfolder="vae", dtype=torch.float32).eval()
        log(f"VAE from {config.vae_from}; UNet and text encoder from scratch")
    else:
        vae = train_vae(make_vae_images(config), config, log)
        ceiling = reconstruction_adherence(vae, config.device, num_scenes=config.vae_eval_scenes)
        log("vae round trip, judged: " + ", ".join(f"{k} {v:.0%}" for k, v in ceiling.items()))
        colour_error = vae_colour_error(vae, num_objects=config.vae_eval_scenes)
        log(f"vae round trip on off-palette colours: mean error {colour_error:.1f} / 255 (median over objects)")
    latents = encode_latents(vae, images, config.device)
    if not (config.init_from or config.vae_from):
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    log(f"latents {tuple(latents.shape)}, scaling_factor {vae.config.scaling_factor:.4f} ({time.time() - start:.0f}s)")
    tokenizer = build_tokenizer(config.out / "tokenizer", model_max_length=MODEL_MAX_LENGTH)
    masks = latent_object_masks(images)
    log(f"objects cover {masks.float().mean():.1%} of the latent cells, with their neighbours ({time.time() - start:.0f}s)")
    unet, text_encoder = train_diffusion(latents, masks, scenes, tokenizer, vae, config, log, unet, text_encoder)
    for guidance in config.guidance_choices:
        log(f"validation at guidance {guidance}: {summary(validation_adherence(vae, unet, text_encoder, tokenizer, guidance, config.validation_steps))}")
    log(f"saved {config.out} ({time.time() - start:.0f}s total)")
    return config.out
