"""The shipped demo model: loads through the registry from rapid_diffusion/data/domains/demo.yaml, follows prompts,
and answers `rapid-diffusion generate` / `eval`; `train-demo` runs end to end (tiny settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.registry import ModelRegistry
from rapid_diffusion.paths import SHIPPED_DOMAINS_DIR

from helpers import DEMO_ADHERENCE_FLOOR, DEMO_MODEL, REPO_ROOT



@pytest.fixture(scope="module")
def demo():
    """The demo spec from the project's domains/ folder and a registry holding its model."""
    spec = load_domains([SHIPPED_DOMAINS_DIR])["demo"]
    registry = ModelRegistry(domains={"demo": spec})
    registry.get(spec)
    return spec, registry


def test_demo_domain_is_offline_ready_and_small():
    spec = load_domains([SHIPPED_DOMAINS_DIR])["demo"]
    assert spec.offline_ready and spec.model.path == DEMO_MODEL
    assert (spec.height, spec.width) == (64, 64) and len(spec.examples) >= 3
    if DEMO_MODEL.is_dir():
        weights = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*.safetensors"))
        assert 0 < weights <= 30 * 2**20
        assert not list(DEMO_MODEL.rglob("*.bin")) and not list(DEMO_MODEL.rglob("*.pt"))


def test_demo_model_loads_through_the_registry_with_the_pai_classes(demo):
    spec, registry = demo
    assert registry.state(spec) == "loaded"
    pipe = registry.get(spec).pipe
    names = {k: type(v).__name__ for k, v in pipe.components.items() if v is not None}
    assert names["text_encoder"] == "CLIPTextModel" and names["tokenizer"] == "BertTokenizer"
    assert names["unet"] == "UNet2DConditionModel" and names["vae"] == "AutoencoderKL"
    assert names["scheduler"] == "PNDMScheduler"
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16


def test_adherence_on_held_out_prompts_stays_above_the_floor(demo, tmp_path):
    from rapid_diffusion.demo.evaluate import evaluate

    spec, registry = demo
    report = evaluate(spec, registry, out=tmp_path, num_prompts=8, seed=0, images_per_prompt=2)
    assert (report["num_prompts"], report["num_images"]) == (8, 16)
    for metric, floor in DEMO_ADHERENCE_FLOOR.items():
        assert report["accuracy"][metric] >= floor, (metric, report["accuracy"])
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["accuracy"] == report["accuracy"] and len(saved["items"]) == 16
    assert len({item["seed"] for item in saved["items"]}) == 16
    assert Image.open(tmp_path / "contact_sheet.png").size[0] > 0


