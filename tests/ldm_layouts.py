"""Write a diffusers PAI-class pipeline out in the layouts people have it in, for the import tests.

Independent of the importer: the key names are written here from the original modules' own
attribute names (CompVis ``openaimodel.UNetModel`` and ``autoencoder.Encoder/Decoder``, HF CLIP
under ``FrozenCLIPEmbedder.transformer``, EasyNLP's ``TextTransformer``, ESRGAN's
``RRDBNet_arch``), walking the *diffusers* modules forwards. The importer goes the other way
through diffusers' ``convert_ldm_*`` functions and one key rename; nothing here calls them or
the importer. EasyNLP's conditioning (the projected, normalised ``[SEP]`` state) is computed
here from the written Wukong weights with ``torch.nn.functional``, as ``TextTransformer.forward``
does, without transformers' CLIP classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rapid_diffusion.models.factory import assemble_pipeline, build_tokenizer, chinese_vocab, pndm_scheduler

IMAGE_SIDE = 64
WUKONG_EPS = 1e-7


def compvis_pipeline(folder: Path, seed: int = 0):
    """A tiny pipeline of the PAI classes that the CompVis modules can express (GroupNorm of 32, as
    CompVis hard-codes), saved in diffusers format in ``folder``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIDE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        sample_size=IMAGE_SIDE, block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(chinese_vocab()), hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=2, eos_token_id=3, layer_norm_eps=WUKONG_EPS,
    ))
    _randomise_norms(unet, vae, text)
    pipe = assemble_pipeline({"unet": unet, "vae": vae, "text_encoder": text}, build_tokenizer(folder / "tokenizer"), pndm_scheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomise_norms(*modules) -> None:
    """Fresh models have every norm at (1, 0) and zero biases: all alike, so two of them swapped
    would go unseen. Random values there make a swapped or dropped tensor visible in the pixels."""
    with torch.no_grad():
        for module in modules:
            for parameter in module.parameters():
                if parameter.ndim == 1 or torch.count_nonzero(parameter) == 0:
                    parameter.add_(torch.randn_like(parameter) * 0.1)


# ----------------------------------------------------------------------------- CompVis key names

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_compvis(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*``: openaimodel's input_blocks / middle_block / output_blocks.

    Input block 0 is ``conv_in``; then per level ``layers_per_block`` blocks of [ResBlock,
    SpatialTransformer?] and, except at the last level, one ``Downsample`` (``.op``); the output
    blocks run the levels backwards with one block more each, the ``Upsample`` after the last."""
    per_level = unet.config.layers_per_block + 1
    attention_levels = {i for i, kind in enumerate(unet.config.up_block_types) if kind.startswith("CrossAttn")}
    fixed = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    out = {}
    for key, value in unet.state_dict().items():
        head = next((k for k in fixed if key.startswith(k)), None)
        if head:
            name = fixed[head] + key[len(head):]
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"input_blocks.{1 + level * per_level + j}." + _block(kind, rest)
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
            name = f"middle_block.{2 * int(m[1])}." + _resnet(m[2])
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            name = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            name = f"output_blocks.{level * per_level + j}." + _block(kind, rest)
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m[1])
            name = f"output_blocks.{level * per_level + per_level - 1}.{2 if level in attention_levels else 1}.conv.{m[2]}"
        else:
            raise AssertionError(f"no CompVis name for UNet key {key}")
        out["model.diffusion_model." + name] = value
    return out


def _block(kind: str, rest: str) -> str:
    return "0." + _resnet(rest) if kind == "resnets" else "1." + rest


def _resnet(rest: str) -> str:
    module, _, tail = rest.partition(".")
    return f"{RESNET[module]}.{tail}"


def vae_to_compvis(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """``first_stage_model.*``: autoencoder.Encoder ``down.i.block.j`` / Decoder ``up.i`` (numbered
    from the lowest resolution up, where diffusers' up_blocks start at the top), ``mid.block_1/2``,
    ``mid.attn_1`` (1x1 convs where diffusers has linear layers), ``norm_out``, ``nin_shortcut``."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", name):
            inner = f"block.{m[3]}" if m[3] is not None else "downsample"
            name = f"encoder.down.{m[1]}.{inner}.{m[4]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", name):
            inner = f"block.{m[3]}" if m[3] is not None else "upsample"
            name = f"decoder.up.{levels - 1 - int(m[1])}.{inner}.{m[4]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
            name = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def clip_to_sd1(text: CLIPTextModel) -> dict[str, torch.Tensor]:
    """SD1's ``FrozenCLIPEmbedder``: the HF CLIPTextModel under ``cond_stage_model.transformer.text_model.``."""
    return {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in text.state_dict().items()}


def clip_to_wukong(text: CLIPTextModel, projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """EasyNLP's ``TextTransformer`` parameter names: ``embedding_table``, ``positional_embedding``,
    ``transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q;k;v), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
    ``ln_final``, ``text_projection`` (width x output_dim)."""
    sd = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    out = {"embedding_table": sd["embeddings.token_embedding.weight"], "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"], "text_projection": projection}
    for layer in range(text.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{kind}"] = torch.cat([sd[ours + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[theirs + f"attn.out_proj.{kind}"] = sd[ours + f"self_attn.out_proj.{kind}"]
            out[theirs + f"ln_1.{kind}"] = sd[ours + f"layer_norm1.{kind}"]
            out[theirs + f"ln_2.{kind}"] = sd[ours + f"layer_norm2.{kind}"]
            out[theirs + f"mlp.c_fc.{kind}"] = sd[ours + f"mlp.fc1.{kind}"]
            out[theirs + f"mlp.c_proj.{kind}"] = sd[ours + f"mlp.fc2.{kind}"]
    return out


def single_file_state(pipe) -> dict[str, torch.Tensor]:
    """What an SD1 ``.ckpt`` / ``.safetensors`` holds: the three models, and beside them the DDPM
    schedule buffers and the CLIP position ids that older transformers saved with the weights."""
    schedule = pipe.scheduler
    extras = {"betas": schedule.betas.clone(), "alphas_cumprod": schedule.alphas_cumprod.clone(),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(pipe.tokenizer.model_max_length)[None]}
    return {**unet_to_compvis(pipe.unet), **vae_to_compvis(pipe.vae), **clip_to_sd1(pipe.text_encoder), **extras}


def lit_ema(unet_keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LitEma's buffers: ``model_ema.`` + the DiffusionWrapper parameter name without dots."""
    ema = {"model_ema." + k.removeprefix("model.").replace(".", ""): v.clone() for k, v in unet_keys.items()}
    return {**ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(100, dtype=torch.int32)}


# ----------------------------------------------------------------------------- EasyNLP folder


def ldm_config(pipe, context_dim: int, text_params: dict | None) -> dict:
    """EasyNLP's ``config.json``: the LDM config (``ddpm.LatentDiffusionModel`` arguments) as JSON."""
    unet, vae, scheduler = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    levels = len(unet.block_out_channels)
    cond_params = {"max_length": 32, "n_repeat": 1, "normalize": True}
    if text_params is not None:
        cond_params["text_encoder"] = text_params
    return {"model": {"target": "LatentDiffusion", "params": {
        "linear_start": scheduler.beta_start, "linear_end": scheduler.beta_end, "timesteps": scheduler.num_train_timesteps,
        "beta_schedule": "linear", "first_stage_key": "image", "cond_stage_key": "text", "image_size": unet.sample_size,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn", "scale_factor": vae.scaling_factor,
        "use_ema": True,
        "unet_config": {"target": "UNetModel", "params": {
            "image_size": unet.sample_size, "in_channels": 4, "out_channels": 4, "model_channels": unet.block_out_channels[0],
            "attention_resolutions": [2 ** i for i, kind in enumerate(unet.down_block_types) if kind.startswith("CrossAttn")],
            "num_res_blocks": unet.layers_per_block, "channel_mult": [c // unet.block_out_channels[0] for c in unet.block_out_channels],
            "num_heads": unet.attention_head_dim, "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": context_dim, "use_checkpoint": True, "legacy": False}},
        "first_stage_config": {"target": "AutoencoderKL", "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": vae.sample_size, "in_channels": 3, "out_ch": 3,
            "ch": vae.block_out_channels[0], "ch_mult": [c // vae.block_out_channels[0] for c in vae.block_out_channels],
            "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0}, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "FrozenWukongCLIPTextEmbedder", "params": cond_params},
    }}}


def wukong_params(text: CLIPTextModel, output_dim: int) -> dict:
    c = text.config
    return {"context_length": c.max_position_embeddings, "vocab_size": c.vocab_size, "output_dim": output_dim,
            "width": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads}


def write_easynlp_folder(pipe, folder: Path, projection: torch.Tensor, split: bool, suffix: str = ".bin") -> dict[str, torch.Tensor]:
    """An EasyNLP fine-tune folder; returns the Wukong weights written (for the reference encoder).

    ``split=False``: today's layout, everything in ``pytorch_model``, text parameters in
    ``config.json``, ``vocab.txt`` at the top. ``split=True``: the 2022 layout, where
    ``pytorch_model`` holds the UNet only, the VAE is ``first_stage_kl_f8.ckpt`` and the text encoder
    ``wukong_vit_l_14_clip/`` (its own config, weights and vocabulary).
    The UNet's trained weights are perturbed and its EMA copy is the original: EasyNLP samples
    with the EMA weights, so only an import that takes them reproduces the original's pixels."""
    folder.mkdir(parents=True)
    unet_keys = unet_to_compvis(pipe.unet)
    trained = {k: v + 0.05 * torch.randn_like(v) for k, v in unet_keys.items()}
    wukong = clip_to_wukong(pipe.text_encoder, projection)
    text_params = wukong_params(pipe.text_encoder, projection.shape[1])
    state = {**trained, **lit_ema(unet_keys)}
    vocab_text = "\n".join(chinese_vocab()) + "\n"
    if split:
        clip_dir = folder / "wukong_vit_l_14_clip"
        clip_dir.mkdir()
        _save({"model.text_encoder." + k: v for k, v in wukong.items()}, clip_dir / f"pytorch_model{suffix}", wrap=False)
        (clip_dir / "config.json").write_text(json.dumps({"model": {"text": text_params, "visual": {}}}), encoding="utf-8")
        (clip_dir / "vocab.txt").write_text(vocab_text, encoding="utf-8")
        vae_state = {k.removeprefix("first_stage_model."): v for k, v in vae_to_compvis(pipe.vae).items()}
        _save({**vae_state, "loss.logvar": torch.zeros(())}, folder / f"first_stage_kl_f8{'.ckpt' if suffix == '.bin' else suffix}", wrap=True)
        config = ldm_config(pipe, projection.shape[1], None)
    else:
        state.update(vae_to_compvis(pipe.vae))
        state.update({"cond_stage_model.model." + k: v for k, v in wukong.items()})
        (folder / "vocab.txt").write_text(vocab_text, encoding="utf-8")
        config = ldm_config(pipe, projection.shape[1], text_params)
    _save(state, folder / f"pytorch_model{suffix}", wrap=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return wukong


def _save(state: dict[str, torch.Tensor], path: Path, wrap: bool) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1000} if wrap else state, path)


class WukongReference:
    """EasyNLP's conditioning, as ``FrozenWukongCLIPTextEmbedder.encode`` computes it, from the Wukong
    weights: tokens ``[CLS] + ids[:L-2] + [SEP]`` padded with 0; ``TextTransformer.forward`` (causal
    pre-LN blocks of ``nn.MultiheadAttention`` and QuickGELU, eps 1e-7); the state at ``[SEP]``
    times ``text_projection``; L2-normalised; one context token. A drop-in ``encode_prompt``."""

    def __init__(self, wukong: dict[str, torch.Tensor], tokenizer, heads: int):
        self.w, self.tokenizer, self.heads = wukong, tokenizer, heads

    def __call__(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        positive = self.encode(prompt).repeat_interleave(num_images_per_prompt, dim=0)
        negative = self.encode(negative_prompt or "").repeat_interleave(num_images_per_prompt, dim=0)
        return positive, negative if do_classifier_free_guidance else None

    def tokens(self, text: str) -> torch.Tensor:
        length = self.w["positional_embedding"].shape[0]
        ids = [self.tokenizer.cls_token_id] + self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text))[: length - 2]
        ids.append(self.tokenizer.sep_token_id)
        return torch.tensor([ids + [0] * (length - len(ids))])

    @torch.no_grad()
    def encode(self, text: str) -> torch.Tensor:
        w, ids = self.w, self.tokens(text)
        width = w["embedding_table"].shape[1]
        x = (w["embedding_table"][ids] + w["positional_embedding"]).permute(1, 0, 2)
        mask = torch.full((ids.shape[1],) * 2, float("-inf")).triu(1)
        layers = len({k.split(".")[2] for k in w if k.startswith("transformer.resblocks.")})
        for i in range(layers):
            p = f"transformer.resblocks.{i}."
            h = F.layer_norm(x, (width,), w[p + "ln_1.weight"], w[p + "ln_1.bias"], WUKONG_EPS)
            x = x + F.multi_head_attention_forward(
                h, h, h, width, self.heads, w[p + "attn.in_proj_weight"], w[p + "attn.in_proj_bias"], None, None, False, 0.0,
                w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"], training=False, need_weights=False, attn_mask=mask,
            )[0]
            h = F.linear(F.layer_norm(x, (width,), w[p + "ln_2.weight"], w[p + "ln_2.bias"], WUKONG_EPS), w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"])
            x = x + F.linear(h * torch.sigmoid(1.702 * h), w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
        x = F.layer_norm(x.permute(1, 0, 2), (width,), w["ln_final.weight"], w["ln_final.bias"], WUKONG_EPS)
        pooled = x[ids == self.tokenizer.sep_token_id] @ w["text_projection"]
        return (pooled / torch.linalg.norm(pooled, dim=1, keepdim=True))[:, None, :]


# ----------------------------------------------------------------------------- ESRGAN


def write_original_esrgan(path: Path, seed: int = 0, features: int = 8, blocks: int = 1, growth: int = 4) -> None:
    """A random ESRGAN in ``RRDBNet_arch`` names (``RRDB_trunk.N.RDBk.convM``, ``trunk_conv``, ``upconv1/2``,
    ``HRconv``), as ``torch.save`` of its state dict, like ``RRDB_ESRGAN_x4.pth``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {"conv_first": (features, 3), "trunk_conv": (features, features), "upconv1": (features, features),
              "upconv2": (features, features), "HRconv": (features, features), "conv_last": (3, features)}
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                shapes[f"RRDB_trunk.{block}.RDB{rdb}.conv{conv}"] = (features if conv == 5 else growth, features + (conv - 1) * growth)
    state = {}
    for name, (out_channels, in_channels) in shapes.items():
        state[f"{name}.weight"] = torch.randn(out_channels, in_channels, 3, 3, generator=generator) * 0.1
        state[f"{name}.bias"] = torch.randn(out_channels, generator=generator) * 0.1
    torch.save(state, path)
