"""ESRGAN super-resolution: public checkpoint layouts against an independent reference
forward pass, tiling, weight fetching and verification, the labelled Lanczos fallback, the
pipeline hook and the ``upscale`` CLI."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from rapid_diffusion.domains import SuperResolutionWeights
from rapid_diffusion.upscaling.esrgan import (
    DEMO_SR_WEIGHTS,
    RRDBNet,
    SRVGGNetCompact,
    SRWeightsIntegrityError,
    SRWeightsUnavailable,
    UnknownCheckpointError,
    Upscaler,
    fetch_sr_weights,
    load_sr_model,
    tiled_forward,
    upscaler_for,
)
from rapid_diffusion_dev.bench.sr import time_upscaler
from helpers import write_domain

CPU = torch.device("cpu")

# ----------------------------------------------------------------------------- random checkpoints

BASICSR_NAMES = dict(block="body.{}.rdb{}.conv{}", trunk="conv_body", up1="conv_up1", up2="conv_up2", hr="conv_hr")
ESRGAN_NAMES = dict(block="RRDB_trunk.{}.RDB{}.conv{}", trunk="trunk_conv", up1="upconv1", up2="upconv2", hr="HRconv")


def _conv_params(gen, c_in, c_out):
    std = 1.0 / np.sqrt(c_in * 9)
    return torch.randn(c_out, c_in, 3, 3, generator=gen) * std, torch.randn(c_out, generator=gen) * 0.05


def random_rrdb_state(names, num_feat, num_block, grow, seed=0):
    """A random ESRGAN state dict in the key layout ``names``, built without the model class."""
    gen = torch.Generator().manual_seed(seed)
    state = {}

    def put(name, c_in, c_out):
        state[f"{name}.weight"], state[f"{name}.bias"] = _conv_params(gen, c_in, c_out)

    put("conv_first", 3, num_feat)
    for b in range(num_block):
        for r in (1, 2, 3):
            for m in range(1, 6):
                put(names["block"].format(b, r, m), num_feat + (m - 1) * grow, num_feat if m == 5 else grow)
    for key in ("trunk", "up1", "up2", "hr"):
        put(names[key], num_feat, num_feat)
    put("conv_last", num_feat, 3)
    return state


def random_srvgg_state(num_feat, num_conv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state, index, c_in = {}, 0, 3
    for _ in range(num_conv + 1):
        state[f"body.{index}.weight"], state[f"body.{index}.bias"] = _conv_params(gen, c_in, num_feat)
        state[f"body.{index + 1}.weight"] = torch.rand(num_feat, generator=gen) * 0.3
        index, c_in = index + 2, num_feat
    state[f"body.{index}.weight"], state[f"body.{index}.bias"] = _conv_params(gen, num_feat, 48)
    return state


# ----------------------------------------------------------------------------- reference forward passes


def _conv(x, state, name, act=False):
    y = F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], padding=1)
    return F.leaky_relu(y, 0.2) if act else y


def reference_rrdb(state, names, x):
    """ESRGAN x4 straight from the paper's description, on the raw state dict."""
    num_block = len({k.split(".")[1] for k in state if k.startswith(names["block"].split(".")[0] + ".")})
    first = _conv(x, state, "conv_first")
    h = first
    for b in range(num_block):
        block_in = h
        for r in (1, 2, 3):
            dense = [h]
            for m in range(1, 5):
                dense.append(_conv(torch.cat(dense, 1), state, names["block"].format(b, r, m), act=True))
            h = _conv(torch.cat(dense, 1), state, names["block"].format(b, r, 5)) * 0.2 + h
        h = h * 0.2 + block_in
    feat = first + _conv(h, state, names["trunk"])
    feat = _conv(F.interpolate(feat, scale_factor=2, mode="nearest"), state, names["up1"], act=True)
    feat = _conv(F.interpolate(feat, scale_factor=2, mode="nearest"), state, names["up2"], act=True)
    return _conv(_conv(feat, state, names["hr"], act=True), state, "conv_last")


def reference_srvgg(state, x):
    indices = sorted(int(k.split(".")[1]) for k, v in state.items() if v.ndim == 4)
    h = x
    for i in indices[:-1]:
        h = F.prelu(_conv(h, state, f"body.{i}"), state[f"body.{i + 1}.weight"])
    h = F.pixel_shuffle(_conv(h, state, f"body.{indices[-1]}"), 4)
    return h + x.repeat_interleave(4, 2).repeat_interleave(4, 3)


