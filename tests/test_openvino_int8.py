"""The ``openvino-int8`` level (NNCF int8 weight compression of the converted modules) and the shape
policy for large models (no static copies), on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rapid_diffusion.models.registry import load_pipeline
from rapid_diffusion.speed import openvino as openvino_backend
from rapid_diffusion.speed.levels import LEVELS, apply_optimization

pytest.importorskip("openvino")
pytest.importorskip("nncf")

PROMPT = "一个红色的圆形"


def images(pipe, count: int = 1) -> np.ndarray:
    return pipe(
        PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64, num_images_per_prompt=count,
        generator=[torch.Generator("cpu").manual_seed(i) for i in range(count)], output_type="np",
    ).images


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("int8-home")


def optimised(tiny_model_dir, home, monkeypatch, level: str, messages: list[str]):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(home))
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    applied = apply_optimization(pipe, level, log=messages.append, height=64, width=64, max_images=2)
    return pipe, applied


def ir_weight_types(folder) -> set[str]:
    """The element types of the IR's weight constants, as its model.xml declares them."""
    import re

    xml = (folder / "model.xml").read_text()
    return set(re.findall(r'<layer id="\d+" name="[^"]*" type="Const" version="opset1">\s*<data element_type="(\w+)"', xml))


@pytest.mark.slow
def test_int8_weights_are_stored_in_8_bits_and_draw_close_to_f32(tiny_model_dir, home, monkeypatch):
    messages: list[str] = []
    pipe, applied = optimised(tiny_model_dir, home, monkeypatch, "openvino-int8", messages)
    assert applied == "openvino-int8", messages
    assert any("int8 weights" in m for m in messages), messages
    f32_pipe, f32_applied = optimised(tiny_model_dir, home, monkeypatch, "openvino", messages)
    assert f32_applied == "openvino"

    cache = home / "cache" / "openvino"
    [int8_unet] = cache.glob("unet-int8-*")
    [f32_unet] = [f for f in cache.glob("unet-*") if "int8" not in f.name]
    assert "u8" in ir_weight_types(int8_unet) and "u8" not in ir_weight_types(f32_unet)
    # The tiny UNet's conv and linear weights are most of its bytes: 8 bits instead of 32 (plus scales): measured 26%.
    assert (int8_unet / "model.bin").stat().st_size < 0.5 * (f32_unet / "model.bin").stat().st_size

    plain = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    reference, f32_images, int8_images = images(plain, 2), images(f32_pipe, 2), images(pipe, 2)
    f32_error = np.abs(f32_images - reference).max()
    int8_error = np.abs(int8_images - reference).mean()
    assert f32_error < 1 / 255
    assert 0 < int8_error < 0.02, f"int8 moved pixels by {int8_error:.4f} on average"  # measured 0.0014 (f32: 0 to 1/255)


def test_without_nncf_the_level_falls_back_to_f32_openvino_with_a_log_line(tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(openvino_backend, "nncf_missing", lambda: "nncf is not installed (pip install rapid-diffusion[int8])")
    messages: list[str] = []
    pipe, applied = optimised(tiny_model_dir, home, monkeypatch, "openvino-int8", messages)
    assert applied == "openvino"
    assert any("int8 weights unavailable (nncf is not installed" in m and "using level 'openvino'" in m for m in messages), messages


def test_int8_and_f32_conversions_are_cached_apart(tiny_model_dir, home, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(home))
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    graph = openvino_backend.UNetGraph(pipe.unet)
    f32, int8 = openvino_backend.ir_folder("unet", graph), openvino_backend.ir_folder("unet", graph, int8=True)
    assert f32 != int8 and int8.name.startswith("unet-int8-") and not f32.name.startswith("unet-int8")


def test_the_level_is_one_of_the_domain_options():
    from rapid_diffusion.domains import OPTIMIZATION_LEVELS

    assert "openvino-int8" in OPTIMIZATION_LEVELS and LEVELS is OPTIMIZATION_LEVELS


def test_a_small_unet_keeps_static_copies_and_a_large_one_does_not(tiny_model_dir, monkeypatch):
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    assert openvino_backend.keeps_static_copies(pipe)
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    monkeypatch.setattr(openvino_backend, "STATIC_COPIES_MAX_BYTES", unet_bytes - 1)
    assert not openvino_backend.keeps_static_copies(pipe)


@pytest.mark.slow
def test_a_large_model_runs_every_shape_on_the_dynamic_compilation_without_a_blob_cache(tiny_model_dir, tmp_path, monkeypatch):
    """The large-model policy on the tiny model (the size limit lowered): no static copy, no
    compiled-blob cache, batches of at most 2 rows (larger ones in chunks), every served shape
    warmed, pixels as plain diffusers'."""
    monkeypatch.setattr(openvino_backend, "STATIC_COPIES_MAX_BYTES", 0)
    messages: list[str] = []
    pipe, applied = optimised(tiny_model_dir, tmp_path, monkeypatch, "openvino", messages)
    assert applied == "openvino", messages
    assert any("5 dynamic-shape (large model: no static copies) shapes warmed" in m and "batch buckets (1, 2)" in m
               for m in messages), messages
    assert all(not module.static_shapes and module.buckets == (1, 2) for module in pipe.openvino_modules.values())
    assert not (tmp_path / "cache" / "openvino" / "compiled").exists()
    plain = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    assert np.abs(images(pipe, 3) - images(plain, 3)).max() < 1 / 255  # UNet batch 6 and VAE batch 3 in chunks of 2
