"""CompVis/LDM state dicts -> diffusers modules, through diffusers' own single-file conversion.

``diffusers.loaders.single_file_utils`` maps the LDM key names (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) and derives diffusers configs from
an LDM config. What it leaves to the caller is done here: each converted state dict is loaded
*strictly*, so a truncated or mismatched checkpoint fails with the component named instead of
leaving random or empty weights behind.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from ..messages import say
from .checkpoints import ImportFailed

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
# CompVis' openaimodel.UNetModel defaults for fields an LDM config may leave out.
UNET_PARAM_DEFAULTS = {"transformer_depth": 1, "context_dim": None, "num_res_blocks": 2}
# LDM's make_beta_schedule names -> diffusers' beta_schedule (same formulas).
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def has_ema(state: dict[str, torch.Tensor]) -> bool:
    """LitEma keeps a flattened copy of every UNet parameter (``model_ema.diffusion_modelinput_blocks00weight``)."""
    return any(key.startswith(EMA_PREFIX + "diffusion_model") for key in state)


def unet_from_ldm(state: dict[str, torch.Tensor], config: dict, source: str, extract_ema: bool) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_config(config)
    converted = convert_ldm_unet_checkpoint(state, unet.config, extract_ema=extract_ema)
    return load_strict(unet, converted, "UNet", source)


def vae_from_ldm(state: dict[str, torch.Tensor], config: dict, source: str) -> AutoencoderKL:
    vae = AutoencoderKL.from_config(config)
    return load_strict(vae, convert_ldm_vae_checkpoint(state, vae.config), "VAE", source)


def clip_text_from_ldm(state: dict[str, torch.Tensor], text_encoder: torch.nn.Module, source: str) -> torch.nn.Module:
    """SD1's HF-CLIP text encoder (``cond_stage_model.transformer.text_model.*``) into ``text_encoder``.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); single-file keys
    keep it, so it is dropped when the model has none."""
    converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_PREFIX)})
    if not hasattr(text_encoder, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # Older transformers saved the position ids (0, 1, 2, ...) with the weights; they are not weights.
    converted = {k: v for k, v in converted.items() if not k.endswith("embeddings.position_ids")}
    return load_strict(text_encoder, converted, "text encoder", source)


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], component: str, source: str):
    """Every parameter and persistent buffer of ``module`` from ``state``, with matching shapes, or a message."""
    if not state:
        raise ImportFailed(say("import_component_mismatch", source=source, component=component, detail="no weights for it / 没有它的权重"))
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"missing {_first(missing)}" if missing else "", f"unexpected {_first(unexpected)}" if unexpected else "",
                f"shapes {_first(wrong)}" if wrong else ""]
    if any(problems):
        detail = "; ".join(p for p in problems if p)
        raise ImportFailed(say("import_component_mismatch", source=source, component=component, detail=detail))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return module.eval()


def _first(items: list[str], most: int = 3) -> str:
    return ", ".join(items[:most]) + (f" … ({len(items)} in all)" if len(items) > most else "")


def unet_config_from_ldm(ldm_config: dict, state: dict[str, torch.Tensor], file: str) -> dict:
    """diffusers' UNet config for an LDM config (CompVis defaults filled in), sized by the config's ``image_size``."""
    params = ldm_params(ldm_config, file)
    unet_params = _section(params, "unet_config", file)
    for key, value in UNET_PARAM_DEFAULTS.items():
        unet_params.setdefault(key, value)
    config = create_unet_diffusers_config_from_ldm(ldm_config, state)
    if isinstance(params.get("image_size"), int):  # the latent side, e.g. 32 for EasyNLP's 256x256 model
        config["sample_size"] = params["image_size"]
    return config


def vae_config_from_ldm(ldm_config: dict, state: dict[str, torch.Tensor], file: str, latent_size: int) -> dict:
    """diffusers' VAE config; the scale factor a ``scale_by_std`` run stored in the weights wins over the config's."""
    params = ldm_params(ldm_config, file)
    _section(params, "first_stage_config", file)
    scaling = float(state["scale_factor"]) if "scale_factor" in state else None
    config = create_vae_diffusers_config_from_ldm(ldm_config, state, scaling_factor=scaling)
    config["sample_size"] = latent_size * 2 ** (len(config["block_out_channels"]) - 1)
    return config


def scheduler_from_ldm(ldm_config: dict, file: str) -> PNDMScheduler:
    """PNDM (PLMS, as EasyNLP samples) on the training noise schedule of the LDM config."""
    params = ldm_params(ldm_config, file)
    schedule = params.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ImportFailed(say("import_bad_config", file=file, field="model.params.beta_schedule",
                               problem=f"{schedule!r} is not one of {', '.join(BETA_SCHEDULES)}"))
    parameterization = params.get("parameterization", "eps")
    if parameterization not in PREDICTION_TYPES:
        raise ImportFailed(say("import_bad_config", file=file, field="model.params.parameterization",
                               problem=f"{parameterization!r} is not one of {', '.join(PREDICTION_TYPES)}"))
    return PNDMScheduler(
        beta_start=float(params.get("linear_start", 1e-4)),
        beta_end=float(params.get("linear_end", 2e-2)),
        beta_schedule=BETA_SCHEDULES[schedule],
        num_train_timesteps=int(params.get("timesteps", 1000)),
        prediction_type=PREDICTION_TYPES[parameterization],
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def ldm_params(ldm_config: dict, file: str) -> dict:
    params = ldm_config.get("model", {}).get("params") if isinstance(ldm_config.get("model"), dict) else None
    if not isinstance(params, dict):
        raise ImportFailed(say("import_bad_config", file=file, field="model.params", problem="required, a mapping / 必须是映射"))
    return params


def _section(params: dict, name: str, file: str) -> dict:
    section = params.get(name, {}).get("params") if isinstance(params.get(name), dict) else None
    if not isinstance(section, dict):
        raise ImportFailed(say("import_bad_config", file=file, field=f"model.params.{name}.params", problem="required, a mapping / 必须是映射"))
    return section