def _input(h=12, w=20, seed=1):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_basicsr_layout_nonstandard_size_matches_reference(tmp_path, suffix):
    state = random_rrdb_state(BASICSR_NAMES, num_feat=32, num_block=3, grow=16)
    path = tmp_path / f"RealESRGAN_small{suffix}"
    if suffix == ".pth":
        torch.save({"params_ema": state}, path)
    else:
        save_file(state, str(path))
    model = load_sr_model(path)
    assert isinstance(model, RRDBNet)
    assert (model.architecture.num_feat, model.architecture.num_block, model.architecture.num_grow_ch) == (32, 3, 16)
    x = _input()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 3, 48, 80)
    torch.testing.assert_close(out, reference_rrdb(state, BASICSR_NAMES, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_esrgan_layout_matches_reference(tmp_path, suffix):
    state = random_rrdb_state(ESRGAN_NAMES, num_feat=16, num_block=2, grow=8, seed=3)
    path = tmp_path / f"RRDB_ESRGAN_x4{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = load_sr_model(path)
    assert model.architecture.describe() == "RRDBNet x4 (2 blocks, 16 features, growth 8)"
    x = _input(9, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_rrdb(state, ESRGAN_NAMES, x), atol=1e-5, rtol=1e-4)


def test_2018_esrgan_layout_loads(tmp_path):
    """The older ``model.N`` layout of the first ESRGAN release maps onto the same network."""
    state = random_rrdb_state(ESRGAN_NAMES, num_feat=8, num_block=2, grow=4, seed=4)
    old = {}
    for key, value in state.items():
        match = re.match(r"RRDB_trunk\.(\d+)\.(RDB\d\.conv\d)\.(weight|bias)", key)
        if match:
            old[f"model.1.sub.{match[1]}.{match[2]}.0.{match[3]}"] = value
    renames = {"conv_first": "model.0", "trunk_conv": "model.1.sub.2", "upconv1": "model.3", "upconv2": "model.6", "HRconv": "model.8", "conv_last": "model.10"}
    for new, legacy in renames.items():
        old[f"{legacy}.weight"], old[f"{legacy}.bias"] = state[f"{new}.weight"], state[f"{new}.bias"]
    torch.save(old, tmp_path / "old.pth")
    x = _input(6, 6)
    with torch.no_grad():
        torch.testing.assert_close(load_sr_model(tmp_path / "old.pth")(x), reference_rrdb(state, ESRGAN_NAMES, x), atol=1e-5, rtol=1e-4)


def test_srvgg_compact_layout_matches_reference(tmp_path):
    state = random_srvgg_state(num_feat=16, num_conv=4)
    torch.save({"params": state}, tmp_path / "realesr-general-x4v3.pth")
    model = load_sr_model(tmp_path / "realesr-general-x4v3.pth")
    assert isinstance(model, SRVGGNetCompact) and model.scale == 4
    assert model.architecture.describe() == "SRVGGNetCompact x4 (4 convs, 16 features)"
    x = _input(10, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_srvgg(state, x), atol=1e-5, rtol=1e-4)


def test_unknown_layouts_are_refused_with_a_clear_message(tmp_path):
    save_file({"encoder.weight": torch.zeros(4, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(UnknownCheckpointError, match="not a super-resolution checkpoint in a known layout.*RRDB_trunk"):
        load_sr_model(tmp_path / "vae.safetensors")

    x2 = random_rrdb_state(BASICSR_NAMES, 8, 1, 4)
    x2["conv_first.weight"] = torch.zeros(8, 12, 3, 3)
    save_file(x2, str(tmp_path / "x2.safetensors"))
    with pytest.raises(UnknownCheckpointError, match="only x4 is supported"):
        load_sr_model(tmp_path / "x2.safetensors")

    broken = random_rrdb_state(BASICSR_NAMES, 8, 1, 4)
    del broken["conv_hr.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UnknownCheckpointError, match="does not match.*conv_hr.weight"):
        load_sr_model(tmp_path / "broken.safetensors")


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"params": {"conv_first.weight": torch.zeros(1)}, "opt": Image.new("RGB", (1, 1))}, tmp_path / "evil.pth")
    with pytest.raises(UnknownCheckpointError, match="cannot be read safely"):
        load_sr_model(tmp_path / "evil.pth")


# ----------------------------------------------------------------------------- inference


def test_tiled_output_equals_untiled():
    model = load_state(random_rrdb_state(BASICSR_NAMES, 8, 1, 4, seed=5))
    x = _input(21, 30, seed=2)
    with torch.no_grad():
        full = model(x)
        tiled = tiled_forward(model, x, scale=4, tile=8, tile_pad=20)
        seamy = tiled_forward(model, x, scale=4, tile=8, tile_pad=0)
    assert tiled.shape == full.shape == (1, 3, 84, 120)
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-4)
    assert (seamy - full).abs().max() > 1e-3  # without overlap the tiles do show seams


def load_state(state):
    from rapid_diffusion.upscaling.esrgan import model_from_state_dict

    return model_from_state_dict(state)


def test_upscaler_hook_returns_esrgan_images_matching_reference():
    state = random_srvgg_state(num_feat=8, num_conv=2, seed=6)
    upscaler = Upscaler(load_state(state), CPU, torch.float32, tile=5, tile_pad=8)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (11, 13, 3), dtype=np.uint8)) for _ in range(2)]
    out, method = upscaler(images)
    assert method == "esrgan" and [im.size for im in out] == [(52, 44), (52, 44)]
    for image, result in zip(images, out):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        expected = (reference_srvgg(state, x).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(result, dtype=np.float32) - expected).max() <= 1


