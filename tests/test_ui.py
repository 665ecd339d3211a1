"""The Gradio face: the named /generate API, the UI's handlers, and a real server + gradio_client."""

from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import pytest
import torch

from rapid_diffusion.domains import DomainSpec, ModelSource, load_domains
from rapid_diffusion.generation.pipeline import read_png_settings
from rapid_diffusion.models.registry import LoadedModel, ModelRegistry
from rapid_diffusion.service.app import AppService, GpuGate
from rapid_diffusion.serving.ui import (
    UiContext,
    build_ui,
    domain_defaults,
    make_ui_generate,
    models_action,
    token_count_markdown,
)

from helpers import running_server, write_domain

API_PARAMETERS = [
    "prompt",
    "negative_prompt",
    "domain",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "num_images",
    "sampler",
    "super_resolution",
]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("ui-domains")
    write_domain(folder, "tiny", tiny_model_dir, num_inference_steps=2)
    write_domain(folder, "broken", tmp_path_factory.mktemp("no-model"))
    return ModelRegistry(domains=load_domains([folder]), device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def ctx(registry):
    return UiContext(AppService(registry, GpuGate(1, 4)))


@pytest.fixture(scope="module")
def ui_updates(ctx):
    """Every update the Generate event sends (it is a generator), as a list."""
    handler = make_ui_generate(ctx)
    return lambda **kwargs: list(handler(**kwargs))


@pytest.fixture(scope="module")
def ui_generate(ui_updates):
    """The Generate event's last update: what the widgets finally show."""
    return lambda **kwargs: ui_updates(**kwargs)[-1]


def ui_args(**overrides):
    """The Generate tab's widget values, in input order."""
    values = {
        "domain_id": "tiny",
        "prompt": "一只橘猫在窗台上",
        "negative_prompt": "模糊",
        "num_inference_steps": 2.0,
        "guidance_scale": 5.0,
        "seed": 11.0,
        "num_images": 2.0,
        "sampler": "pndm",
        "size": "64x64",
        "super_resolution": False,
        "optimization": "none",
        "live_preview": False,
        "request": SimpleNamespace(session_hash="session-1"),
    }
    values.update(overrides)
    return values


def spec(domain_id: str, **model) -> DomainSpec:
    return DomainSpec(domain_id, "测试", "Test", "", ModelSource(**model), ("a", "b", "c"))


def test_named_generate_api_uses_the_diffusers_vocabulary(registry):
    info = build_ui(AppService(registry, GpuGate(1, 4))).get_api_info()["named_endpoints"]
    parameters = info["/generate"]["parameters"]
    assert [p["parameter_name"] for p in parameters] == API_PARAMETERS
    assert not parameters[0]["parameter_has_default"]
    assert all(p["parameter_has_default"] and p["parameter_default"] is None for p in parameters[1:])
    assert "/generate_ui" not in info, "the UI's own event stays out of the documented API"


def default_domain(registry: ModelRegistry) -> str | None:
    return AppService(registry, GpuGate()).default_domain()


def test_default_domain_prefers_demo_then_offline_ready_then_first(tiny_model_dir):
    hub = spec("a-hub", repo_id="nobody/not-cached")
    local = spec("b-local", path=tiny_model_dir)
    assert default_domain(ModelRegistry(domains={"a-hub": hub, "b-local": local})) == "b-local"
    with_demo = {"a-hub": hub, "b-local": local, "demo": spec("demo", path=tiny_model_dir)}
    assert default_domain(ModelRegistry(domains=with_demo)) == "demo"
    untrained_demo = {"a-hub": hub, "b-local": local, "demo": spec("demo", path=tiny_model_dir / "missing")}
    assert default_domain(ModelRegistry(domains=untrained_demo)) == "b-local"
    assert default_domain(ModelRegistry(domains={"a-hub": hub})) == "a-hub"


def test_ui_generate_serves_the_png_files_with_settings_and_reports_progress(ui_generate):
    steps = []
    gallery, timings, details, files, seeds, reuse = ui_generate(**ui_args(), progress=lambda p, **k: steps.append(p))
    assert seeds == [11, 12] and reuse == 11
    assert [caption for _, caption in gallery] == ["种子 seed 11", "种子 seed 12"]
    assert [path for path, _ in gallery] == files
    settings = read_png_settings(open(files[1], "rb").read())
    assert (settings["seed"], settings["prompt"], settings["width"]) == (12, "一只橘猫在窗台上", 64)
    lines = details.splitlines()
    assert lines == [
        "种子 seed 11 · 64×64 · PNDM · 2 步 steps · 引导 guidance 5",
        "种子 seed 12 · 64×64 · PNDM · 2 步 steps · 引导 guidance 5",
    ]
    assert [Path(f).name.split("-")[:4] for f in files] == [["tiny", "11", "pndm", "2steps"], ["tiny", "12", "pndm", "2steps"]]
    assert not settings["model"].startswith("/"), "nor in the PNG metadata"
    assert "unet" in timings and "vae_decode" in timings
    assert steps and steps[-1][0] == steps[-1][1], "the progress bar reaches the end of the denoising loop"


def test_live_preview_streams_projections_then_the_images(ui_updates):
    """Off: one update (no preview work). On: a gallery of previews every 5 steps, then the PNGs."""
    assert len(ui_updates(**ui_args(num_inference_steps=10.0), progress=lambda *a, **k: None)) == 1
    updates = ui_updates(**ui_args(num_inference_steps=10.0, live_preview=True), progress=lambda *a, **k: None)
    *previews, final = updates
    assert [[caption for _, caption in update[0]] for update in previews] == [["预览 preview · 5"] * 2, ["预览 preview · 10"] * 2]
    for update in previews:
        assert all(image.size == (64, 64) for image, _ in update[0])
        assert update[1:3] == ("", ""), "the previous run's timings and settings are cleared"
        assert all(isinstance(other, type(gr.skip())) for other in update[3:])
    assert [caption for _, caption in final[0]] == ["种子 seed 11", "种子 seed 12"] and final[4] == [11, 12]


def test_live_preview_errors_reach_the_page_as_one_sentence(ui_updates):
    with pytest.raises(gr.Error) as error:
        ui_updates(**ui_args(prompt="  ", live_preview=True), progress=lambda *a, **k: None)
    assert error.value.message == "「提示词」无效：不能为空 / Invalid Prompt: must not be empty"


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"num_inference_steps": 0.0}, "「步数」无效"),
        ({"prompt": "  "}, "「提示词」无效"),
        ({"size": "65x64"}, "Invalid Size: must be a multiple of 8"),
        ({"size": "big"}, "「尺寸」无效"),
        ({"seed": -7.0}, "「种子」无效"),
        ({"seed": 1.5}, "「种子」无效：须为 0 到 4294967295 之间的整数"),
        ({"seed": float("nan")}, "Invalid Seed: must be an integer"),
        ({"domain_id": "nope"}, "nope"),
    ],
)
def test_ui_validation_errors_are_one_sentence(ui_generate, overrides, words):
    with pytest.raises(gr.Error) as error:
        ui_generate(**ui_args(**overrides), progress=lambda *a, **k: None)
    assert words in error.value.message


