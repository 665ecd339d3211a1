"""The Models tab in headless Chromium, clicked as its owner would, and called as a stranger would.

One server for the module, on the tiny model: a fine-tuned model is made the cheap way (a copy of the
tiny model registered as a finished job registers it). The walk renames it, unloads and loads it,
exports it (the download opens as a diffusers pipeline), imports the download back, and deletes the
copy after confirming. On a public host, a stranger without the password calls every event of the
page: no model is renamed, deleted, exported or imported, and a file reference sent into the import
path field reads nothing.
"""

from __future__ import annotations

import re
import zipfile
import httpx
import pytest
import torch

from rapid_diffusion.domains import load_domains, user_domains_dir
from rapid_diffusion.models.registry import ModelRegistry, load_pipeline
from rapid_diffusion.paths import models_dir
from rapid_diffusion.training.options import TrainConfig

from helpers import ARTIFACTS, CHROMIUM, browser_page, drain, finished_finetune, queue_call, running_server, write_domain

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium fonts-noto-cjk)"),
]
MODELS_TAB = "模型 / Models"


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    """A home with the tiny domain and one fine-tuned model on it; the settings follow the module's environment."""
    from rapid_diffusion import settings

    folder = tmp_path_factory.mktemp("models-domains")
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path_factory.mktemp("models-home")))
        patch.setenv("RAPID_DIFFUSION_DOMAINS", str(folder))
        patch.setenv("RAPID_DIFFUSION_FINETUNE_PASSWORD", "s3cret-pass")
        patch.delenv("RAPID_DIFFUSION_PUBLIC", raising=False)
        settings.reload()
        finetuned = finished_finetune(tiny_model_dir, load_domains()["tiny"], name="我的粉色", steps=4)
        yield finetuned
    settings.reload()


@pytest.fixture(scope="module")
def url(home):
    with running_server(ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)) as server_url:
        yield server_url


def status(page):
    return page.locator("#models-status")


def pick(page, title: str) -> None:
    page.locator("#models-picker input").click()
    page.get_by_role("option", name=re.compile(re.escape(title))).first.click()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"models-{name}.png"), full_page=True)


def test_the_owner_renames_reloads_exports_imports_and_deletes_a_fine_tuned_model(url, home, tmp_path, monkeypatch):
    """The defaults of every control; the password box is filled since a password is set."""
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.get_by_role("tab", name=MODELS_TAB).click()
        table = page.locator("#models-table")
        expect(table).to_contain_text("我的粉色（基于 测试）")
        expect(table).to_contain_text(home)
        expect(table).to_contain_text("微调 / fine-tuned · 完成 / done")
        page.get_by_label("密码 / Password").fill("s3cret-pass")
        shot(page, "1-listed")

        pick(page, "我的粉色")
        page.get_by_label("新名字 / New name").fill("猫咪模型")
        page.get_by_role("button", name="改名 / Rename").click()
        expect(status(page)).to_contain_text("改名为「猫咪模型」", timeout=30_000)
        expect(table).to_contain_text("猫咪模型（基于 测试）")
        run = TrainConfig.load(load_domains()[home].model.path / "run.json")
        assert (run.name, run.domain_id) == ("猫咪模型", home), "a resumed run publishes under the new name and id"
        page.get_by_role("tab", name="文生图 / Text to image").click()
        page.get_by_label("领域 / Domain").first.click()
        expect(page.get_by_role("option", name=re.compile("猫咪模型"))).to_be_visible()
        page.keyboard.press("Escape")
        page.get_by_role("tab", name=MODELS_TAB).click()

        page.get_by_role("button", name="加载 / Load").click()
        expect(status(page)).to_contain_text("已加载 猫咪模型", timeout=60_000)
        expect(table).to_contain_text("已加载 loaded")
        page.get_by_role("button", name="卸载 / Unload").click()
        expect(status(page)).to_contain_text("已卸载 猫咪模型", timeout=30_000)

        page.get_by_role("button", name="导出 zip / Export zip").click()
        expect(status(page)).to_contain_text("已打包「猫咪模型（基于 测试）」", timeout=60_000)
        shot(page, "2-exported")
        with page.expect_download() as download_info:
            page.locator("#models-export a").first.click()
        exported = tmp_path / "exported.zip"
        download_info.value.save_as(exported)
        with zipfile.ZipFile(exported) as archive:
            archive.extractall(tmp_path / "unpacked")
        pipe = load_pipeline(tmp_path / "unpacked", torch.device("cpu"), torch.float32)
        assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.tokenizer.__class__.__name__.startswith("Bert")

        page.locator("#models-upload input[type=file]").set_input_files(str(exported))
        expect(page.locator("#models-upload")).to_contain_text("exported.zip", timeout=30_000)
        page.get_by_label("新模型的名字（可用中文）/ name of the new model").fill("导入的猫")
        page.locator("#models-import").click()
        expect(status(page)).to_contain_text("已导入新模型「导入的猫」", timeout=120_000)
        expect(table).to_contain_text("导入 / imported")
        expect(page.locator("#models-picker input")).to_have_value(re.compile("导入的猫"))
        imported = next(spec for spec in load_domains().values() if spec.title_zh == "导入的猫")
        assert (imported.num_inference_steps, imported.examples) == (2, load_domains()["tiny"].examples), "the settings came along"
        shot(page, "3-imported")

        page.get_by_role("button", name="删除 / Delete").click()
        confirm = page.locator("#models-confirm")
        expect(confirm).to_contain_text("确定删除「导入的猫」吗？")
        shot(page, "4-confirm")
        page.get_by_role("button", name="取消 / Cancel").click()
        expect(confirm).to_be_hidden()
        expect(table).to_contain_text("导入的猫")
        page.get_by_role("button", name="删除 / Delete").click()
        page.get_by_role("button", name="确认删除 / Yes, delete").click()
        expect(status(page)).to_contain_text("已删除模型「导入的猫」", timeout=30_000)
        expect(table).not_to_contain_text("导入的猫")
        expect(confirm).to_be_hidden()

        pick(page, "tiny")
        page.get_by_role("button", name="删除 / Delete").click()
        expect(status(page)).to_contain_text("受保护")
        expect(confirm).to_be_hidden()
        shot(page, "5-protected")
    assert [p.name for p in models_dir().iterdir()] == [], "the imported copy's folder is gone"
    assert {spec.title_zh for spec in load_domains().values() if spec.source_file.parent == user_domains_dir()} == {"猫咪模型（基于 测试）"}


