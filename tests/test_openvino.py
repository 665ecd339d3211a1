"""The ``openvino`` and ``auto`` levels on the tiny model: images within 1/255 of plain diffusers,
the batch-bucket shape policy, and the on-disk cache of converted models (hit, corrupt, keyed)."""

from __future__ import annotations

import locale
import shutil
import numpy as np
import pytest
import torch

from rapid_diffusion.models.registry import load_pipeline
from rapid_diffusion.speed import openvino as openvino_backend, levels as optimize
from rapid_diffusion.speed.levels import apply_optimization, auto_level

pytest.importorskip("openvino")

PROMPT = "一个红色的圆形"


def images(pipe, count: int = 1, guidance: float = 5.0, seed: int = 0) -> np.ndarray:
    return pipe(
        PROMPT,
        num_inference_steps=3,
        guidance_scale=guidance,
        height=64,
        width=64,
        num_images_per_prompt=count,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(count)],
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    """One conversion for the module (the slow part), its log and its cache folder.

    Background warm-ups that earlier tests' registries started read the process's settings too:
    they finish first, so that none converts into this module's cache folder meanwhile."""
    from rapid_diffusion.speed.warmup import warmer_for

    warmer_for(torch.device("cpu")).wait()
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("ov-home")
    mp.setenv("RAPID_DIFFUSION_HOME", str(home))
    from rapid_diffusion import settings

    settings.reload()
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    messages = []
    applied = apply_optimization(pipe, "openvino", log=messages.append, height=64, width=64, max_images=4)
    mp.undo()
    settings.reload()
    return pipe, applied, messages, home


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_openvino_images_match_plain_within_one_level(converted, plain):
    pipe, applied, messages, _ = converted
    assert applied == "openvino", messages
    assert any("converted" in m for m in messages)
    for count, guidance in ((1, 5.0), (3, 5.0), (2, 1.0)):
        difference = np.abs(images(pipe, count, guidance) - images(plain, count, guidance)).max()
        assert difference < 1 / 255, (count, guidance, difference)


def test_every_served_shape_is_compiled_at_warm_up(converted):
    """1..4 images with and without CFG reach UNet batches 1..8: buckets 1, 2, 4, 8 and VAE 1, 2, 4."""
    pipe, *_ = converted
    unet = pipe.openvino_modules["unet"]
    assert sorted(shapes[0][0] for shapes in unet.static_shapes) == [1, 2, 4, 8]
    assert all(shapes[0][2:] == (16, 16) for shapes in unet.static_shapes)
    assert sorted(s[0][0] for s in pipe.openvino_modules["vae_decoder"].static_shapes) == [1, 2, 4]
    before = set(unet.static_shapes)
    images(pipe, 3)
    assert unet.static_shapes == before  # 3 images (UNet batch 6) ran padded to bucket 8, no new compilation


def test_a_batch_larger_than_the_largest_bucket_runs_in_chunks(converted, plain):
    pipe, *_ = converted
    module = pipe.openvino_modules["vae_decoder"]
    latents = torch.randn(10, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = type(plain.vae.decoder).forward(plain.vae.decoder, latents)
    assert torch.allclose(module(latents), expected, atol=1e-4)


def test_second_conversion_reads_the_cache(converted, tiny_model_dir, monkeypatch):
    *_, home = converted
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(home))
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    messages = []
    assert apply_optimization(pipe, "openvino", log=messages.append, max_images=1) == "openvino"
    assert any("read from the cache (unet, text_encoder, vae_decoder)" in m for m in messages), messages


def test_bf16_hint_applies_to_the_unet_only(converted, tiny_model_dir, monkeypatch):
    *_, home = converted
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(home))
    monkeypatch.setenv("RAPID_DIFFUSION_OPENVINO_PRECISION", "bf16")
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    process_locale = locale.setlocale(locale.LC_CTYPE)
    assert apply_optimization(pipe, "openvino", log=lambda m: None, max_images=1) == "openvino"
    assert locale.setlocale(locale.LC_CTYPE) == process_locale, "building the bf16 pipeline keeps the process's locale"
    hints = {name: str(m.dynamic.get_property("INFERENCE_PRECISION_HINT")) for name, m in pipe.openvino_modules.items()}
    assert "bfloat16" in hints["unet"] or "f32" not in hints["unet"]
    assert "float32" in hints["vae_decoder"] and "float32" in hints["text_encoder"]