def test_time_upscaler_reports_seconds():
    upscaler = Upscaler(load_state(random_srvgg_state(8, 2)), CPU)
    report = time_upscaler(upscaler, size=16, runs=2)
    assert report["method"] == "esrgan" and report["output"] == "64x64" and report["runs"] == 2
    assert 0 < report["min_s"] <= report["mean_s"]


# ----------------------------------------------------------------------------- weights


def test_local_weights_sha256_mismatch_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(random_srvgg_state(8, 2), str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fetch_sr_weights(SuperResolutionWeights(path=path, sha256=digest)) == path
    with pytest.raises(SRWeightsIntegrityError, match="sha256.*refusing"):
        fetch_sr_weights(SuperResolutionWeights(path=path, sha256="0" * 64))


def test_url_weights_download_once_into_cache_and_verify(tmp_path, monkeypatch):
    import rapid_diffusion.upscaling.esrgan as upscale

    buffer = io.BytesIO()
    torch.save({"params": random_srvgg_state(8, 2)}, buffer)
    payload = buffer.getvalue()
    calls = []
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(upscale, "_open_url", lambda url: calls.append(url) or io.BytesIO(payload))
    url = "https://example.org/models/realesr-tiny.pth"

    with pytest.raises(SRWeightsIntegrityError):
        fetch_sr_weights(SuperResolutionWeights(url=url, sha256="f" * 64), offline=False)
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file()]  # the bad download is deleted

    weights = SuperResolutionWeights(url=url, sha256=hashlib.sha256(payload).hexdigest())
    path = fetch_sr_weights(weights, offline=False)
    assert path.read_bytes() == payload and path.is_relative_to(tmp_path / "hf")
    assert fetch_sr_weights(weights, offline=True) == path
    assert len(calls) == 2  # the cached file is reused, even offline


def test_offline_without_weights_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(SRWeightsUnavailable, match="HF_HUB_OFFLINE"):
        fetch_sr_weights(SuperResolutionWeights(url="https://example.org/x.pth", sha256="a" * 64), offline=True)
    with pytest.raises(SRWeightsUnavailable):
        fetch_sr_weights(SuperResolutionWeights(repo_id="nobody/none", filename="x.pth", sha256="a" * 64), offline=True)


# ----------------------------------------------------------------------------- pipeline and CLI


def test_generation_uses_esrgan_or_labels_the_lanczos_fallback(tmp_path, registry, test_domains, tiny_model_dir, copy_model, monkeypatch):
    from helpers import generate_one
    from rapid_diffusion.generation.request import GenerationRequest

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    weights = tmp_path / "sr.safetensors"
    save_file(random_srvgg_state(8, 2), str(weights))
    with_sr = write_domain(test_domains, "withsr", tiny_model_dir)
    with_sr.write_text(with_sr.read_text(encoding="utf-8") + f"sr_weights:\n  path: {weights}\n", encoding="utf-8")
    offline = write_domain(test_domains, "offline", copy_model("offline-model"))
    url_weights = f"sr_weights:\n  url: https://example.org/esrgan.pth\n  sha256: {'a' * 64}\n"
    offline.write_text(offline.read_text(encoding="utf-8") + url_weights, encoding="utf-8")
    specs = registry.reload_domains()
    request = GenerationRequest(prompt="红色圆形", seed=0, num_inference_steps=1, super_resolution=True)

    upscaled = generate_one(request, specs["withsr"], registry=registry)
    assert upscaled.images[0].size == (256, 256) and upscaled.settings["upscaler"] == "esrgan"
    assert upscaled.timings["super_resolution"] > 0 and not upscaled.notes

    fallback = generate_one(request, specs["offline"], registry=registry)  # HF_HUB_OFFLINE, nothing cached
    assert fallback.images[0].size == (256, 256) and fallback.settings["upscaler"] == "lanczos"
    assert any("lanczos" in note and "ESRGAN" in note for note in fallback.notes)