MODEL_ACTIONS = ("加载 / Load", "卸载 / Unload", "改名 / Rename", "导出 zip / Export zip", "删除 / Delete", "导入 / Import")


def test_without_a_password_a_public_host_builds_no_model_action(home, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    monkeypatch.delenv("RAPID_DIFFUSION_FINETUNE_PASSWORD")
    with running_server(ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)) as url:
        config = httpx.get(f"{url}/config").json()
    values = {str(c.get("props", {}).get("value")) for c in config["components"]}
    assert not values & set(MODEL_ACTIONS), "no button, so no event, for a stranger"
    assert "公开部署未设置密码，此操作已关闭。 / This action is off on a public host without a password." in values
    assert f"`{home}`" in str(config), "the list itself is still shown"


def test_a_stranger_on_a_public_host_can_act_on_no_model(home, tiny_model_dir, monkeypatch):
    """With the owner's password set, every event of the page is called with a wrong one (the model's id,
    then a server folder, in every field); then the import path field gets a file reference: refused."""
    monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    before = {p: p.read_bytes() for p in user_domains_dir().glob("*.yaml")}
    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    with running_server(registry) as url:
        config = httpx.get(f"{url}/config").json()
        events = [d for d in config["dependencies"] if d.get("backend_fn") and d.get("api_name") not in ("generate", "generate_ui")]
        for dependency in events:  # one at a time: the queue holds only a few
            for value in (home, str(tiny_model_dir)):
                queue_call(url, dependency["id"], [value] * len(dependency["inputs"]), "stranger")
                drain(url, "stranger", expected=1)
        [path_field] = [c["id"] for c in config["components"] if str(c.get("props", {}).get("label")).startswith("或：服务器上的模型文件夹")]
        import_event = next(d for d in events if path_field in d["inputs"])
        data = [None] * len(import_event["inputs"])
        data[import_event["inputs"].index(path_field)] = {"path": str(tiny_model_dir / "model_index.json"), "meta": {"_type": "gradio.FileData"}}
        with httpx.Client() as client:
            client.get(url)
            refused = client.post(f"{url}/gradio_api/queue/join", json={
                "data": data, "fn_index": import_event["id"], "session_hash": "stranger2", "event_data": None, "trigger_id": None})
        assert refused.status_code == 403 and "只能使用你在本次会话中上传的文件" in refused.json()["error"]
    assert registry.loaded() == []
    assert {p: p.read_bytes() for p in user_domains_dir().glob("*.yaml")} == before, "nothing renamed, deleted or added"
    assert not models_dir().exists() or list(models_dir().iterdir()) == [], "nothing imported"


def test_deleting_in_the_fine_tune_tab_asks_first_and_then_says_so(url, home):
    from playwright.sync_api import expect

    with browser_page(url) as page:
        page.get_by_role("tab", name="微调 / Fine-tune").click()
        page.get_by_label("微调密码 / fine-tune password").fill("s3cret-pass")
        page.get_by_label("我的微调模型 / my fine-tuned models").click()
        page.get_by_role("option", name="猫咪模型").click()
        page.get_by_role("button", name="删除模型 / Delete model").click()
        confirm = page.locator("#finetune-confirm")
        expect(confirm).to_contain_text("确定删除「猫咪模型（基于 测试）」吗？")
        page.get_by_role("button", name="取消 / Cancel").last.click()
        expect(confirm).to_be_hidden()
        assert home in load_domains(), "cancelled: nothing deleted"
        page.get_by_role("button", name="删除模型 / Delete model").click()
        page.locator("#finetune-confirm").get_by_role("button", name="确认删除 / Yes, delete").click()
        expect(page.locator("#finetune-deleted")).to_contain_text("已删除模型「猫咪模型（基于 测试）」", timeout=30_000)
        expect(confirm).to_be_hidden()
        shot(page, "6-finetune-deleted")
    assert home not in load_domains()
