"""An EasyNLP latent-diffusion fine-tune folder (``examples/latent_diffusion``) -> a diffusers pipeline.

The folder, as ``easynlp/appzoo/latent_diffusion/model.py`` reads it:

- ``config.json``: the LDM config as JSON (``model.params`` with ``unet_config``,
  ``first_stage_config``, ``cond_stage_config``, the noise schedule, ``scale_factor``);
- ``pytorch_model.bin``: ``{"state_dict": ...}`` with CompVis keys (``model.diffusion_model.*``,
  LitEma's ``model_ema.*``, and usually ``first_stage_model.*`` and ``cond_stage_model.model.*``);
- ``first_stage_kl_f8.ckpt`` (the VAE alone) and ``wukong_vit_l_14_clip/`` (the Wukong CLIP:
  ``config.json`` with ``model.text``, ``pytorch_model.bin`` with ``model.text_encoder.*``): older
  EasyNLP versions built the VAE and text encoder from these, then loaded ``pytorch_model.bin``
  over them, so its keys win and these files only fill in what it lacks;
- ``vocab.txt`` (at the top, or in ``wukong_vit_l_14_clip/`` in older folders);
- ``RRDB_ESRGAN_x4.pth``: the x4 super-resolution model (optional here).

EasyNLP samples inside ``ema_scope()``: with ``use_ema`` (its default) the EMA weights are the
model, so they are what is converted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .factory import assemble_pipeline
from ..messages import say
from .checkpoints import Converted, ImportFailed, find_weights, key_summary, read_state_dict, require_weights, unread_weights
from .ldm import (
    UNET_PREFIX,
    VAE_PREFIX,
    has_ema,
    ldm_params,
    scheduler_from_ldm,
    unet_config_from_ldm,
    unet_from_ldm,
    vae_config_from_ldm,
    vae_from_ldm,
)
from .wukong import WUKONG_PREFIX, wukong_text_encoder, wukong_text_parts

CONFIG = "config.json"
WUKONG_DIR = "wukong_vit_l_14_clip"
SR_STEM = "RRDB_ESRGAN_x4"
EASYNLP_GUIDANCE = 5.0  # LatentDiffusion's default ``scale``


def read_config(folder: Path) -> dict | None:
    """``config.json`` when it is an LDM config (``model.params`` with first- and cond-stage configs), else None."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    params = config.get("model", {}).get("params") if isinstance(config, dict) and isinstance(config.get("model"), dict) else None
    if isinstance(params, dict) and "first_stage_config" in params and "cond_stage_config" in params:
        return config
    return None


def convert_easynlp(folder: Path, config: dict, log: Callable[[str], None]) -> Converted:
    notes: list[str] = []
    weights = require_weights(folder, "pytorch_model", ("扩散模型权重", "diffusion weights"))
    log(f"reading {weights.name}")
    state = read_state_dict(weights)
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ImportFailed(say("import_component_mismatch", source=weights.name, component="UNet",
                               detail=f"no {UNET_PREFIX}* keys; it holds {key_summary(state)}"))
    state.update(_separate_vae(folder, state, notes, log))
    params = ldm_params(config, CONFIG)
    cond = params["cond_stage_config"].get("params", {}) if isinstance(params["cond_stage_config"], dict) else {}
    text_params, wukong_state = _wukong_parts(folder, cond, state, notes, log)
    state.update(wukong_state)

    extract_ema = bool(params.get("use_ema", True)) and has_ema(state)
    notes.append(say("import_note_ema" if extract_ema else "import_note_no_ema"))
    log("converting the UNet with diffusers' LDM key map" + (" (EMA weights)" if extract_ema else ""))
    unet = unet_from_ldm(state, unet_config_from_ldm(config, state, CONFIG), weights.name, extract_ema)
    log("converting the VAE with diffusers' LDM key map")
    vae = vae_from_ldm(state, vae_config_from_ldm(config, state, CONFIG, unet.config.sample_size), weights.name)
    log("converting the Wukong text encoder")
    tokenizer, text_config = wukong_text_parts(text_params, _vocab(folder), bool(cond.get("normalize", True)), int(cond.get("n_repeat", 1)), CONFIG)
    text_encoder = wukong_text_encoder(state, text_config, weights.name)
    pipe = assemble_pipeline({"unet": unet, "vae": vae, "text_encoder": text_encoder}, tokenizer, scheduler_from_ldm(config, CONFIG))
    return Converted(pipe, "EasyNLP latent diffusion", EASYNLP_GUIDANCE, _sr_weights(folder, notes), notes)


def _separate_vae(folder: Path, state: dict, notes: list[str], log) -> dict[str, torch.Tensor]:
    """``first_stage_kl_f8.*`` under ``first_stage_model.`` when ``pytorch_model`` has no VAE keys."""
    if any(k.startswith(VAE_PREFIX) for k in state):
        return {}
    path = require_weights(folder, "first_stage_kl_f8", ("VAE（first stage）权重", "first-stage (VAE) weights"))
    log(f"reading {path.name}")
    notes.append(say("import_note_from", component="VAE", file=path.name))
    return {VAE_PREFIX + k: v for k, v in read_state_dict(path).items() if not k.startswith("loss.")}


def _wukong_parts(folder: Path, cond: dict, state: dict, notes: list[str], log) -> tuple[dict, dict[str, torch.Tensor]]:
    """The text encoder's parameters (``cond_stage_config.params.text_encoder``, or the Wukong folder's
    ``model.text``) and, when ``pytorch_model`` lacks them, its weights from the Wukong folder."""
    wukong_dir = folder / WUKONG_DIR
    params = cond.get("text_encoder") or _wukong_folder_params(wukong_dir)
    if any(k.startswith(WUKONG_PREFIX) for k in state):
        return params, {}
    path = require_weights(wukong_dir, "pytorch_model", (f"悟空文本编码器权重（{WUKONG_DIR}/）", f"Wukong text encoder weights ({WUKONG_DIR}/)"))
    log(f"reading {WUKONG_DIR}/{path.name}")
    notes.append(say("import_note_from", component="text encoder / 文本编码器", file=f"{WUKONG_DIR}/{path.name}"))
    prefix = "model.text_encoder."
    return params, {WUKONG_PREFIX + k.removeprefix(prefix): v for k, v in read_state_dict(path).items() if k.startswith(prefix)}


def _wukong_folder_params(wukong_dir: Path) -> dict:
    try:
        text = json.loads((wukong_dir / CONFIG).read_text(encoding="utf-8"))["model"]["text"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImportFailed(say("import_missing", role_zh="文本编码器参数", role_en="text encoder parameters",
                               expected=f"{CONFIG}: model.params.cond_stage_config.params.text_encoder, or {WUKONG_DIR}/{CONFIG}: model.text")) from exc
    return text


def _vocab(folder: Path) -> Path:
    for candidate in (folder / "vocab.txt", folder / WUKONG_DIR / "vocab.txt"):
        if candidate.is_file():
            return candidate
    raise ImportFailed(say("import_missing", role_zh="词表", role_en="vocabulary", expected=f"vocab.txt or {WUKONG_DIR}/vocab.txt"))


def _sr_weights(folder: Path, notes: list[str]) -> Path | None:
    found = find_weights(folder, SR_STEM)
    if found is None:
        other = unread_weights(folder, SR_STEM)
        notes.append(say("import_note_sr_unread", file=other.name) if other else say("import_note_no_sr", file=f"{SR_STEM}.pth"))
    return found
