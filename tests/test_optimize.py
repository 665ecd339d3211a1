"""Optimisation levels: same images as plain diffusers, and clean fallbacks when a backend is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from rapid_diffusion.models.registry import load_pipeline
from rapid_diffusion.speed import levels as optimize
from rapid_diffusion.speed.attention import DispatchAttnProcessor
from rapid_diffusion.speed.levels import apply_optimization, compiler_missing, is_compiled


@pytest.fixture()
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)


def images(pipe, steps: int = 2) -> np.ndarray:
    return pipe(
        "一个红色的圆形",
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images


def processor_types(pipe) -> set[type]:
    return {type(p) for p in pipe.unet.attn_processors.values()}


def test_none_leaves_plain_diffusers(pipe):
    assert apply_optimization(pipe, "none") == "none"
    assert processor_types(pipe) == {AttnProcessor2_0}


def test_unknown_level_is_refused(pipe):
    with pytest.raises(ValueError, match="optimization must be one of"):
        apply_optimization(pipe, "turbo")


def test_flash_level_matches_plain_images(pipe, tiny_model_dir):
    plain = images(load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32))
    messages = []
    assert apply_optimization(pipe, "flash", log=messages.append) == "flash"
    assert processor_types(pipe) == {DispatchAttnProcessor}
    assert "UNet attention backend: native" in messages
    assert np.abs(images(pipe) - plain).max() < 1e-5


def test_missing_flash_attn_falls_back_to_sdpa(pipe, monkeypatch):
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", False)
    monkeypatch.setattr(optimize, "best_backend", lambda device, dtype: "flash")
    messages = []
    assert apply_optimization(pipe, "flash", log=messages.append) == "flash"
    assert any("'flash' unavailable" in m for m in messages)
    assert {p.backend for p in pipe.unet.attn_processors.values()} == {"native"}


def test_compiler_missing_reasons(monkeypatch):
    monkeypatch.setattr(optimize, "triton_installed", lambda: False)
    assert compiler_missing(torch.device("cuda")) == "Triton is not installed"
    monkeypatch.setattr(optimize, "triton_installed", lambda: True)
    assert compiler_missing(torch.device("cuda")) is None
    monkeypatch.setattr(optimize.shutil, "which", lambda name: None)
    assert compiler_missing(torch.device("cpu")) == "no C++ compiler on PATH"
    assert "no inductor backend" in compiler_missing(torch.device("meta"))


def test_compile_without_toolchain_falls_back_to_flash(pipe, monkeypatch):
    monkeypatch.setattr(optimize, "compiler_missing", lambda device: "no C++ compiler on PATH")
    messages = []
    assert apply_optimization(pipe, "compile", log=messages.append) == "flash"
    assert any("torch.compile unavailable (no C++ compiler on PATH)" in m for m in messages)
    assert not is_compiled(pipe.unet)


def test_compile_failing_at_warm_up_falls_back_and_still_matches(pipe, tiny_model_dir, monkeypatch):
    def broken_warm_up(pipe, sizes, max_images):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(optimize, "warm_up", broken_warm_up)
    messages = []
    assert apply_optimization(pipe, "compile", log=messages.append) == "flash"
    assert any("inductor exploded" in m for m in messages)
    assert not is_compiled(pipe.unet) and not is_compiled(pipe.vae.decoder)
    assert all(m.fused_projections for m in pipe.unet.modules() if isinstance(m, Attention))
    plain = images(load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32))
    assert np.abs(images(pipe) - plain).max() < 1e-4


def test_registry_applies_the_domain_level(tmp_path, tiny_model_dir, monkeypatch):
    from helpers import write_domain
    from helpers import generate_one
    from rapid_diffusion.generation.request import GenerationRequest
    from rapid_diffusion.models.registry import ModelRegistry

    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "fast", tiny_model_dir, optimization="flash")
    monkeypatch.setenv("RAPID_DIFFUSION_DOMAINS", str(folder))
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    spec = registry.spec("fast")
    assert registry.get(spec).optimization == "flash"
    result = generate_one(GenerationRequest(prompt="蓝色正方形", seed=1, num_inference_steps=2), spec, registry=registry)
    assert result.images[0].size == (64, 64)


@pytest.mark.slow
def test_compile_level_matches_plain_images(pipe, tiny_model_dir):
    """Real inductor compilation of the tiny UNet and VAE decoder (minutes on a loaded 2-core box)."""
    plain = images(load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32))
    messages = []
    assert apply_optimization(pipe, "compile", log=messages.append, height=64, width=64) == "compile", messages
    assert is_compiled(pipe.unet) and is_compiled(pipe.vae.decoder)
    assert np.abs(images(pipe) - plain).max() < 1e-3


def test_cuda_graph_outputs_are_copied_out_of_the_pool():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    sample = torch.ones(1, 4, 2, 2)
    copied = optimize.copy_out_of_cuda_graph(None, (), (sample,))
    assert torch.equal(copied[0], sample) and copied[0].data_ptr() != sample.data_ptr()
    copied = optimize.copy_out_of_cuda_graph(None, (), UNet2DConditionOutput(sample=sample))
    assert isinstance(copied, UNet2DConditionOutput) and copied.sample.data_ptr() != sample.data_ptr()


def test_bucketed_forward_pads_to_a_bucket_and_chunks_beyond_eight():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    seen = []

    def forward(sample, timestep, encoder_hidden_states, return_dict=False):
        seen.append((sample.shape[0], encoder_hidden_states.shape[0]))
        output = sample * 2 + encoder_hidden_states.mean()
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    run = optimize.bucketed(forward)
    for batch, calls in ((3, [(4, 4)]), (10, [(8, 8), (2, 2)])):
        seen.clear()
        sample, hidden = torch.randn(batch, 4, 2, 2), torch.zeros(batch, 5, 8)
        out = run(sample, torch.tensor(10), hidden)
        assert seen == calls and torch.equal(out[0], sample * 2)
        assert torch.equal(run(sample, torch.tensor(10), hidden, return_dict=True).sample, sample * 2)