def test_stop_button_flag_interrupts_the_denoising_loop(ctx, ui_generate):
    def press_stop(progress, **kwargs):
        ctx.stop_flags.stop("session-stop")

    request = SimpleNamespace(session_hash="session-stop")
    outputs = ui_generate(**ui_args(num_inference_steps=4.0, request=request), progress=press_stop)
    assert all(isinstance(o, type(gr.skip())) for o in outputs)


def test_out_of_memory_gives_advice_and_the_next_request_works(ui_generate, monkeypatch):
    real_run = LoadedModel.run
    calls = []

    def run_oom_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", run_oom_once)
    with pytest.raises(gr.Error) as error:
        ui_generate(**ui_args(num_images=8.0), progress=lambda *a, **k: None)
    assert "显存不足" in error.value.message and "fewer images" in error.value.message
    outputs = ui_generate(**ui_args(num_images=1.0), progress=lambda *a, **k: None)
    assert outputs[4] == [11]


def test_token_counter_warns_before_truncation(registry):
    ctx = UiContext(AppService(ModelRegistry(domains=registry.domains), GpuGate()))
    assert token_count_markdown(ctx, "tiny", "一只猫") == "Token: 5 / 32"
    assert ctx.service.registry.loaded() == [], "counting tokens loads the tokenizer only"
    long_prompt = "山水画" * 12
    warning = token_count_markdown(ctx, "tiny", long_prompt)
    assert warning.startswith("⚠️ Token: 38 / 32") and "「" in warning
    assert "characters" in token_count_markdown(ctx, "broken", "一只猫")


def test_changing_domain_loads_its_defaults(ctx):
    info, button, prompt, examples, negative, steps, guidance, sampler, size, sr, optimization = domain_defaults(ctx, "tiny")
    assert "测试 / Test" in info and "tiny random model" in info
    assert button["interactive"] is True and prompt["placeholder"] == "例如 / e.g. 一个红色的圆形"
    assert examples["choices"] == ["一个红色的圆形", "蓝色正方形", "左边有一个小的绿色三角形"]
    assert (negative, steps, guidance, sampler, size["value"], sr) == ("模糊", 2, 5.0, "pndm", "64x64", False)


