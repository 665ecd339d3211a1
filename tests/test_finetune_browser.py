"""The Fine-tune tab as a stranger and as a non-programmer meet it, on a real server.

- A stranger with ``gradio_client`` finds no fine-tune endpoint and cannot start one by name.
- In headless Chromium, on the demo model and the tab's defaults (Advanced untouched, 保留原有能力 /
  keep what the model knew on its default): upload a zip of pairs, name the model, Start, wait, see
  the before/after grid with the held-out captions and the prompts from outside the upload, and the
  figures (closer to the uploads; the outside prompts' change and the demo judge's score; no CLIP
  weights offline), find the model in the Generate tab's picker under its name, generate with it.

The browser run caps the quick preset with the host setting ``RAPID_DIFFUSION_FINETUNE_MAX_STEPS``
(300 steps take minutes on an idle CPU, far more on a shared one); the uncapped preset itself runs
in ``python -m rapid_diffusion_dev.bench.finetune_concept --concept shape --preset quick``, which is where it is measured.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rapid_diffusion.models.registry import ModelRegistry

from helpers import ARTIFACTS, CHROMIUM, DEMO_MODEL, browser_page
from helpers import running_server

FINETUNE_FUNCTIONS = ("on_start", "on_check", "on_stop", "on_poll", "on_resume", "on_delete", "on_preset", "refresh_lists", "caption_rows")


def demo_pairs_zip(path: Path, count: int = 16) -> Path:
    """``count`` one-object scenes of the demo world with their captions, as a zip with metadata.jsonl."""
    from rapid_diffusion.demo import world

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        rows = []
        for i in range(count):
            scene = world.sample_scene(rng, max_objects=1)
            image_path = path.parent / f"{i}.png"
            world.render(scene).save(image_path)
            archive.write(image_path, f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": world.caption(scene, rng)}, ensure_ascii=False))
        archive.writestr("metadata.jsonl", "\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_a_stranger_finds_no_fine_tune_endpoint_and_writes_no_domain(monkeypatch, tmp_path):
    from gradio_client import Client

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_PASSWORD", "s3cret")
    with running_server(ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)) as url:
        client = Client(url, verbose=False)
        endpoints = json.dumps(client.view_api(print_info=False, return_format="dict"))
        assert not [name for name in FINETUNE_FUNCTIONS if name in endpoints], endpoints[:2000]
        with pytest.raises(Exception):
            client.predict([], [], "", "demo", api_name="/on_start")
    assert not (tmp_path / "home" / "domains").exists() or not list((tmp_path / "home" / "domains").iterdir())
    assert not (tmp_path / "home" / "jobs").exists()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="needs rapid_diffusion/data/assets/demo-model")
def test_fine_tune_on_the_defaults_in_the_browser_then_generate_with_the_new_model(monkeypatch, tmp_path):
    from playwright.sync_api import expect

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAPID_DIFFUSION_DOMAINS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_MAX_STEPS", "20")
    archive = demo_pairs_zip(tmp_path / "pairs.zip")
    ARTIFACTS.mkdir(exist_ok=True)
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    with running_server(registry) as url, browser_page(url) as page:
        page.get_by_role("tab", name="微调 / Fine-tune").click()
        page.locator("input[type=file]").first.set_input_files(str(archive))
        page.get_by_label("新模型的名字 / name of the new model").fill("我的形状")
        expect(page.get_by_text("预计用时约")).to_be_visible(timeout=30_000)
        expect(page.get_by_label("保留原有能力 / keep what the model knew")).to_have_value("普通 / normal")
        page.get_by_role("button", name="开始训练 / Start").click()
        expect(page.get_by_text("已开始训练「我的形状」")).to_be_visible(timeout=60_000)
        expect(page.get_by_text("完成 / done")).to_be_visible(timeout=900_000)
        expect(page.locator("#before-after img").first).to_be_visible(timeout=60_000)
        assert page.locator("#before-after img").count() == 12, "(2 held-out captions + 4 outside prompts) x (before, after)"
        expect(page.get_by_text("种子 / seed 0").first).to_be_visible()
        page.locator("#before-after img").nth(4).click()  # the gallery's captions show in its preview
        expect(page.locator("#before-after").get_by_text("上传以外 / outside the upload").first).to_be_visible()
        page.keyboard.press("Escape")
        figures = page.locator("#comparison-figures")
        expect(figures).to_contain_text("与你的图片的接近程度：留出图片上的损失")
        expect(figures).to_contain_text("上传以外的 4 个提示词")
        expect(figures).to_contain_text("演示评分（颜色/形状/位置）")
        expect(figures).to_contain_text("Chinese CLIP score: no CLIP weights on this machine (offline), not computed")
        page.wait_for_timeout(3000)  # the loss plot (vega) draws after its data arrives
        page.screenshot(path=str(ARTIFACTS / "finetune.png"), full_page=True)

        page.get_by_role("tab", name="文生图 / Text to image").click()
        picker = page.get_by_label("领域 / Domain").first
        picker.click()
        picker.fill("我的形状")
        option = page.get_by_role("option", name="我的形状（基于 演示）", exact=False)
        expect(option.first).to_be_visible(timeout=30_000)
        option.first.click()
        page.locator("#prompt textarea").fill("左边有一个大的红色圆形")
        page.get_by_role("button", name="生成 / Generate").click()
        expect(page.locator("#gallery img").first).to_be_visible(timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "finetune-generate.png"), full_page=True)
    domains = list((tmp_path / "home" / "domains").glob("*.yaml"))
    assert len(domains) == 1 and "我的形状（基于 演示）" in domains[0].read_text(encoding="utf-8")
