"""Prior preservation and the before/after figures, piece by piece (fast: no training run here).

- the prompts from outside the upload: the base's examples and the captions with the new words taken out;
- the loss: the user's pairs' plus the chosen weight times the prior pairs', against a computation by hand;
- the figures: the demo judge's score, the pixel change, the sentences the tab and the CLI show;
- the tab's time estimate includes the prior pairs' generation.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rapid_diffusion.demo import world
from rapid_diffusion.messages import say
from rapid_diffusion.paths import DEMO_MODEL_DIR
from rapid_diffusion.training import comparison, options
from rapid_diffusion.training.dataset import PairDataset, seeded_batch
from rapid_diffusion.training.options import PRIOR_WEIGHTS, PRESETS, TrainConfig, estimate_seconds
from rapid_diffusion.training.prior import new_words, outside_prompts, prior_plan
from rapid_diffusion.training.run_files import comparison_lines
from rapid_diffusion.training.trainer import step_loss

DEMO_EXAMPLES = ["左边有一个大的红色圆形", "中间有一个蓝色的正方形", "上面有一个小的黄色三角形", "右边是一个绿色的星形", "左边是紫色菱形，右边是橙色圆形"]


def test_new_words_are_what_most_captions_share_and_no_example_contains():
    pink = ["左边有一个大的粉色圆形", "右边有一个小的粉色正方形", "中间是粉色的三角形", "下面有一个粉色星形"]
    assert new_words(pink, DEMO_EXAMPLES) == ["粉色"], "下 is in one caption of four: a word, not the concept; 粉 grows to 粉色"
    half_disc = ["左边有一个大的红色半圆形", "右边有一个小的蓝色半圆形", "一个绿色的半圆形"]
    assert new_words(half_disc, DEMO_EXAMPLES) == ["半圆形"], "every caption has 圆形 after 半; what comes before varies"
    assert new_words(["我的小猫在左边", "我的小猫在中间"], DEMO_EXAMPLES) == ["我的小猫在"], "two runs, one shared phrase"
    assert new_words(["小猫", "一个小猫", "猫在左边", "大猫"], DEMO_EXAMPLES) == ["猫"], "neighbours differ or end the caption"


def test_outside_prompts_are_the_examples_then_the_captions_without_their_new_words():
    captions = ["左边有一个大的粉色圆形", "右边有一个小的粉色星形", "左边有一个大的粉色圆形", "粉色"]
    prompts = outside_prompts(captions, DEMO_EXAMPLES)
    assert prompts == [*DEMO_EXAMPLES, "左边有一个大的圆形", "右边有一个小的星形"], "duplicates and empty prompts go"
    assert not any("粉" in p for p in prompts) and not set(prompts) & set(captions)
    plan = prior_plan(prompts, 8, seed=3)
    assert [p for p, _ in plan] == (prompts * 2)[:8] and len({s for _, s in plan}) == 8 and min(s for _, s in plan) > 3


def square(colour, side=32) -> Image.Image:
    pixels = np.full((side, side, 3), 128, dtype=np.uint8)
    pixels[8:24, 8:24] = colour
    return Image.fromarray(pixels)


def pair(text, colour):
    return SimpleNamespace(text=text, image=lambda: square(colour))


def hand_loss(pipe, scheduler, batch) -> torch.Tensor:
    """The denoising MSE of one batch, written out: posterior mean latents, noise, timesteps, target."""
    latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    alpha = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    target = noise if scheduler.config.prediction_type == "epsilon" else alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    hidden = pipe.text_encoder(batch["input_ids"])[0]
    return ((pipe.unet(noisy, timesteps, hidden).sample - target) ** 2).mean()


@pytest.mark.parametrize("choice", ["off", "normal", "strong"])
def test_the_loss_adds_the_prior_pairs_loss_at_the_chosen_weight(tiny_model_dir, choice):
    from diffusers import DDPMScheduler

    from rapid_diffusion.training.publish import load_fp32_pipeline

    pipe = load_fp32_pipeline(tiny_model_dir)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    users = PairDataset([pair("红色的方块", (230, 30, 30)), pair("蓝色的方块", (30, 30, 230))], pipe.tokenizer, 32, True, False, 0)
    prior = PairDataset([pair(f"绿色的圆形{i}", (30, 200, 30)) for i in range(5)], pipe.tokenizer, 32, True, False, 0)
    config = TrainConfig(base="b", data=".", output=".", prior_preservation=choice, seed=7, snr_gamma=0.0)
    run = SimpleNamespace(
        config=config, unet=pipe.unet, text_encoder=pipe.text_encoder, vae=pipe.vae, noise_scheduler=scheduler,
        weight_dtype=torch.float32, unet_max_timestep=None, prior=None if choice == "off" else prior,
        accelerator=SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu")),
    )
    batch = torch.utils.data.default_collate([users[0], users[1]])
    with torch.no_grad():
        torch.manual_seed(0)
        total, instance, prior_loss = step_loss(run, batch, step=3)
        torch.manual_seed(0)
        expected_instance = hand_loss(pipe, scheduler, batch)
        if choice == "off":
            assert prior_loss is None and torch.equal(total, instance)
            torch.testing.assert_close(total, expected_instance)
            return
        prior_batch = seeded_batch(prior, options.prior_batch_size(2), 7 + 3)
        assert len(prior_batch["input_ids"]) == 1
        expected_prior = hand_loss(pipe, scheduler, prior_batch)
    torch.testing.assert_close(instance, expected_instance)
    torch.testing.assert_close(prior_loss, expected_prior)
    torch.testing.assert_close(total, expected_instance + PRIOR_WEIGHTS[choice] * expected_prior)
    assert PRIOR_WEIGHTS[choice] > 0


def scene_image(colour: str, shape: str, position: str) -> Image.Image:
    return world.render(world.Scene((world.SceneObject(colour, shape, "大", position),), 130))


def test_the_judge_figure_scores_the_outside_prompts_and_the_pixel_change_is_zero_for_the_same_images():
    prompts = ["左边有一个大的红色圆形", "中间有一个大的蓝色正方形"]
    right = [scene_image("红色", "圆形", "左"), scene_image("蓝色", "正方形", "中")]
    wrong = [scene_image("绿色", "三角形", "右"), scene_image("黄色", "星形", "上")]
    assert comparison.judged_score(right, prompts) == 1.0
    assert comparison.judged_score(wrong, prompts) == 0.0
    assert comparison.pixel_change(right, right) == 0.0
    black, white = Image.new("RGB", (8, 8), "black"), Image.new("RGB", (8, 8), "white")
    assert comparison.pixel_change([black], [white]) == 100.0
    assert comparison.judge_applies(DEMO_MODEL_DIR) and not comparison.judge_applies(DEMO_MODEL_DIR.parent)


def test_the_figures_read_as_sentences_and_a_missing_clip_model_as_one_bilingual_line():
    figures = {"fit_on": "held_out", "fit_loss_before": 0.5, "fit_loss_after": 0.4, "outside_prompts": ["a", "b"],
               "outside_changed": 3.25, "judge_before": 0.9, "judge_after": 0.81, "clip_unavailable": True}
    lines = comparison_lines(figures)
    assert lines == [
        say("compare_closer_held_out", before=0.5, after=0.4, change=-20.0),
        say("compare_outside_changed", count=2, changed=3.25),
        say("compare_outside_judge", before=0.9, after=0.81, kept=90.0),
        say("compare_clip_unavailable"),
    ]
    assert "0.5000 → 0.4000（-20.0%，越低越接近）" in lines[0] and "(90% kept)" in lines[2]
    assert lines[3] == "中文 CLIP 分数：本机没有 CLIP 权重（离线），未计算 / Chinese CLIP score: no CLIP weights on this machine (offline), not computed"
    clip = {"clip": {"held_out_before": 20.0, "held_out_after": 25.5, "outside_before": 30.0, "outside_after": 29.0}}
    assert comparison_lines(clip) == [say("compare_clip", **clip["clip"])]


def test_the_time_estimate_includes_the_prior_pairs_generation(monkeypatch):
    monkeypatch.setitem(options.SECONDS_PER_STEP, ("small", "cpu"), 0.5)
    monkeypatch.setitem(options.PRIOR_STEP_COST, ("small", "cpu"), 1.5)
    monkeypatch.setitem(options.PRIOR_IMAGE_COST, ("small", "cpu"), 2.0)
    quick = PRESETS["small"]["quick"]
    assert estimate_seconds(quick, 64, "cpu", "off") == 0.5 * quick.max_steps
    with_prior = 0.5 * 1.5 * quick.max_steps + 0.5 * 2.0 * options.PRIOR_IMAGES["small"]
    assert estimate_seconds(quick, 64, "cpu", "normal") == estimate_seconds(quick, 64, "cpu", "strong") == with_prior
    assert estimate_seconds(PRESETS["large"]["quick"], 512, "cpu", "normal") is None, "unmeasured: said after the first steps"
