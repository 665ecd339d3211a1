"""``rapid-diffusion import``: checkpoints people have -> a registered domain that draws the same pixels.

A tiny PAI-class pipeline (diffusers format) is written out by ``ldm_layouts`` in each source
layout: a single-file SD ``.safetensors`` and ``.ckpt`` with CompVis keys, and EasyNLP fine-tune
folders (today's and the 2022 split layout). Those writers walk the diffusers modules and name
each tensor after the original CompVis / EasyNLP / ESRGAN module attributes; the importer reads
them back through diffusers' ``convert_ldm_*`` functions, so a name wrong on either side shows up
as a missing tensor or as different pixels. Each import must then generate the original's pixels
(max difference 1/255) for the same prompt and seed; for EasyNLP the original's conditioning is
computed by ``ldm_layouts.WukongReference`` from the written Wukong weights, as EasyNLP does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm_layouts
from helpers import REPO_ROOT, write_domain
from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.importing import ImportFailed, import_checkpoint, imported_models_dir
from rapid_diffusion.generation.pipeline import generate
from rapid_diffusion.generation.request import GenerationRequest
from rapid_diffusion.models.registry import ModelRegistry
from rapid_diffusion.training.train import TrainConfig, TrainingError, train
from rapid_diffusion.upscaling.esrgan import load_sr_model

PROMPT = "左边有一个红色的圆形"
SEED = 7
WEIGHT_FILES = ("*.safetensors", "*.bin")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The tiny original pipeline and its diffusers folder."""
    folder = tmp_path_factory.mktemp("original")
    return ldm_layouts.compvis_pipeline(folder / "model"), folder / "model"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAPID_DIFFUSION_DOMAINS", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def config_only(original, tmp_path_factory) -> Path:
    """The original's folder without a single weight file: architecture, tokenizer and scheduler only."""
    target = tmp_path_factory.mktemp("config") / "pai-config"
    shutil.copytree(original[1], target, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    assert not [p for pattern in WEIGHT_FILES for p in target.rglob(pattern)]
    return target


def request() -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, seed=SEED, num_inference_steps=4)


def imported_image(domain_id: str, registry: ModelRegistry | None = None):
    """Generated the way every face does: domain spec -> registry (its prompt-encoder hook) -> generate."""
    registry = registry or ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    spec = load_domains()[domain_id]
    return np.asarray(registry.get(spec).run(spec, [request()])[0].images[0], dtype=np.int16)


def original_image(pipe, domain_id: str, encode_prompt=None):
    """The original pipeline with the imported domain's settings (size, steps, guidance, sampler)."""
    spec = load_domains()[domain_id]
    return np.asarray(generate(pipe, [request()], spec=spec, encode_prompt=encode_prompt)[0].images[0], dtype=np.int16)


def leftovers(home: Path, name: str) -> list[str]:
    models = imported_models_dir()
    found = [p.name for p in models.iterdir()] if models.is_dir() else []
    return found + [p.name for p in (home / "domains").glob(f"*{name}*")]


# ----------------------------------------------------------------------------- round trips


