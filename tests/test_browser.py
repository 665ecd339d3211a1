"""The web UI in headless Chromium: type a Chinese prompt, press 生成, images appear."""

import os

import pytest
import torch

from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.registry import ModelRegistry

from helpers import ARTIFACTS, CHROMIUM, DEMO_MODEL, REPO_ROOT, browser_page, running_server, write_domain


pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium fonts-noto-cjk)"),
]


@pytest.fixture()
def registry(tmp_path, tiny_model_dir):
    write_domain(tmp_path, "tiny", tiny_model_dir, num_inference_steps=3, height=128, width=128)
    return ModelRegistry(domains=load_domains([tmp_path]), device=torch.device("cpu"), dtype=torch.float32)


def generate(page, prompt: str) -> None:
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill(prompt)
    page.get_by_role("button", name="生成 / Generate").click()
    expect(page.locator("#gallery img").first).to_be_visible(timeout=180_000)
    expect(page.locator("#timings")).to_contain_text("unet", timeout=30_000)


def test_generate_in_the_browser(registry):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(registry) as url, browser_page(url) as page:
        page.get_by_role("button", name="生成 / Generate").click()
        expect(page.get_by_text("「提示词」无效")).to_be_visible(timeout=60_000)
        page.locator("#prompt textarea").fill("一碗热气腾腾的兰州牛肉拉面")
        expect(page.locator("#token-info")).to_contain_text("Token: 15 / 32", timeout=30_000)
        generate(page, "一碗热气腾腾的兰州牛肉拉面")
        assert page.locator("#gallery img").count() >= 1
        page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
        page.get_by_role("tab", name="模型 / Models").click()
        page.get_by_role("button", name="刷新 / Refresh").click()
        expect(page.locator("#models-table")).to_contain_text("已加载 loaded", timeout=30_000)
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000


@pytest.mark.skipif(
    os.environ.get("RAPID_DIFFUSION_UPDATE_SCREENSHOT") != "1" or not (DEMO_MODEL / "model_index.json").is_file(),
    reason="writes docs/screenshot.png from the demo model; opt in with RAPID_DIFFUSION_UPDATE_SCREENSHOT=1",
)
def test_update_the_readme_screenshot(monkeypatch, tmp_path):
    from playwright.sync_api import expect

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path))
    monkeypatch.delenv("RAPID_DIFFUSION_DOMAINS", raising=False)
    with running_server(ModelRegistry()) as url, browser_page(url) as page:
        page.get_by_label("图片数量 / Images per run").first.fill("4")
        generate(page, "左边有一个大的红色圆形")
        expect(page.locator("#gallery img")).to_have_count(4, timeout=30_000)
        page.screenshot(path=str(REPO_ROOT / "docs" / "screenshot.png"), full_page=True)
