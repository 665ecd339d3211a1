"""EasyNLP's Wukong text encoder as a transformers ``CLIPTextModelWithProjection``.

What EasyNLP's latent-diffusion app runs (``easynlp/modelzoo/models/wukong/modeling_wukong.py``,
``TextTransformer``; ``latent_diffusion/wukong.py``, ``FrozenWukongCLIPTextEmbedder``) is the
OpenAI-CLIP text tower with a Chinese BERT vocabulary: a token table (``embedding_table``) and
learned positions, pre-LayerNorm residual blocks with ``nn.MultiheadAttention`` (packed
``in_proj``), QuickGELU MLPs (``c_fc``/``c_proj``) and a causal mask, ``ln_final``, then a
``text_projection`` matrix. LayerNorms use eps 1e-7. So the weights map exactly onto
``CLIPTextModelWithProjection``: the names are OpenCLIP's except ``embedding_table``, so one key is
renamed and diffusers' OpenCLIP conversion does the rest.

The difference is in what conditions the UNet. EasyNLP does not pass the per-token states:
it takes the state at the ``[SEP]`` token, projects it, L2-normalises it and repeats it
``n_repeat`` times (``encode``). A plain ``StableDiffusionPipeline`` cannot express that, so the
converted text encoder carries the rule in its config (:data:`CONDITIONING_ATTRIBUTE`) and
:mod:`.conditioning` applies it at generation time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import BertTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

from ..messages import say
from .checkpoints import ImportFailed
from .conditioning import CONDITIONING_ATTRIBUTE
from .ldm import load_strict

WUKONG_PREFIX = "cond_stage_model.model."
TEXT_PARAMS = ("context_length", "vocab_size", "output_dim", "width", "layers", "heads")
LAYER_NORM_EPS = 1e-7  # hard-coded in TextTransformer and its ResidualAttentionBlock


def wukong_text_parts(params: dict, vocab_file: Path, normalize: bool, repeat: int, file: str) -> tuple[BertTokenizer, CLIPTextConfig]:
    """The tokenizer and the ``CLIPTextConfig`` of EasyNLP's ``text_encoder`` parameters.

    The config pools at the vocabulary's ``[SEP]`` (EasyNLP looks for id 102, which is ``[SEP]``
    in the Chinese BERT vocabulary it ships) and carries the conditioning rule."""
    for name in TEXT_PARAMS:
        if not isinstance(params.get(name), int) or params[name] <= 0:
            raise ImportFailed(say("import_bad_config", file=file, field=f"text_encoder.{name}", problem="required, a positive integer / 须为正整数"))
    tokenizer = wukong_tokenizer(vocab_file, params)
    config = CLIPTextConfig(
        vocab_size=params["vocab_size"],
        hidden_size=params["width"],
        intermediate_size=4 * params["width"],
        num_hidden_layers=params["layers"],
        num_attention_heads=params["heads"],
        max_position_embeddings=params["context_length"],
        projection_dim=params["output_dim"],
        hidden_act="quick_gelu",
        layer_norm_eps=LAYER_NORM_EPS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        **{CONDITIONING_ATTRIBUTE: {"pooled": True, "normalize": normalize, "repeat": repeat}},
    )
    return tokenizer, config


def wukong_text_encoder(state: dict[str, torch.Tensor], config: CLIPTextConfig, source: str) -> CLIPTextModelWithProjection:
    """The Wukong weights (``cond_stage_model.model.*``) loaded strictly into ``CLIPTextModelWithProjection``."""
    wukong = {k.removeprefix(WUKONG_PREFIX): v for k, v in state.items() if k.startswith(WUKONG_PREFIX)}
    if "embedding_table" in wukong:
        wukong["token_embedding.weight"] = wukong.pop("embedding_table")
    model = CLIPTextModelWithProjection(config)
    # No prefix: diffusers skips SD2's last block and projection when they carry the LDM prefix.
    converted = convert_open_clip_checkpoint(model, wukong, prefix="") if "text_projection" in wukong else {}
    return load_strict(model, converted, "Wukong text encoder", source)


def wukong_tokenizer(vocab_file: Path, params: dict) -> BertTokenizer:
    """EasyNLP's ``FullTokenizer`` (Google BERT's: lower case, one token per CJK character), padded with
    ``[PAD]`` to the encoder's window like ``FrozenWukongCLIPTextEmbedder.tokenize``.

    transformers 5 takes the file as ``vocab=`` (a ``vocab_file=`` keyword is silently ignored,
    leaving five special tokens), so the size is checked against the file and the encoder."""
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, model_max_length=params["context_length"])
    tokens = len(set(vocab_file.read_text(encoding="utf-8").splitlines()))
    if len(tokenizer) != tokens or len(tokenizer) > params["vocab_size"]:
        raise ImportFailed(say("import_bad_config", file=vocab_file.name, field="vocab",
                               problem=f"{tokens} tokens in the file, {len(tokenizer)} read; the text encoder has {params['vocab_size']}"))
    return tokenizer