def test_single_file_safetensors_round_trip_through_the_command(original, config_only, home, tmp_path):
    """The CLI as a subprocess: SD single-file keys + a weightless config folder -> the same pixels."""
    pipe, _ = original
    checkpoint = tmp_path / "pai-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_layouts.single_file_state(pipe).items()}, str(checkpoint))
    env = {**os.environ, "RAPID_DIFFUSION_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "rapid_diffusion", "import", str(checkpoint), "--name", "sd-single", "--config", str(config_only)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"model: {home / 'models' / 'sd-single'}" in done.stdout and "domain: sd-single" in done.stdout
    assert "converting the UNet" in done.stderr  # progress is reported
    spec = load_domains()["sd-single"]
    assert spec.model.path == (home / "models" / "sd-single").resolve() and (spec.height, spec.width) == (64, 64)
    difference = np.abs(imported_image("sd-single") - original_image(pipe, "sd-single")).max()
    assert difference <= 1, f"imported model differs from the original by {difference}/255"


def test_ckpt_with_state_dict_wrapper_round_trip(original, config_only, home, tmp_path, monkeypatch):
    """A Lightning ``.ckpt``; the architecture named by a domain id (a domain on the config folder)."""
    pipe, _ = original
    checkpoint = tmp_path / "pai-tiny.ckpt"
    torch.save({"state_dict": ldm_layouts.single_file_state(pipe), "global_step": 1234, "epoch": 3}, checkpoint)
    (tmp_path / "domains").mkdir()
    write_domain(tmp_path / "domains", "pai-arch", config_only)
    monkeypatch.setenv("RAPID_DIFFUSION_DOMAINS", str(tmp_path / "domains"))
    result = import_checkpoint(checkpoint, "sd-ckpt", config="pai-arch")
    assert result.layout == "single-file Stable Diffusion" and result.sr_weights is None
    assert np.abs(imported_image("sd-ckpt") - original_image(pipe, "sd-ckpt")).max() <= 1


@pytest.mark.parametrize("split", [False, True], ids=["one-file", "2022-split-files"])
def test_easynlp_folder_round_trip(original, home, tmp_path, split):
    """EasyNLP's Wukong conditioning (one pooled, normalised vector) is reproduced, and the EMA
    weights are the ones taken (the trained weights in the file are perturbed)."""
    pipe, _ = original
    projection = torch.randn(32, 32, generator=torch.Generator().manual_seed(1)) / 32**0.5
    wukong = ldm_layouts.write_easynlp_folder(pipe, tmp_path / "easynlp", projection, split=split)
    lines = []
    result = import_checkpoint(tmp_path / "easynlp", "easy", log=lines.append)
    assert result.layout == "EasyNLP latent diffusion"
    assert any("EMA" in note for note in result.notes) and any("EMA" in line for line in lines)
    reference = ldm_layouts.WukongReference(wukong, pipe.tokenizer, heads=pipe.text_encoder.config.num_attention_heads)
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    loaded = registry.get(load_domains()["easy"])
    for ours, theirs in zip(loaded.encode_prompt(PROMPT, "cpu", 1, True), reference(PROMPT, "cpu", 1, True)):
        assert ours.shape == theirs.shape == (1, 1, 32) and torch.allclose(ours, theirs, atol=1e-5)
    expected = original_image(pipe, "easy", encode_prompt=reference)
    assert np.abs(imported_image("easy", registry) - expected).max() <= 1
    # Negative control: the per-token conditioning of a plain SD pipeline draws something else.
    assert np.abs(original_image(pipe, "easy") - expected).max() > 5


def test_easynlp_sr_weights_are_converted_to_rgb(original, home, tmp_path):
    """``RRDB_ESRGAN_x4.pth`` runs in BGR (EasyNLP flips the image around it); the copy beside the
    model runs in RGB and gives what EasyNLP's ``super_resolution`` gives."""
    pipe, _ = original
    folder = tmp_path / "easynlp"
    ldm_layouts.write_easynlp_folder(pipe, folder, torch.eye(32), split=False)
    ldm_layouts.write_original_esrgan(folder / "RRDB_ESRGAN_x4.pth")
    result = import_checkpoint(folder, "easy-sr")
    assert result.sr_weights == result.model_dir / "esrgan_x4.safetensors"
    assert load_domains()["easy-sr"].sr_weights.path == result.sr_weights.resolve()
    image = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    bgr_model = load_sr_model(folder / "RRDB_ESRGAN_x4.pth")
    with torch.no_grad():
        easynlp = bgr_model(image[:, [2, 1, 0]])[:, [2, 1, 0]]
        imported = load_sr_model(result.sr_weights)(image)
        assert torch.allclose(imported, easynlp, atol=1e-5)
        assert not torch.allclose(bgr_model(image), easynlp, atol=1e-2)  # the channel order matters


def test_fine_tuning_an_imported_wukong_model_is_refused_with_the_reason(original, home, tmp_path):
    """The trainer conditions on per-token states; on a pooled-conditioning base it would train
    something else than the model generates with, so it stops before the first step."""
    from accelerate.state import AcceleratorState

    pipe, _ = original
    ldm_layouts.write_easynlp_folder(pipe, tmp_path / "easynlp", torch.eye(32), split=False)
    import_checkpoint(tmp_path / "easynlp", "easy-base")
    data = tmp_path / "pairs"
    data.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "0.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "红色"}, ensure_ascii=False) + "\n", encoding="utf-8")
    try:
        with pytest.raises(TrainingError, match="暂不支持在其上微调"):
            train(TrainConfig(base="easy-base", data=data, output=tmp_path / "run", max_steps=1), log=lambda *_: None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------- what is found, what is expected


def test_unknown_layout_names_what_is_there_and_what_is_expected(home, tmp_path):
    folder = tmp_path / "something"
    (folder / "weights").mkdir(parents=True)
    (folder / "notes.txt").write_text("hi", encoding="utf-8")
    (folder / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    with pytest.raises(ImportFailed) as caught:
        import_checkpoint(folder, "unknown")
    message = str(caught.value)
    assert message.startswith("无法识别的模型格式")
    for found in ("notes.txt", "weights/", "config.json (not an LDM config"):
        assert found in message
    assert "first_stage_config" in message and ".safetensors / .ckpt" in message


def test_other_inputs_get_their_own_message(original, home, tmp_path):
    _, folder = original
    archive = tmp_path / "model.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    cases = {
        folder: "已是 diffusers 模型文件夹",
        archive: "zip 文件不会被解压",
        tmp_path / "absent.ckpt": "找不到",
        tmp_path / "notes.txt": "无法识别的模型格式",
    }
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    for path, expected in cases.items():
        with pytest.raises(ImportFailed, match=expected):
            import_checkpoint(path, "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip", "notes.txt"]  # nothing extracted
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ImportFailed, match="--config"):
        import_checkpoint(tmp_path / "m.safetensors", "other")
    with pytest.raises(ImportFailed, match="既不是文件夹，也不是领域 id"):
        import_checkpoint(tmp_path / "m.safetensors", "other", config="no-such-domain")


def test_weights_in_another_readable_format_are_read(original, home, tmp_path):
    """safetensors where EasyNLP writes .bin/.ckpt: read, not reported missing."""
    pipe, _ = original
    ldm_layouts.write_easynlp_folder(pipe, tmp_path / "easynlp", torch.eye(32), split=True, suffix=".safetensors")
    assert not list((tmp_path / "easynlp").rglob("*.bin")) and not list((tmp_path / "easynlp").rglob("*.ckpt"))
    assert import_checkpoint(tmp_path / "easynlp", "easy-st").model_dir.is_dir()


def test_weights_in_an_unread_format_are_named_not_called_missing(original, home, tmp_path):
    pipe, _ = original
    folder = tmp_path / "easynlp"
    ldm_layouts.write_easynlp_folder(pipe, folder, torch.eye(32), split=False)
    (folder / "pytorch_model.bin").rename(folder / "pytorch_model.msgpack")
    with pytest.raises(ImportFailed) as caught:
        import_checkpoint(folder, "easy-flax")
    message = str(caught.value)
    assert "pytorch_model.msgpack" in message and "Flax" in message
    assert "缺少" not in message and "no diffusion weights" not in message
    (folder / "pytorch_model.msgpack").unlink()
    with pytest.raises(ImportFailed, match="缺少扩散模型权重"):
        import_checkpoint(folder, "easy-flax")


def test_names_that_collide_or_are_invalid_are_refused_before_any_work(original, config_only, home, tmp_path):
    pipe, _ = original
    checkpoint = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_layouts.single_file_state(pipe).items()}, str(checkpoint))
    with pytest.raises(ImportFailed, match="「demo」已是一个领域"):
        import_checkpoint(checkpoint, "demo", config=config_only)  # a shipped domain
    with pytest.raises(ImportFailed, match="名称只能用小写字母"):
        import_checkpoint(checkpoint, "我的 模型", config=config_only)
    first = import_checkpoint(checkpoint, "mine", config=config_only)
    before = sorted(p.name for p in first.model_dir.rglob("*"))
    with pytest.raises(ImportFailed, match="「mine」已是一个领域"):
        import_checkpoint(checkpoint, "mine", config=config_only)
    assert sorted(p.name for p in first.model_dir.rglob("*")) == before and first.domain_file.is_file()