def test_generate_cli_works_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAPID_DIFFUSION_HOME": str(tmp_path / "home")}
    env.pop("RAPID_DIFFUSION_DOMAINS", None)
    command = [sys.executable, "-m", "rapid_diffusion", "generate", "--domain", "demo", "--prompt", "左边有一个大的红色圆形", "--seed", "3", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    [png] = sorted((tmp_path / "out").glob("*.png"))
    assert Image.open(png).size == (64, 64)


def test_eval_cli_writes_report_and_contact_sheet(tmp_path, monkeypatch):
    from rapid_diffusion.serving import cli

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAPID_DIFFUSION_DOMAINS", raising=False)
    assert cli.main(["eval", "--domain", "demo", "--out", str(tmp_path), "--num-prompts", "2", "--images-per-prompt", "2", "--steps", "10"]) == 0
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert (report["num_prompts"], report["num_images"], report["num_inference_steps"]) == (2, 4, 10)
    assert set(report["accuracy"]) == {"colour", "shape", "size", "position", "count"}
    assert (tmp_path / "contact_sheet.png").is_file()


def test_train_demo_runs_end_to_end_with_tiny_settings(tmp_path):
    from diffusers import StableDiffusionPipeline

    from rapid_diffusion_dev.recipes.train_demo import DemoRecipeConfig, train_demo

    config = DemoRecipeConfig(out=tmp_path / "model", num_scenes=32, vae_steps=2, vae_batch_size=2, unet_steps=2, batch_size=4, log_every=1, validate_every=0, validation_steps=1, guidance_choices=(5.0,), vae_eval_scenes=4)
    lines: list[str] = []
    train_demo(config, log=lines.append)
    assert any(line.startswith("vae step 2/2") for line in lines) and any("diffusion step 2/2" in line for line in lines)
    pipe = StableDiffusionPipeline.from_pretrained(config.out, safety_checker=None, requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("红色圆形", num_inference_steps=2, height=64, width=64, output_type="pil").images[0]
    assert image.size == (64, 64) and pipe.vae.config.scaling_factor > 0
    assert any(line.startswith("vae round trip, judged: colour") for line in lines)
    assert any(line.startswith("vae round trip on off-palette colours: mean error") for line in lines)
    assert any(line.startswith("validation at step 2: colour") for line in lines)
    assert any(line.startswith("chosen on validation: step 2") for line in lines)
    assert any(line.startswith("validation at guidance 5.0: colour") for line in lines)
    # The recipe's schedule (see train_demo's docstring): PNDM, DDPM's linear betas, v-prediction.
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert (scheduler.beta_schedule, scheduler.prediction_type) == ("linear", "v_prediction")


@pytest.mark.slow
def test_train_demo_cli_trains_and_saves_a_pipeline(tmp_path):
    """The command as a user runs it, with tiny settings (and v3's VAE loss, ``--vae-edge-weight 0``)."""
    out = tmp_path / "model"
    command = [sys.executable, "-m", "rapid_diffusion", "dev", "train-demo", "--out", str(out), "--vae-steps", "1", "--vae-edge-weight", "0",
               "--steps", "1", "--batch-size", "2", "--num-scenes", "16", "--threads", "1", "--vae-eval-scenes", "2",
               "--validation-steps", "1"]
    done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("vae step 1/1") for line in lines) and any("diffusion step 1/1" in line for line in lines)
    assert lines[-1] == f"model: {out}"
    assert (out / "model_index.json").is_file() and (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_train_demo_can_keep_a_trained_vae(tmp_path):
    from safetensors.torch import load_file

    from rapid_diffusion_dev.recipes.train_demo import DemoRecipeConfig, train_demo

    tiny = dict(num_scenes=16, vae_steps=1, vae_batch_size=2, unet_steps=1, batch_size=2, validate_every=0, validation_steps=1, guidance_choices=(),
                vae_eval_scenes=2)
    first = train_demo(DemoRecipeConfig(out=tmp_path / "a", **tiny), log=lambda line: None)
    lines: list[str] = []
    second = train_demo(DemoRecipeConfig(out=tmp_path / "b", seed=1, vae_from=first, **tiny), log=lines.append)
    assert not any(line.startswith("vae step") for line in lines)
    vae_a = load_file(first / "vae" / "diffusion_pytorch_model.safetensors")
    vae_b = load_file(second / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)


def test_vae_training_starts_with_a_narrow_posterior():
    """The decoder must not learn to decode through noise as large as the latents (see
    ``start_posterior_narrow``): at the start the posterior's std is exp(-5), not about 1."""
    from rapid_diffusion_dev.recipes.train_demo import build_vae, start_posterior_narrow

    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    wide = build_vae()
    assert wide.encode(x).latent_dist.std.mean() > 0.5
    narrow = build_vae()
    start_posterior_narrow(narrow, -10.0)
    posterior = narrow.encode(x).latent_dist
    assert posterior.std.shape == (2, 4, 16, 16)
    assert torch.allclose(posterior.std, torch.full_like(posterior.std, 2.718281828**-5), rtol=0.5)
    assert posterior.mean.std() > 20 * posterior.std.mean()


def test_vae_loss_weighs_objects_and_both_sides_of_their_outlines():
    """A 2x2 square on a dark ground: its pixels get the foreground weight plus the outline
    weight; the ground pixels next to it (not diagonal) the outline weight; a faint step (0.05,
    below the 0.1 threshold) and everything else nothing extra."""
    from rapid_diffusion_dev.recipes.train_demo import reconstruction_weight

    x = torch.full((1, 3, 6, 6), -1.0)
    x[..., 2:4, 2:4] = 0.8
    x[:, 0, 5, 5] = -0.95
    expected = torch.ones(6, 6)
    expected[2:4, 2:4] = 10.0 + 20.0
    for row, col in [(1, 2), (1, 3), (4, 2), (4, 3), (2, 1), (3, 1), (2, 4), (3, 4)]:
        expected[row, col] = 1.0 + 20.0
    assert torch.equal(reconstruction_weight(x, 10.0, 20.0), expected[None, None])
    assert torch.equal(reconstruction_weight(x, 10.0, 0.0), torch.where(expected == 30.0, 10.0, 1.0)[None, None])


def test_diffusion_loss_weighs_the_latent_cells_on_and_around_objects():
    """A 3x3 object at pixels (rows 20-22, columns 42-44) of a 64x64 scene lies in latent cells (5, 10) and
    (5, 11) (4x4 pixels each); with their neighbours that is rows 4-6, columns 9-12 of the
    16x16 grid, and nothing else. An empty scene has no weighted cell."""
    import numpy as np

    from rapid_diffusion_dev.recipes.train_demo import diffusion_weight, latent_object_masks

    images = np.full((2, 64, 64, 3), 90, dtype=np.uint8)
    images[0, 20:23, 42:45] = (230, 40, 40)
    masks = latent_object_masks(images)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:7, 9:13] = True
    assert masks.shape == (2, 1, 16, 16)
    assert torch.equal(masks[0, 0], expected)
    assert not masks[1].any()
    assert torch.equal(diffusion_weight(masks, 5.0)[0, 0], torch.where(expected, 5.0, 1.0))


def test_weighted_denoising_loss_is_the_weighted_mean_of_squared_errors():
    """Against a reference computed here: the same noise, timesteps and UNet output, weights
    broadcast over the 4 latent channels; weight 1 everywhere is the plain MSE."""
    from diffusers import DDPMScheduler

    from rapid_diffusion.training.core import denoising_loss

    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    timesteps = torch.tensor([10, 500])
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    prediction = torch.randn(2, 4, 4, 4)
    unet = lambda noisy, t, hidden, return_dict: (prediction,)  # noqa: E731
    weight = torch.ones(2, 1, 4, 4)
    weight[0, 0, 1, 2] = 9.0
    target = scheduler.get_velocity(latents, noise, timesteps)
    squared = (prediction - target) ** 2
    reference = (squared.sum() + 8.0 * squared[0, :, 1, 2].sum()) / (2 * 4 * 16 + 8.0 * 4)
    loss = denoising_loss(unet, scheduler, latents, torch.zeros(2, 3, 8), noise, timesteps, weight=weight)
    assert torch.allclose(loss, reference)
    plain = denoising_loss(unet, scheduler, latents, torch.zeros(2, 3, 8), noise, timesteps)
    assert torch.allclose(denoising_loss(unet, scheduler, latents, torch.zeros(2, 3, 8), noise, timesteps, weight=torch.ones(2, 1, 4, 4)), plain)
    assert not torch.allclose(loss, plain)


def test_training_steps_are_chosen_on_the_validation_split_only(monkeypatch):
    """Checkpoints are judged from ``select_from`` on and at the end, on validation prompts only."""
    from rapid_diffusion.demo import evaluate
    from rapid_diffusion_dev.recipes import train_demo
    from rapid_diffusion_dev.recipes.train_demo import DemoRecipeConfig, is_validation_step

    config = DemoRecipeConfig(unet_steps=10000, validate_every=1000, select_from=5000)
    chosen = [step for step in range(1, 10001) if is_validation_step(step, config)]
    assert chosen == [5000, 6000, 7000, 8000, 9000, 10000]
    asked = []
    monkeypatch.setattr(train_demo, "split_prompts", lambda split: asked.append(split) or evaluate.split_prompts(split)[:2])

    class Judged:
        def __call__(self, prompts, **kwargs):
            return type("Output", (), {"images": [Image.new("RGB", (64, 64), "grey")] * len(prompts)})()

        def set_progress_bar_config(self, **kwargs):
            pass

    monkeypatch.setattr(train_demo, "assemble_pipeline", lambda *args: Judged())
    scores = train_demo.validation_adherence(None, None, None, None, guidance=5.0, steps=1)
    assert asked == ["validation"] and scores == {"colour": 0.0, "shape": 0.0, "position": 0.0}
