"""Ahead-of-time compilation of the UNet (speed/ahead_of_time.py): ``compile`` and ``auto`` on ZeroGPU.

On the shipped demo pipeline, with the real ``spaces`` package: its capture sees the UNet's real
call; ``torch.export`` with the dynamic shapes gives the eager UNet's outputs at batch sizes and
sizes other than the captured one; the installed forward routes covered calls to the compiled
callable and the rest to the eager UNet, generation unchanged; failures leave the eager UNet with
the reason. ``spaces.aoti_compile`` (AOTInductor) does run on a CPU but took 166 s for the demo UNet
here, so the fast tests stand in for it with the exported program itself (that one boundary only)
and one slow test runs it for real. Not covered without a GPU: ZeroGPU's worker pickling the
compiled binary's weights back (pinned memory needs CUDA), the timings (``dev bench --aot``).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from helpers import write_domain
from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.registry import ModelRegistry, load_pipeline
from rapid_diffusion.paths import DEMO_MODEL_DIR
from rapid_diffusion.service.app import AppService
from rapid_diffusion.serving import zerogpu
from rapid_diffusion.speed import ahead_of_time as aot
from rapid_diffusion.speed.levels import WARMUP_PROMPT

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spaces_aoti():
    """The real package's ``spaces.aoti_*``. Importing them reads two things only a CUDA build of
    torch has (its CUDA version string, ``torch._C._cuda_init``); this is the CPU build, so those are
    stood in for while importing (tests/zerogpu_host.py stands in for the same)."""
    import spaces

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.version, "cuda", "12.8")
        patch.setattr(torch._C, "_cuda_init", lambda: None, raising=False)
        from spaces.zero.torch import aoti  # noqa: F401

    return spaces


def demo_pipe():
    return load_pipeline(DEMO_MODEL_DIR, CPU, torch.float32)


@pytest.fixture(scope="module")
def exported(spaces_aoti):
    """The demo UNet's captured call and its export with the dynamic shapes (about 20 s)."""
    pipe = demo_pipe()
    call = aot.capture_unet_call(pipe, spaces_aoti.aoti_capture, 64, 64)
    shapes = aot.shape_range(pipe)
    return pipe, call, shapes, aot.export_unet(pipe.unet, call, shapes)


def generate(pipe, size: int = 64, images: int = 1, guidance: float = 5.0) -> np.ndarray:
    return pipe("一只橘猫", height=size, width=size, num_inference_steps=3, guidance_scale=guidance, num_images_per_prompt=images,
                generator=torch.Generator("cpu").manual_seed(7), output_type="np").images


class Recorder:
    """A stand-in compiled callable: the exported program (what ``spaces.aoti_compile`` compiles),
    counting its calls."""

    def __init__(self, program: torch.export.ExportedProgram):
        self.module = program.module()
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_the_capture_sees_the_unets_real_call_and_does_not_run_it(spaces_aoti):
    pipe = demo_pipe()
    ran = []
    pipe.unet.register_forward_hook(lambda *a: ran.append(1))
    call = aot.capture_unet_call(pipe, spaces_aoti.aoti_capture, 64, 64)
    signature = aot.call_signature(pipe.unet, call.args, call.kwargs)
    # What diffusers' StableDiffusionPipeline passes its UNet, by the forward's own parameter names.
    assert list(signature) == ["sample", "timestep", "encoder_hidden_states", "timestep_cond", "cross_attention_kwargs",
                               "added_cond_kwargs", "return_dict"]
    assert signature["return_dict"] is False and ran == []
    # Independent references: the prompt's embeddings under classifier-free guidance, the seeded latents, the first timestep.
    positive, negative = pipe.encode_prompt(WARMUP_PROMPT, CPU, 1, True)
    torch.testing.assert_close(call.kwargs["encoder_hidden_states"], torch.cat([negative, positive]))
    latent = 64 // pipe.vae_scale_factor
    noise = torch.randn((1, 4, latent, latent), generator=torch.Generator("cpu").manual_seed(0))
    torch.testing.assert_close(call.args[0], torch.cat([noise, noise]) * pipe.scheduler.init_noise_sigma)
    pipe.scheduler.set_timesteps(1)
    assert int(call.args[1]) == int(pipe.scheduler.timesteps[0])


