"""The dispatch attention processor matches diffusers' default attention on every CPU backend."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from rapid_diffusion.speed import attention
from rapid_diffusion.speed.attention import DispatchAttnProcessor, best_backend, padded_head_dim, set_attention_backend

CPU_BACKENDS = ["native", "_native_math", "_native_flash"]
TOLERANCE = 1e-5


def sd_like_attention(cross_attention_dim: int | None = None) -> Attention:
    """Two heads of dim 40, the head dim of SD1.x's first UNet level."""
    torch.manual_seed(0)
    return Attention(query_dim=80, heads=2, dim_head=40, cross_attention_dim=cross_attention_dim)


def compare(attn: Attention, processor, hidden_states, context=None, **kwargs) -> float:
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden_states, context, **kwargs)
        actual = processor(attn, hidden_states, context, **kwargs)
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pad_multiple", [None, 32])
def test_self_attention_matches_default(backend, pad_multiple):
    attn = sd_like_attention()
    hidden_states = torch.randn(2, 64, 80, generator=torch.Generator().manual_seed(1))
    assert compare(attn, DispatchAttnProcessor(backend, pad_multiple), hidden_states) < TOLERANCE


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pad_multiple", [None, 32])
def test_cross_attention_with_shorter_key_matches_default(backend, pad_multiple):
    attn = sd_like_attention(cross_attention_dim=24)
    generator = torch.Generator().manual_seed(2)
    hidden_states = torch.randn(2, 64, 80, generator=generator)
    context = torch.randn(2, 7, 24, generator=generator)
    assert compare(attn, DispatchAttnProcessor(backend, pad_multiple), hidden_states, context) < TOLERANCE


@pytest.mark.parametrize("cross", [None, 24])
def test_fused_projections_match_default(cross):
    attn = sd_like_attention(cross_attention_dim=cross)
    generator = torch.Generator().manual_seed(3)
    hidden_states = torch.randn(2, 64, 80, generator=generator)
    context = torch.randn(2, 7, 24, generator=generator) if cross else None
    with torch.no_grad():
        expected = AttnProcessor2_0()(attn, hidden_states, context)
        attn.fuse_projections()
        actual = DispatchAttnProcessor("native", 32)(attn, hidden_states, context)
    assert (actual - expected).abs().max().item() < TOLERANCE


def test_vae_style_spatial_attention_with_group_norm_and_residual():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=1, dim_head=32, norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0)
    image = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(4))
    assert compare(attn, DispatchAttnProcessor("native", 64), image) < TOLERANCE


def test_attention_mask_is_honoured():
    attn = sd_like_attention(cross_attention_dim=24)
    generator = torch.Generator().manual_seed(5)
    hidden_states = torch.randn(2, 16, 80, generator=generator)
    context = torch.randn(2, 7, 24, generator=generator)
    mask = torch.zeros(2, 1, 7)
    mask[:, :, 5:] = -10000.0
    assert compare(attn, DispatchAttnProcessor("native"), hidden_states, context, attention_mask=mask) < TOLERANCE


def test_padded_head_dim_rounds_up_to_the_tile():
    assert [padded_head_dim(d, 32) for d in (40, 80, 160)] == [64, 96, 160]
    assert [padded_head_dim(d, 64) for d in (40, 80, 160)] == [64, 128, 192]
    assert padded_head_dim(40, None) == 40


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def test_unet_with_dispatch_processor_matches_default_unet():
    unet = tiny_unet().eval()
    generator = torch.Generator().manual_seed(6)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 9, 32, generator=generator)
    with torch.no_grad():
        expected = unet(sample, 10, context).sample
        set_attention_backend(unet, "native", pad_multiple=32)
        actual = unet(sample, 10, context).sample
    processors = set(type(p) for p in unet.attn_processors.values())
    assert processors == {DispatchAttnProcessor}
    assert (actual - expected).abs().max().item() < 1e-4


def test_diffusers_set_attention_backend_switches_the_installed_processor():
    unet = tiny_unet()
    set_attention_backend(unet, "native")
    unet.set_attention_backend("_native_math")
    assert {p.backend for p in unet.attn_processors.values()} == {"_native_math"}


def test_flash_backend_refused_when_flash_attn_is_missing(monkeypatch):
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", False)
    with pytest.raises(RuntimeError, match="flash-attn"):
        set_attention_backend(tiny_unet(), "flash")


def test_best_backend_on_cpu_is_sdpa():
    assert best_backend("cpu", torch.float32) == "native"
    assert best_backend("cpu", torch.bfloat16) == "native"


def fake_cuda(monkeypatch, flash2: bool, flash3: bool, hopper: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: flash2)
    monkeypatch.setattr(attention, "flash_attn_3_available", lambda: flash3)
    monkeypatch.setattr(attention, "is_hopper", lambda device: hopper)


@pytest.mark.parametrize(
    "flash2, flash3, hopper, dtype, expected",
    [
        (True, True, True, torch.float16, "_flash_3"),
        (True, True, False, torch.float16, "flash"),
        (True, False, True, torch.bfloat16, "flash"),
        (False, False, True, torch.float16, "native"),
        (True, True, True, torch.float32, "native"),
    ],
)
def test_best_backend_on_cuda(monkeypatch, flash2, flash3, hopper, dtype, expected):
    fake_cuda(monkeypatch, flash2, flash3, hopper)
    assert best_backend("cuda", dtype) == expected


def test_best_backend_without_cuda_ignores_flash_attn(monkeypatch):
    fake_cuda(monkeypatch, True, True, True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert best_backend("cuda", torch.float16) == "native"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pad_multiple", [None, 32])
def test_best_cuda_backend_matches_default_in_fp16(pad_multiple):
    attn = sd_like_attention(cross_attention_dim=24).to("cuda", torch.float16)
    generator = torch.Generator("cuda").manual_seed(7)
    hidden_states = torch.randn(2, 64, 80, generator=generator, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 7, 24, generator=generator, device="cuda", dtype=torch.float16)
    backend = best_backend("cuda", torch.float16)
    assert compare(attn, DispatchAttnProcessor(backend, pad_multiple), hidden_states, context) < 2e-3