@pytest.mark.slow
def test_corrupt_cache_is_ignored_with_a_log_line(converted, tiny_model_dir, monkeypatch, plain, tmp_path):
    """On a copy of the cache: the module's pipelines still map the original IR files' weights."""
    *_, home = converted
    shutil.copytree(home / "cache", tmp_path / "cache")
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    for weights in (tmp_path / "cache" / "openvino").glob("unet-*/model.bin"):
        weights.write_bytes(b"\0" * weights.stat().st_size)
    pipe = load_pipeline(tiny_model_dir, torch.device("cpu"), torch.float32)
    messages = []
    assert apply_optimization(pipe, "openvino", log=messages.append, max_images=1) == "openvino", messages
    assert any("ignoring the corrupt OpenVINO cache entry unet-" in m for m in messages), messages
    assert np.abs(images(pipe) - images(plain)).max() < 1 / 255


def test_cache_key_changes_with_weights_and_versions(plain, monkeypatch, tmp_path):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    graph = openvino_backend.UNetGraph(plain.unet)
    key = openvino_backend.ir_folder("unet", graph)
    monkeypatch.setattr(torch, "__version__", "0.0-other")
    other_torch = openvino_backend.ir_folder("unet", graph)
    monkeypatch.undo()
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    changed = load_pipeline_copy(plain)
    with torch.no_grad():
        changed.unet.conv_in.bias.add_(1e-3)
    other_weights = openvino_backend.ir_folder("unet", openvino_backend.UNetGraph(changed.unet))
    assert len({key, other_torch, other_weights}) == 3


def load_pipeline_copy(pipe):
    import copy

    return copy.deepcopy(pipe)


def test_cache_off_writes_nothing(plain, monkeypatch, tmp_path):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    monkeypatch.setenv("RAPID_DIFFUSION_COMPILE_CACHE", "0")
    assert openvino_backend.ir_folder("unet", openvino_backend.UNetGraph(plain.unet)) is None


def test_text_encoder_falls_back_to_torch_when_its_embeddings_are_hooked(converted, plain):
    """Knowledge injection hooks the token embeddings and flags the encoder (``needs_torch_forward``,
    as ``KnowledgeTextEncoder`` does); the converted graph would bypass the hook."""
    pipe, *_ = converted
    ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
    # Not a constant shift: the encoder's layer norms would remove one, and the test could not fail.
    shift = lambda module, args, output: output + torch.linspace(-1.0, 1.0, output.shape[-1])  # noqa: E731
    handles = [p.text_encoder.get_input_embeddings().register_forward_hook(shift) for p in (pipe, plain)]
    pipe.text_encoder.needs_torch_forward = True
    try:
        with torch.no_grad():
            hooked, reference = pipe.text_encoder(ids)[0], plain.text_encoder(ids)[0]
    finally:
        pipe.text_encoder.needs_torch_forward = False
        for handle in handles:
            handle.remove()
    assert torch.allclose(hooked, reference, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(pipe.text_encoder(ids)[0], hooked, atol=1e-3)  # the hook mattered; unflagged: the converted graph


def test_auto_picks_openvino_on_cpu_then_compile_then_none(monkeypatch):
    messages = []
    assert auto_level(torch.device("cpu"), messages.append) == "openvino"
    monkeypatch.setattr(optimize, "openvino_missing", lambda device: "openvino is not installed")
    assert auto_level(torch.device("cpu"), messages.append) == "compile"
    monkeypatch.setattr(optimize, "compiler_missing", lambda device: "no C++ compiler on PATH")
    assert auto_level(torch.device("cpu"), messages.append) == "none"
    assert messages[-1] == "auto: torch.compile unavailable (no C++ compiler on PATH); plain diffusers"


def test_auto_compiles_on_cuda(monkeypatch):
    monkeypatch.setattr(optimize, "compiler_missing", lambda device: None)
    assert auto_level(torch.device("cuda"), lambda message: None) == "compile"


def test_openvino_refuses_a_cuda_pipeline_with_its_reason():
    assert "runs on the CPU" in openvino_backend.openvino_missing(torch.device("cuda"))
