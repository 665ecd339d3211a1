"""Build PAI-Diffusion-class pipelines in code: a Chinese BERT vocabulary, tiny test models,
and the exact SD1.5 / PAI-large configurations with random weights (for GPU benchmarks).

PAI-Diffusion checkpoints are ``StableDiffusionPipeline`` folders made of
``CLIPTextModel`` + ``BertTokenizer`` + ``UNet2DConditionModel`` + ``AutoencoderKL`` + PNDM.
Everything built here uses exactly those classes, so what works on these works on them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import BertTokenizer, CLIPTextConfig, CLIPTextModel

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CJK_RANGE = (0x4E00, 0x9FFF)
CHINESE_PUNCTUATION = "，。、；：？！“”‘’（）《》【】—…·"


def chinese_vocab() -> list[str]:
    """Special tokens, ASCII (with WordPiece continuations), Chinese punctuation and every CJK Unified Ideograph (one token each)."""
    ascii_tokens = [chr(c) for c in range(33, 127)]
    continuations = ["##" + chr(c) for c in range(33, 127) if chr(c).isalnum()]
    cjk = [chr(c) for c in range(CJK_RANGE[0], CJK_RANGE[1] + 1)]
    return SPECIAL_TOKENS + ascii_tokens + continuations + list(CHINESE_PUNCTUATION) + cjk


def build_tokenizer(folder: Path, model_max_length: int = 32) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(chinese_vocab()) + "\n", encoding="utf-8")
    vocab = {token: i for i, token in enumerate(chinese_vocab())}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)


def tiny_components(seed: int = 0, model_max_length: int = 32, sample_size: int = 64) -> dict:
    """Random-weight components small enough for unit tests (about 1M parameters)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(chinese_vocab()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=model_max_length,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text_config)}


def sd15_components(seed: int = 0, model_max_length: int = 32) -> dict:
    """The exact SD1.5 / PAI-Diffusion-large UNet, VAE and text-encoder shapes, random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_config = CLIPTextConfig(
        vocab_size=21128,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=model_max_length,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text_config)}


def pndm_scheduler() -> PNDMScheduler:
    """The scheduler configuration PAI-Diffusion and SD1.x ship with."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def assemble_pipeline(components: dict, tokenizer: BertTokenizer, scheduler: PNDMScheduler | None = None) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        **components,
        tokenizer=tokenizer,
        scheduler=scheduler or pndm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_pipeline(folder: Path, size: str = "tiny", seed: int = 0, model_max_length: int = 32) -> StableDiffusionPipeline:
    """Build a random-weight pipeline of the PAI classes and save it (safetensors) in ``folder``."""
    builders = {"tiny": tiny_components, "sd15": sd15_components}
    if size not in builders:
        raise ValueError(f"size must be one of {', '.join(builders)}, got {size!r}")
    tokenizer = build_tokenizer(folder / "tokenizer", model_max_length=model_max_length)
    pipe = assemble_pipeline(builders[size](seed=seed, model_max_length=model_max_length), tokenizer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe
