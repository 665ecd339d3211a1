"""A single-file Stable Diffusion checkpoint (``.safetensors`` / ``.ckpt``) -> a diffusers pipeline.

The file holds CompVis-named weights only: no architecture, no vocabulary. Like diffusers'
``from_single_file(config=<local diffusers folder>)``, the architecture, tokenizer and scheduler
come from a diffusers folder of the same model family (for PAI models, any PAI-Diffusion
folder: a domain's model serves); the weights are converted with diffusers' LDM key maps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import diffusers
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel

from .factory import assemble_pipeline
from ..messages import say
from .checkpoints import Converted, ImportFailed, key_summary, read_state_dict
from .ldm import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, clip_text_from_ldm, has_ema, unet_from_ldm, vae_from_ldm

CONFIG_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer", "scheduler/scheduler_config.json")
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
SD_GUIDANCE = 7.5


def check_config_folder(folder: Path) -> None:
    missing = [name for name in CONFIG_FILES if not (folder / name).exists()]
    if missing:
        raise ImportFailed(say("import_not_a_config", path=folder, missing=", ".join(missing)))


def convert_single_file(path: Path, config_dir: Path, log: Callable[[str], None]) -> Converted:
    check_config_folder(config_dir)
    log(f"reading {path.name}")
    state = read_state_dict(path)
    if not all(any(k.startswith(prefix) for k in state) for prefix in (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)):
        raise ImportFailed(say("import_not_stable_diffusion", file=path.name, found=key_summary(state)))
    notes = [say("import_note_from", component="architecture, vocabulary / 结构与词表", file=config_dir.name)]
    if has_ema(state):
        notes.append(say("import_note_single_file_ema"))
    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    log("converting the UNet with diffusers' LDM key map")
    unet = unet_from_ldm(state, UNet2DConditionModel.load_config(config_dir, subfolder="unet"), path.name, extract_ema=False)
    log("converting the VAE with diffusers' LDM key map")
    vae = vae_from_ldm(state, AutoencoderKL.load_config(config_dir, subfolder="vae"), path.name)
    log("converting the text encoder with diffusers' CLIP key map")
    text_class = _library_class(transformers, index, "text_encoder", lambda name: name in TEXT_ENCODER_CLASSES)
    text_encoder = clip_text_from_ldm(state, text_class(text_class.config_class.from_pretrained(config_dir / "text_encoder")), path.name)
    tokenizer_class = _library_class(transformers, index, "tokenizer", lambda name: name.endswith(("Tokenizer", "TokenizerFast")))
    scheduler_class = _library_class(diffusers, index, "scheduler", lambda name: name.endswith("Scheduler"))
    pipe = assemble_pipeline(
        {"unet": unet, "vae": vae, "text_encoder": text_encoder},
        tokenizer_class.from_pretrained(config_dir / "tokenizer"),
        scheduler_class.from_pretrained(config_dir / "scheduler"),
    )
    return Converted(pipe, "single-file Stable Diffusion", SD_GUIDANCE, notes=notes)


def _library_class(library, index: dict, component: str, allowed: Callable[[str], bool]):
    """The class ``model_index.json`` names for ``component``, if it is one a Stable Diffusion folder may name."""
    entry = index.get(component)
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else ""
    if not allowed(name) or not hasattr(library, name):
        raise ImportFailed(say("import_bad_config", file="model_index.json", field=component, problem=f"unsupported class {name!r}"))
    return getattr(library, name)