# ----------------------------------------------------------------------------- broken files leave nothing behind


def test_truncated_checkpoints_fail_clearly_and_leave_nothing(original, config_only, home, tmp_path):
    pipe, _ = original
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_layouts.single_file_state(pipe).items()}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImportFailed, match="无法安全读取 cut.safetensors"):
        import_checkpoint(cut, "broken", config=config_only)
    folder = tmp_path / "easynlp"
    ldm_layouts.write_easynlp_folder(pipe, folder, torch.eye(32), split=False)
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImportFailed, match="无法安全读取 pytorch_model.bin"):
        import_checkpoint(folder, "broken")
    assert leftovers(home, "broken") == []


def test_a_checkpoint_missing_tensors_names_the_component(original, config_only, home, tmp_path):
    pipe, _ = original
    state = ldm_layouts.single_file_state(pipe)
    dropped = next(k for k in state if k.startswith("first_stage_model.decoder.up."))
    del state[dropped]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ImportFailed) as caught:
        import_checkpoint(tmp_path / "m.safetensors", "partial", config=config_only)
    assert "VAE" in str(caught.value) and "missing decoder.up_blocks" in str(caught.value)
    assert leftovers(home, "partial") == []


def test_a_failure_after_the_folder_is_written_removes_it(original, config_only, home, tmp_path, monkeypatch):
    pipe, _ = original
    save_file({k: v.contiguous() for k, v in ldm_layouts.single_file_state(pipe).items()}, str(tmp_path / "m.safetensors"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("rapid_diffusion.models.importing.write_domain_yaml", disk_full)
    with pytest.raises(OSError):
        import_checkpoint(tmp_path / "m.safetensors", "late", config=config_only)
    assert leftovers(home, "late") == []


def test_pickled_code_in_a_ckpt_is_refused_without_running(config_only, home, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(ImportFailed, match="无法安全读取 evil.ckpt"):
        import_checkpoint(tmp_path / "evil.ckpt", "evil", config=config_only)
    assert not marker.exists()


class _Payload:
    """Unpickling this would create ``path``; ``weights_only`` loading must refuse it instead."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