@pytest.mark.slow  # torch.export of the demo UNet with dynamic shapes: 20-40 s here
@pytest.mark.parametrize(("batch", "latent"), [(1, 16), (3, 24), (16, 8)])
def test_the_exported_unet_equals_the_eager_one_at_other_batches_and_sizes(exported, batch, latent):
    pipe, call, shapes, program = exported
    assert call.args[0].shape == (2, 4, 16, 16)  # captured: one image with guidance at 64x64
    sample = torch.randn(batch, 4, latent, latent, generator=torch.Generator().manual_seed(batch))
    text = torch.randn(batch, *call.kwargs["encoder_hidden_states"].shape[1:], generator=torch.Generator().manual_seed(1))
    arguments = {**call.kwargs, "encoder_hidden_states": text}
    with torch.no_grad():
        expected = pipe.unet(sample, call.args[1], **arguments)[0]
        actual = program.module()(sample, call.args[1], **arguments)[0]
    assert actual.shape == expected.shape == sample.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert aot.CoveredCall(pipe.unet, aot.call_signature(pipe.unet, call.args, call.kwargs), shapes)((sample, call.args[1]), arguments)


@pytest.mark.slow  # torch.export of the demo UNet with dynamic shapes: 20-40 s here
def test_shapes_outside_the_export_are_refused_by_it_and_not_covered(exported):
    pipe, call, shapes, program = exported
    covers = aot.CoveredCall(pipe.unet, aot.call_signature(pipe.unet, call.args, call.kwargs), shapes)
    text = call.kwargs["encoder_hidden_states"]
    odd = torch.randn(2, 4, 18, 18)  # 72x72: a multiple of 8 pixels, not of the UNet's stride
    assert not covers((odd, call.args[1]), {**call.kwargs, "encoder_hidden_states": text})
    with pytest.raises(Exception):
        program.module()(odd, call.args[1], **{**call.kwargs, "encoder_hidden_states": text})
    assert not covers((call.args[0], call.args[1]), {**call.kwargs, "encoder_hidden_states": text[:, :-1]})  # other text length
    assert not covers((call.args[0].half(), call.args[1]), dict(call.kwargs))  # other dtype
    assert not covers((call.args[0], call.args[1]), {**call.kwargs, "return_dict": True})  # other output form
    assert shapes.describe(pipe.vae_scale_factor) == "UNet batch 1-16, sides 32-1024 px in steps of 16"


@pytest.mark.slow  # torch.export of the demo UNet with dynamic shapes: 20-40 s here
def test_compiled_generation_equals_eager_and_other_shapes_run_eager(spaces_aoti, monkeypatch):
    pipe = demo_pipe()
    before = {(size, images): generate(pipe, size, images) for size, images in [(64, 1), (96, 2), (72, 1)]}
    recorders = []

    def stand_in_compile(program, configs):
        recorders.append(Recorder(program))
        return recorders[-1]

    monkeypatch.setattr(spaces_aoti, "aoti_compile", stand_in_compile)
    gpu_calls = []
    acceleration = aot.compile_ahead_of_time(pipe, "compile", lambda task: gpu_calls.append(task) or task(), log=lambda m: None)
    assert (acceleration.state, acceleration.applied) == ("compiled", "aot") and len(gpu_calls) == 1
    assert "batch 1-16, sides 32-1024 px in steps of 16; other shapes run eager" in acceleration.reason
    (compiled,) = recorders
    unet_calls = []
    pipe.unet.register_forward_hook(lambda *a: unet_calls.append(1))
    for size, images in [(64, 1), (96, 2)]:
        calls, total = compiled.calls, len(unet_calls)
        np.testing.assert_allclose(generate(pipe, size, images), before[(size, images)], atol=1e-4)
        assert compiled.calls - calls == len(unet_calls) - total >= 3  # every UNet call on the compiled callable
    calls, total = compiled.calls, len(unet_calls)
    np.testing.assert_allclose(generate(pipe, 72, 1), before[(72, 1)], atol=1e-6)  # 72 px: eager
    assert compiled.calls == calls and len(unet_calls) > total


def test_an_export_failure_leaves_the_eager_unet_and_says_why(spaces_aoti, monkeypatch, caplog):
    pipe = demo_pipe()
    expected = generate(pipe)

    def refuse(*args, **kwargs):
        raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.DYNAMIC_CONTROL_FLOW, "data-dependent branch")

    monkeypatch.setattr(torch.export, "export", refuse)
    lines = []
    acceleration = aot.compile_ahead_of_time(pipe, "auto", lambda task: task(), log=lines.append)
    assert acceleration.state == "failed" and acceleration.applied == "none"
    assert acceleration.reason == lines[-1]
    assert lines[-1].startswith("ahead-of-time compilation failed (UserError: data-dependent branch") and lines[-1].endswith("plain diffusers")
    assert "forward" not in vars(pipe.unet)
    np.testing.assert_array_equal(generate(pipe), expected)


def test_openvino_has_no_ahead_of_time_path_and_stays_eager():
    pipe = demo_pipe()
    acceleration = aot.compile_ahead_of_time(pipe, "openvino", lambda task: pytest.fail("no GPU call"), log=lambda m: None)
    assert (acceleration.state, acceleration.applied) == ("eager", "none") and "OpenVINO runs on the CPU only" in acceleration.reason
    assert "forward" not in vars(pipe.unet)