def test_models_panel_loads_and_unloads(ctx, registry):
    table, _, message = models_action(ctx, ctx.service.load, "tiny", None)
    assert "tiny" in message
    row = next(r for r in table if r[0] == "tiny")
    assert row[1].startswith("已加载") and row[2] == "cpu" and row[4] > 0
    assert row[6:] == ["none → none", "未加速 eager"], "what the loaded model runs on"
    table, _, message = models_action(ctx, ctx.service.unload, "tiny", None)
    assert next(r for r in table if r[0] == "tiny")[1].startswith("本地可用")


def test_a_failed_load_keeps_the_table_and_says_why_without_a_path(ctx, registry):
    table, _, message = models_action(ctx, ctx.service.load, "broken", None)
    assert [row[0] for row in table] == ["broken", "tiny"], "the table stays on screen"
    assert message.startswith("⛔") and "领域「测试」的模型文件缺失" in message and "missing" in message
    assert str(registry.domains["broken"].model.path) not in message


def test_the_domain_card_says_before_generating_when_a_model_cannot_work(monkeypatch, registry):
    from rapid_diffusion.serving.ui import domain_markdown

    service = AppService(ModelRegistry(domains={"hub": spec("hub", repo_id="nobody/not-cached")}), GpuGate())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "⛔ 离线：不可用（模型尚未下载） / offline: unavailable" in domain_markdown(service, service.spec("hub"))
    assert domain_defaults(UiContext(service), "hub")[1]["interactive"] is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "首次生成会先下载模型 nobody/not-cached" in domain_markdown(service, service.spec("hub"))
    assert domain_defaults(UiContext(service), "hub")[1]["interactive"] is True
    tiny = AppService(registry, GpuGate())
    card = domain_markdown(tiny, tiny.spec("tiny"))
    assert "本机文件 / files on this machine" in card and str(registry.domains["tiny"].model.path.parent) not in card


@pytest.mark.slow
def test_gradio_client_calls_generate_on_a_real_server(registry):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with running_server(registry) as url:
        assert httpx.get(f"{url}/healthz").json()["domains"]["tiny"] in ("offline-ready", "loaded")
        client = Client(url, verbose=False, download_files=str(registry.domains["tiny"].model.path.parent / "client"))
        gallery, info = client.predict(prompt="一只猫", domain="tiny", seed=3, num_inference_steps=2, api_name="/generate")
        assert info["seeds"] == [3] and len(gallery) == 1
        settings = read_png_settings(open(gallery[0]["image"], "rb").read())
        assert (settings["seed"], settings["num_inference_steps"], settings["negative_prompt"]) == (3, 2, "模糊")
        with pytest.raises(AppError, match="num_inference_steps"):
            client.predict(prompt="一只猫", domain="tiny", num_inference_steps=0, api_name="/generate")
        response = httpx.post(f"{url}/api/predict/tiny", json={"text": "猫", "num_inference_steps": 1, "seed": 3})
        assert response.status_code == 200 and response.json()["seeds"] == [3]


def test_the_models_tab_lists_skipped_domain_files_by_name(tmp_path, tiny_model_dir):
    from rapid_diffusion.serving.ui import domain_errors_markdown

    write_domain(tmp_path, "tiny", tiny_model_dir)
    (tmp_path / "bad.yaml").write_text("id: bad\nheight: tall\n", encoding="utf-8")
    service = AppService(ModelRegistry(domains=load_domains([tmp_path])), GpuGate())
    text = domain_errors_markdown(service)
    assert "已跳过的领域文件 / Skipped domain files" in text and "`bad.yaml`" in text and str(tmp_path) not in text
    assert domain_errors_markdown(AppService(ModelRegistry(domains=load_domains([tmp_path / "none"])), GpuGate())) == ""


def test_models_tab_deletes_a_fine_tuned_model_and_refuses_a_configured_one(test_domains, copy_model, tmp_path):
    from rapid_diffusion.domains import user_domains_dir
    from rapid_diffusion.serving.ui import delete_action

    model = copy_model("run")
    (model / "status.json").write_text('{"state": "done"}', encoding="utf-8")
    user_domains_dir().mkdir(parents=True)
    write_domain(user_domains_dir(), "ft-mine-abc123", model)
    ctx = UiContext(AppService(ModelRegistry(device=torch.device("cpu"), dtype=torch.float32), GpuGate(1, 4)))
    assert "ft-mine-abc123" in ctx.service.domains

    *_, message, refused = delete_action(ctx, "tiny", None)
    assert message.startswith("⛔") and "only fine-tuned models" in message
    assert isinstance(refused, type(gr.skip())) and "tiny" in ctx.service.domains

    table, _, message, deleted = delete_action(ctx, "ft-mine-abc123", None)
    assert deleted == "deleted:ft-mine-abc123" and "deleted" in message
    assert "ft-mine-abc123" not in ctx.service.domains and "ft-mine-abc123" not in [row[0] for row in table]
    assert not model.exists() and not (user_domains_dir() / "ft-mine-abc123.yaml").exists()
