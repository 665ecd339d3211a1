"""What only a browser shows: toasts, what the page says, and whether text fits its box."""

import re
from pathlib import Path

import pytest
import torch

from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.registry import ModelRegistry

from helpers import REPO_ROOT, write_domain
from helpers import ARTIFACTS, CHROMIUM, browser_page
from helpers import running_server

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium fonts-noto-cjk)"),
]

GENERATE = "生成 / Generate"
# Every box whose text could be cut: labels, buttons and tabs overflow their box (scrollWidth); the text of an
# input (dropdowns, numbers) is measured with its own font against the room left of a dropdown's arrow.
CUT_OFF_TEXT = """() => {
  const visible = el => el.offsetParent !== null && el.clientWidth > 0;
  const boxes = [...document.querySelectorAll('label, button, [role=tab], [data-testid=block-info]')].filter(visible)
    .filter(el => el.scrollWidth > el.clientWidth + 1)
    .map(el => `${el.tagName} "${el.innerText.trim().slice(0, 40)}" ${el.scrollWidth}>${el.clientWidth}`);
  const canvas = document.createElement('canvas').getContext('2d');
  const inputs = [...document.querySelectorAll('input:not([type]), input[type=text], input[type=number]')].filter(visible).map(el => {
    const style = getComputedStyle(el);
    canvas.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
    const box = el.getBoundingClientRect();
    const arrow = el.parentElement.querySelector('.icon-wrap');
    const right = Math.min(box.right - parseFloat(style.paddingRight), arrow ? arrow.getBoundingClientRect().left : Infinity);
    const room = right - box.left - parseFloat(style.paddingLeft);
    const need = canvas.measureText(el.value).width;
    return need > room + 1 ? `INPUT "${el.value.slice(0, 40)}" ${need.toFixed(0)}>${room.toFixed(0)}` : null;
  }).filter(Boolean);
  return [...boxes, ...inputs];
}"""
PAGE_TEXT = """() => document.body.innerText + '\\n' +
  [...document.querySelectorAll('input, textarea')].map(el => el.value).join('\\n')"""


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("browser-domains")
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2, height=64, width=64)
    write_domain(folder, "broken", tmp_path_factory.mktemp("no-model") / "gone")
    registry = ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)
    with running_server(registry) as server_url:
        yield server_url


def toast(page, text: str):
    from playwright.sync_api import expect

    body = page.locator(".toast-body").filter(has_text=text).first
    expect(body).to_be_visible(timeout=60_000)
    return body


def test_an_error_toast_is_chinese_first_with_a_chinese_title(url):
    with browser_page(url) as page:
        page.get_by_role("button", name=GENERATE).click()
        body = toast(page, "「提示词」无效：不能为空 / Invalid Prompt: must not be empty")
        title = body.locator(".toast-title").evaluate(
            "e => [getComputedStyle(e, '::before').content, getComputedStyle(e).fontSize, getComputedStyle(e, '::before').fontSize]"
        )
        assert title[0] == '"出错了 / Error"' and title[1] == "0px" and title[2] != "0px", title
        page.wait_for_timeout(800)  # the toast slides in
        page.screenshot(path=str(ARTIFACTS / "error-toast.png"))


# Each gallery image's box lies inside the gallery's visible box (none cut off behind a scrollbar).
GALLERY_CUT = """() => {
  const gallery = document.querySelector('#gallery').getBoundingClientRect();
  return [...document.querySelectorAll('#gallery .grid-wrap img')].map(img => img.getBoundingClientRect())
    .filter(box => box.bottom > gallery.bottom + 1 || box.right > gallery.right + 1).length;
}"""


def test_four_images_show_whole_with_readable_settings_and_no_server_path(url, tiny_model_dir):
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.get_by_label("图片数量 / Images per run").first.fill("4")
        page.locator("#prompt textarea").fill("一个红色的圆形")
        page.get_by_role("button", name=GENERATE).click()
        expect(page.locator("#details textarea")).to_have_value(re.compile("(种子 seed.*\n){3}种子 seed"), timeout=180_000)
        expect(page.locator("#gallery .grid-wrap img")).to_have_count(4)
        page.wait_for_timeout(500)
        assert page.evaluate(GALLERY_CUT) == 0, "the gallery's second row is cut off"
        assert "common.complete" not in page.evaluate("() => document.body.textContent"), "untranslated screen-reader text"
        expect(page.get_by_label("领域 / Domain").first).to_have_value(re.compile("已加载 loaded"))
        expect(page.locator("#domain-card")).to_contain_text("已加载 loaded")
        texts = [page.evaluate(PAGE_TEXT)]
        for tab in ("模型 / Models", "微调 / Fine-tune"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(500)
            texts.append(page.evaluate(PAGE_TEXT))
            if tab == "模型 / Models":
                # only "tiny" can be loaded here ("broken" has no model): opening the tab shows what the generation loaded
                expect(page.locator("#models-table")).to_contain_text("已加载 loaded")
    text = "\n".join(texts)
    assert "本机文件 / files on this machine" in text, "a local model is said to be local, without its folder"
    for path in (REPO_ROOT, Path.home(), tiny_model_dir, tiny_model_dir.parent):
        assert str(path) + "/" not in text and f"{path}\n" not in text and f"`{path}" not in text, path


def test_the_models_table_stays_after_a_failed_load(url):
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.get_by_role("tab", name="模型 / Models").click()
        page.locator("#models-picker input").click()
        page.get_by_role("option", name="测试 · broken").click()
        page.get_by_role("button", name="加载 / Load").click()
        expect(page.locator("#models-status")).to_contain_text("模型文件缺失", timeout=60_000)
        toast(page, "模型文件缺失")
        table = page.locator("#models-table")
        expect(table).to_be_visible()
        expect(table).to_contain_text("broken")
        expect(table).to_contain_text("tiny")


def test_stop_says_the_generation_stopped(url):
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.locator("#prompt textarea").fill("一个红色的圆形")
        page.get_by_label("步数 / Steps").first.fill("150")
        page.get_by_role("button", name=GENERATE).click()
        expect(page.get_by_text("去噪 / Denoising").first).to_be_visible(timeout=120_000)
        page.get_by_role("button", name="停止 / Stop").click()
        toast(page, "已停止生成 / Generation stopped")


def test_live_preview_shows_the_denoising_then_the_images(url):
    """Ticked, the gallery shows projections while denoising (every fifth step), then the seeds' images."""
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.locator("#prompt textarea").fill("一个红色的圆形")
        page.get_by_label("步数 / Steps").first.fill("150")
        page.locator("#live-preview input").check()
        page.get_by_role("button", name=GENERATE).click()
        expect(page.locator("#gallery").get_by_text(re.compile(r"预览 preview · \d+")).first).to_be_visible(timeout=120_000)
        expect(page.locator("#gallery").get_by_text(re.compile(r"种子 seed \d+")).first).to_be_visible(timeout=120_000)
        expect(page.locator("#gallery").get_by_text(re.compile("预览 preview"))).to_have_count(0)


@pytest.mark.parametrize("width", [1280, 390])
def test_no_text_is_cut_off_and_every_tab_is_reachable(url, width):
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.set_viewport_size({"width": width, "height": 900})
        expect(page.locator("#prompt textarea")).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)
        cut = page.evaluate(CUT_OFF_TEXT)
        for tab in ("模型 / Models", "微调 / Fine-tune"):
            expect(page.get_by_role("tab", name=tab)).to_be_visible()
        page.get_by_role("tab", name="模型 / Models").click()
        page.wait_for_timeout(500)
        cut += page.evaluate(CUT_OFF_TEXT)
    assert cut == []