@pytest.mark.slow  # torch.export of the demo UNet with dynamic shapes: 20-40 s here
def test_on_zerogpu_start_compiles_the_preloaded_domains_and_healthz_says_which_path_serves(spaces_aoti, tmp_path, monkeypatch):
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "fast", DEMO_MODEL_DIR, optimization="compile")
    write_domain(folder, "cpu-only", DEMO_MODEL_DIR, optimization="openvino")
    write_domain(folder, "plain", DEMO_MODEL_DIR)
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAPID_DIFFUSION_MAX_MODELS", "3")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    service = AppService(registry=ModelRegistry(domains=load_domains([folder]), device=CPU, dtype=torch.float32))
    monkeypatch.setattr(spaces_aoti, "aoti_compile", lambda program, configs: Recorder(program))
    gpu_tasks = []
    monkeypatch.setattr(zerogpu, "startup_gpu_call", lambda task: gpu_tasks.append(task) or task())
    from spaces import zero

    packed = []
    monkeypatch.setattr(zero, "startup", lambda: packed.append(len(gpu_tasks)), raising=False)
    zerogpu.start(service)
    assert packed == [1]  # one GPU call (the compile domain's), before the weights are packed
    health = service.health()["acceleration"]
    assert health["fast"]["state"] == "compiled" and health["fast"]["applied"] == "aot"
    assert health["fast"]["reason"].startswith("ahead of time (spaces.aoti) in ")
    assert health["cpu-only"] == {"state": "eager", "level": "openvino", "applied": "none",
                                  "reason": "openvino: no ahead-of-time path (OpenVINO runs on the CPU only); plain diffusers"}
    assert health["plain"] == {"state": "eager", "level": "none", "applied": "none", "reason": ""}


def test_on_zerogpu_a_refused_gpu_call_at_start_leaves_the_domain_eager_with_the_reason(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "domains"
    folder.mkdir()
    write_domain(folder, "fast", DEMO_MODEL_DIR, optimization="auto")
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    service = AppService(registry=ModelRegistry(domains=load_domains([folder]), device=CPU, dtype=torch.float32))

    def refused(task):
        raise RuntimeError("ZeroGPU worker error: GPU task aborted")

    monkeypatch.setattr(zerogpu, "startup_gpu_call", refused)
    from spaces import zero

    monkeypatch.setattr(zero, "startup", lambda: None, raising=False)
    with caplog.at_level(logging.INFO):
        zerogpu.start(service)
    acceleration = service.health()["acceleration"]["fast"]
    assert acceleration["state"] == "failed"
    assert acceleration["reason"] == "ahead-of-time compilation failed (RuntimeError: ZeroGPU worker error: GPU task aborted); plain diffusers"
    assert "ahead-of-time compilation: fast failed" in caplog.text


@pytest.mark.long  # 166 s of spaces.aoti_compile alone on 2 idle cores: run with `pytest -m long`
def test_the_full_path_with_aotinductor_on_the_cpu_equals_eager(spaces_aoti):
    """capture, export, ``spaces.aoti_compile`` (AOTInductor's C++ build: minutes on 2 cores), install."""
    pipe = demo_pipe()
    before = generate(pipe, 64, 2)
    acceleration = aot.compile_ahead_of_time(pipe, "compile", lambda task: task(), log=lambda m: None)
    assert acceleration.state == "compiled", acceleration.reason
    assert type(pipe.unet.forward.compiled).__name__ == "ZeroGPUCompiledModel"
    np.testing.assert_allclose(generate(pipe, 64, 2), before, atol=1e-4)


def test_the_aot_bench_says_it_needs_a_gpu(capsys):
    from rapid_diffusion.serving.cli import main

    assert main(["dev", "bench", "--aot", "--device", "cpu", "--model", "tiny-random"]) == 2
    assert "dev bench --aot measures the ZeroGPU path: it needs --device cuda and a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: AOTInductor builds CUDA kernels and the bench times them")
def test_the_aot_bench_on_a_gpu_compiles_once_and_times_every_ui_size(tmp_path, capsys):
    import json

    from rapid_diffusion.serving.cli import main

    out = tmp_path / "aot.json"
    assert main(["dev", "bench", "--aot", "--device", "cuda", "--model", "tiny-random", "--steps", "2", "--runs", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["acceleration"]["state"] == "compiled" and result["acceleration"]["applied"] == "aot"
    sizes = {(row["height"], row["width"], row["images"]) for row in result["rows"]["aot"]}
    assert sizes == {(h, w, n) for h, w in [(512, 512), (768, 512), (512, 768), (768, 768), (256, 256)] for n in (1, 4)}
    assert result["compile_s"] > 0 and result["speedup_512"] > 0 and result["max_abs_diff_512"] < 0.05
    assert "| aot | 512x512 | 1 |" in capsys.readouterr().out
