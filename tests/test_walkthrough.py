"""Issue 31's walkthrough, point by point: what a non-programmer read that was wrong, each checked fixed.

Each test names the sentence that was seen; the Models tab's own points (names, "auto → openvino",
"未加速 eager") are in test_models.py, the browser's in test_models_browser.py.
"""

from __future__ import annotations

import zipfile

import pytest

from rapid_diffusion.domains import DomainSpec, ModelSource
from rapid_diffusion.models.registry import ModelRegistry
from rapid_diffusion.service import finetune
from rapid_diffusion.service.app import AppService, GpuGate, UserFacingError
from rapid_diffusion.service.finetune import JobView
from rapid_diffusion.serving.finetune_ui import progress_html
from rapid_diffusion.serving.ui import UiContext, domain_markdown, token_count_markdown
from rapid_diffusion.training.data import check_uploads

from helpers import finished_finetune, png_bytes


def test_an_empty_zip_says_it_holds_no_pictures(tmp_path):
    """Was "0 usable pairs, 0 items skipped", as if nothing were wrong with the zip."""
    zipfile.ZipFile(tmp_path / "empty.zip", "w").close()
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:
        archive.writestr("readme.txt", "只有文字")
    for name in ("empty.zip", "notes.zip"):
        report = check_uploads([tmp_path / name])
        assert report.summary() == "可用 0 对，跳过 1 项 / 0 usable pairs, 1 item skipped"
        assert [issue.message for issue in report.issues] == [f"{name}: 压缩包里没有图片 / the zip holds no pictures"]


def test_counts_of_one_are_singular(tmp_path):
    """Was "1 items skipped"."""
    with zipfile.ZipFile(tmp_path / "pairs.zip", "w") as archive:
        archive.writestr("a.png", png_bytes(1))
        archive.writestr("a.txt", "一个红色的圆形")
        archive.writestr("b.png", png_bytes(2))  # no caption
    assert check_uploads([tmp_path / "pairs.zip"]).summary() == "可用 1 对，跳过 1 项 / 1 usable pair, 1 item skipped"


def test_a_duration_is_said_once_in_each_language(registry, monkeypatch):
    """Was "预计用时约 2 分 2 秒 / 2 min 2 s（本机实测） / about 2 分 2 秒 / 2 min 2 s on this machine"."""
    monkeypatch.setattr(finetune, "estimate_seconds", lambda *args: 122.0)
    service = AppService(registry, GpuGate()).finetune
    assert service.duration("tiny", None) == "预计用时约 2 分 2 秒（本机实测） / about 2 min 2 s on this machine (measured)"
    view = JobView("job", "", 5, 10, 3725.0, [], [], [], [], None)
    assert progress_html(view).endswith("<div>5/10 步 / steps · 剩余约 1 小时 2 分 / about 1 h 2 min left</div>")


def test_a_fine_tuned_models_card_is_chinese_first_and_names_no_folder(registry, tiny_model_dir):
    """Was "Full fine-tune of demo on 300 steps of your pairs" and "模型 / Model: jobs/2026…"."""
    service = AppService(registry, GpuGate())
    model_id = finished_finetune(tiny_model_dir, service.spec("tiny"), steps=4)
    spec = service.spec(model_id)
    assert spec.description == "在「测试」上用你的图文对完整微调 4 步 / full fine-tune of Test on 4 steps of your pairs"
    card = domain_markdown(service, spec)
    assert "本机文件 / files on this machine" in card and "jobs/" not in card and str(spec.model.path.parent) not in card
    stopped = finished_finetune(tiny_model_dir, service.spec("tiny"), name="半途", steps=2, state="stopped")
    assert service.spec(stopped).description.endswith("（提前停止） / full fine-tune of Test on 2 steps of your pairs (stopped early)")


def test_the_demo_card_names_no_folder():
    """Was "assets/demo-model"."""
    service = AppService(ModelRegistry(), GpuGate())
    card = domain_markdown(service, service.spec("demo"))
    assert "assets/" not in card and "demo-model" not in card and "本机文件 / files on this machine" in card


def test_the_hub_offline_refusal_names_the_model_without_technical_detail(monkeypatch):
    """Was "... needs alibaba-pai/... (revision main), which is not downloaded yet ..." after a long Chinese half."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = DomainSpec("hub", "美食", "Food", "", ModelSource(repo_id="nobody/not-cached"), ("a", "b", "c"))
    service = AppService(ModelRegistry(domains={"hub": spec}), GpuGate())
    with pytest.raises(UserFacingError) as refused:
        service.models.load("hub")
    message = refused.value.message
    assert message.startswith("领域「美食」的模型尚未下载") and "nobody/not-cached" in message and "revision" not in message


def test_an_english_prompt_is_told_before_generating_that_the_model_reads_chinese(registry):
    """Was: an English prompt drew nonsense with no hint."""
    ctx = UiContext(AppService(registry, GpuGate()))
    assert "本模型读中文提示词" in token_count_markdown(ctx, "tiny", "a red circle on the left")
    assert "本模型读中文提示词" not in token_count_markdown(ctx, "tiny", "左边有一个红色的圆形")


def test_a_long_prompts_note_sits_beside_its_images_and_goes_with_the_next_run(registry):
    """Was a toast that lingered over the next generations."""
    import warnings
    from types import SimpleNamespace

    from rapid_diffusion.serving.ui import make_ui_generate

    generate = make_ui_generate(UiContext(AppService(registry, GpuGate())))

    def run(prompt: str) -> str:
        args = dict(domain_id="tiny", prompt=prompt, negative_prompt="", num_inference_steps=1.0, guidance_scale=5.0, seed=1.0,
                    num_images=1.0, sampler="pndm", size="64x64", super_resolution=False, optimization="none", live_preview=False,
                    request=SimpleNamespace(session_hash="walkthrough"))
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            timings = list(generate(**args, progress=lambda *a, **k: None))[-1][1]
        assert not [w for w in shown if "提示词" in str(w.message)], "no toast"
        return timings

    assert "提示词超出文本编码器的 32 个 token 窗口" in run("山水画" * 12)
    assert "提示词超出" not in run("一只猫")