def test_upscaler_for_without_sr_weights_is_none(registry, test_domains):
    assert upscaler_for(registry.spec("tiny"), CPU, torch.float32) is None


def test_upscale_cli_round_trip(tmp_path, capsys):
    from rapid_diffusion.serving.cli import main

    weights = tmp_path / "sr.safetensors"
    state = random_srvgg_state(8, 2, seed=7)
    save_file(state, str(weights))
    source = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    source.save(tmp_path / "in.png")
    code = main(["upscale", "--weights", str(weights), "--input", str(tmp_path / "in.png"), "--out", str(tmp_path / "out.png"), "--tile", "8"])
    assert code == 0
    result = Image.open(tmp_path / "out.png")
    assert result.size == (96, 80)
    expected, _ = Upscaler(load_state(state), CPU, tile=None)([source])
    assert np.abs(np.asarray(result, dtype=np.int16) - np.asarray(expected[0], dtype=np.int16)).max() <= 1
    assert "SRVGGNetCompact" in capsys.readouterr().err

    assert main(["upscale", "--weights", str(tmp_path / "missing.pth"), "--input", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.png")]) == 2


# ----------------------------------------------------------------------------- the demo model


def test_demo_sr_beats_lanczos_on_held_out_world_images():
    from rapid_diffusion_dev.recipes.train_sr import evaluate, render_world

    model = load_sr_model(DEMO_SR_WEIGHTS)
    assert isinstance(model, SRVGGNetCompact) and DEMO_SR_WEIGHTS.stat().st_size < 4 * 2**20
    scores = evaluate(model, render_world(6, seed=4242, split="test"))
    assert scores["esrgan"] >= scores["lanczos"] + 2.0, scores


def test_benchmark_sr_times_the_demo_model_and_lanczos():
    from rapid_diffusion_dev.bench.sr import benchmark_sr

    esrgan, lanczos = benchmark_sr(size=16, runs=1, device="cpu")
    assert (esrgan["method"], lanczos["method"]) == ("esrgan", "lanczos")
    assert esrgan["model"] == "SRVGGNetCompact x4 (8 convs, 32 features)" and esrgan["output"] == "64x64"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 ESRGAN 256->1024)")
def test_fp16_cuda_rrdb_matches_fp32_at_the_paper_setting():
    from rapid_diffusion_dev.bench.sr import benchmark_image

    cuda = torch.device("cuda")
    state = random_rrdb_state(BASICSR_NAMES, num_feat=64, num_block=23, grow=32)
    image = benchmark_image(256)
    (fp32,), _ = Upscaler(load_state(state), cuda, torch.float32, tile=128, tile_pad=16)([image])
    half = Upscaler(load_state(state), cuda, torch.float16, tile=128, tile_pad=16)
    (fp16,), method = half([image])
    assert method == "esrgan" and fp16.size == (1024, 1024)
    assert np.abs(np.asarray(fp16, dtype=np.float32) - np.asarray(fp32, dtype=np.float32)).mean() < 1.0
    assert time_upscaler(half, size=256, runs=2)["output"] == "1024x1024"


def test_train_sr_recipe_writes_a_loadable_model_and_reports_psnr(tmp_path):
    from safetensors import safe_open

    from rapid_diffusion_dev.recipes.train_sr import SRTrainConfig, train_sr

    out = tmp_path / "sr.safetensors"
    lines = []
    cfg = SRTrainConfig(out=out, steps=3, num_feat=8, num_conv=2, train_images=4, eval_images=2, batch_size=2, lr_patch=16)
    report = train_sr(cfg, log=lines.append)
    assert isinstance(load_sr_model(out), SRVGGNetCompact)
    assert report["gain_over_lanczos_db"] == pytest.approx(report["psnr_esrgan_db"] - report["psnr_lanczos_db"], abs=0.02)
    assert "held-out PSNR" in lines[-2] and "lanczos" in lines[-2]
    with safe_open(str(out), "pt") as f:
        assert '"steps": 3' in f.metadata()["recipe"]
