"""Background training jobs, the fine-tune service and its tab, on the tiny model in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rapid_diffusion.service import finetune as finetune_service
from rapid_diffusion.serving import finetune_ui
from rapid_diffusion.service.finetune import FinetuneService, job_view
from rapid_diffusion.service.batching import GpuGate
from rapid_diffusion.service.models import ModelsService
from rapid_diffusion.training.jobs import DeleteRefused, Job, JobBusyError, JobManager, delete_finetuned
from rapid_diffusion.messages import say
from rapid_diffusion.training.run_files import comparison_lines, complete_checkpoints, read_comparison
from rapid_diffusion.training.options import PRESETS, TrainConfig, defaults


def square_png(path: Path, colour: tuple[int, int, int]) -> Path:
    pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
    pixels[16:48, 16:48] = colour
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture()
def uploads(tmp_path) -> list[str]:
    """What gradio hands over: temp file paths, captions in a same-stem .txt for one of them."""
    folder = tmp_path / "uploads"
    folder.mkdir()
    red = square_png(folder / "red.png", (230, 30, 30))
    blue = square_png(folder / "blue.png", (30, 30, 230))
    (folder / "blue.txt").write_text("蓝色的方块", encoding="utf-8")
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return [str(red), str(blue), str(folder / "blue.txt"), str(broken)]


@pytest.fixture()
def manager(test_domains, tmp_path) -> JobManager:
    return JobManager(tmp_path / "home" / "jobs", env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture()
def service(registry, manager) -> FinetuneService:
    return FinetuneService(registry, manager)


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError("timed out waiting")


def test_caption_editor_rows_and_check_report(service, uploads):
    rows = service.caption_rows(uploads)
    assert rows == [["red.png", ""], ["blue.png", "蓝色的方块"], ["broken.png", ""]]
    rows[0][1] = "红色的方块"
    rows[2][1] = "坏图"
    report = finetune_service.check_rows(uploads, rows)
    assert [(p.item, p.text) for p in report.pairs] == [("red.png", "红色的方块"), ("blue.png", "蓝色的方块")]
    markdown = finetune_service.report_markdown(report)
    assert "2 usable pairs, 1 item skipped" in markdown and "broken.png: 无法解码的图片 / not a decodable image" in markdown
    assert service.check(uploads, rows) == markdown


def form(**overrides) -> finetune_service.Form:
    """The tab's form on the tiny base, as a browser sends it with Advanced untouched (small preset numbers)."""
    values = dict(
        name="我的粉色", base="tiny", steps=4, learning_rate="1e-3", batch_size=1, accumulation=1, resolution=32,
        train_text_encoder=True, mixed_precision="no", gradient_checkpointing=False, use_ema=False, seed=0, prompt="红色的方块",
    )
    values.update(overrides)
    return finetune_service.Form(**values)


@pytest.mark.slow
def test_job_trains_from_its_run_json_then_the_tab_shows_before_after_and_the_named_model(service, manager, uploads, registry):
    rows = [["red.png", "红色的方块"], ["blue.png", "蓝色的方块"]]
    outcome = service.start(uploads, rows, form())
    assert outcome.job_id is not None, outcome.message
    job = manager.job(outcome.job_id)
    config = TrainConfig.load(job.folder / "run.json")
    assert (config.name, config.max_steps, config.output, config.data) == ("我的粉色", 4, job.folder, job.folder / "data")
    assert config.prior_preservation == defaults()["prior_preservation"] == "normal", "the tab's default keeps what the model knew"
    assert json.loads((job.folder / "job.json").read_text())["command"][-2:] == ["--config", str(job.folder / "run.json")]
    with pytest.raises(JobBusyError):
        manager.start(config, job.folder / "data")
    assert JobManager(manager.root).active().id == outcome.job_id

    status = job.wait(timeout=240)
    assert status["state"] == "done", job.log_tail()
    view = FinetuneService(registry, JobManager(manager.root)).view(None)
    assert view.job_id == outcome.job_id and view.new_domain.startswith("ft-") and "我的粉色" in view.status_markdown
    assert outcome.job_id not in view.status_markdown
    plot = finetune_ui.loss_plot_value(view)
    assert plot["columns"] == ["step", "loss", "series"]
    assert [row[0] for row in plot["data"] if row[2] == finetune_ui.TRAIN_SERIES] == [1, 2, 3, 4]
    outside = ["一个红色的圆形", "蓝色正方形", "左边有一个小的绿色三角形"]  # the tiny domain's examples
    assert [label for _, label in view.comparison] == [
        "微调前 / before · 红色的方块 · 种子 / seed 0", "微调后 / after · 红色的方块 · 种子 / seed 0",
        *[f"微调{when} · 上传以外 / outside the upload · {prompt} · 种子 / seed 0"
          for prompt in outside for when in ("前 / before", "后 / after")],
    ]
    assert (job.folder / "prior" / "metadata.jsonl").is_file() and job.status()["prior_pairs"] > 0
    assert view.figures == comparison_lines(read_comparison(job.folder)) and len(view.figures) == 3
    assert view.figures[0].startswith("与你的图片的接近程度：训练图片上的损失") and "上传以外的 3 个提示词" in view.figures[1]
    assert view.figures[2] == say("compare_clip_unavailable")
    assert finetune_ui.figures_markdown(view) == "\n".join(f"- {line}" for line in view.figures)
    before, after = (np.asarray(Image.open(path)) for path, _ in view.comparison[:2])
    assert before.shape == after.shape == (32, 32, 3) and not np.array_equal(before, after)
    assert "4/4" in finetune_ui.progress_html(view)
    spec = registry.reload_domains()[view.new_domain]
    assert spec.title_zh == "我的粉色（基于 测试）" and spec.model.path == job.folder.resolve()
    assert ("我的粉色（基于 测试）", view.new_domain) in service.finetuned_choices()

    registry.get(spec)
    assert registry.state(spec) == "loaded"
    assert service.delete(view.new_domain).startswith("已删除模型「我的粉色")
    assert view.new_domain not in registry.reload_domains() and not job.folder.exists()
    assert registry.key_for(spec) not in {model.key for model in registry.loaded()}, "deleting also frees its memory"


@pytest.mark.slow
def test_sigterm_saves_a_usable_model_and_resume_finishes_the_job(service, manager, uploads, registry):
    outcome = service.start(uploads, [["red.png", "红色的方块"]], form(steps=60, learning_rate="1e-4", prior_preservation="off"))
    job = manager.job(outcome.job_id)
    wait_for(lambda: job.status().get("step", 0) >= 2, timeout=180)
    JobManager(manager.root).latest().terminate()
    status = job.wait(timeout=120)
    assert status["state"] == "stopped", job.log_tail()
    assert complete_checkpoints(job.folder)[-1].name == f"checkpoint-{status['step']}"
    assert "提前停止" in registry.reload_domains()[status["domain_id"]].title_zh
    assert not job.is_alive() and manager.active() is None
    ModelsService(registry, GpuGate(1, 4), service).rename(status["domain_id"], "改名的方块")

    resumed = FinetuneService(registry, JobManager(manager.root)).resume(None)
    assert resumed.job_id == job.id, resumed.message
    final = manager.job(job.id).wait(timeout=240)
    assert final["state"] == "done" and final["domain_id"] == status["domain_id"], job.log_tail()
    steps = [row["step"] for row in job.losses()]
    assert steps == list(range(1, 61)), "the history continues without repeats"
    assert registry.reload_domains()[status["domain_id"]].title_zh == "改名的方块（基于 测试）", "the owner's name survives the resume"
    assert [spec.id for spec in registry.domains.values() if spec.model.path == job.folder.resolve()] == [status["domain_id"]]


def test_stop_button_leaves_a_stop_file_for_the_trainer(service, manager):
    folder = manager.new_job_folder()
    (folder / "job.json").write_text("{}")
    manager._processes[folder.name] = subprocess.Popen(["sleep", "30"])
    try:
        assert service.stop(None).startswith("正在保存当前模型")
        assert (folder / "STOP").is_file()
    finally:
        manager._processes[folder.name].kill()
        manager._processes[folder.name].wait()
    assert service.stop(folder.name) == "没有正在运行的任务 / no job is running"


def test_a_job_whose_process_died_reads_as_failed(tmp_path):
    folder = tmp_path / "jobs" / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"pid": 2**22 + 12345}))
    (folder / "status.json").write_text(json.dumps({"state": "running", "step": 5, "max_steps": 10}))
    (folder / "log.txt").write_text("Killed\n")
    status = Job(folder).status()
    assert status["state"] == "failed" and "Killed" in status["message"]
    assert JobManager(tmp_path / "jobs").active() is None


def test_a_job_that_reported_its_end_does_not_block_the_next_while_its_process_exits(tmp_path):
    """Start once answered "a job is already training" right after a job finished: its process was
    still exiting (a zombie until reaped)."""
    manager = JobManager(tmp_path / "jobs")
    folder = manager.new_job_folder()
    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # rapid_diffusion trainer stand-in"])
    try:
        (folder / "job.json").write_text(json.dumps({"pid": exiting.pid}))
        (folder / "status.json").write_text(json.dumps({"state": "running", "step": 5, "max_steps": 10}))
        assert manager.active() is not None and manager.active().id == folder.name
        (folder / "status.json").write_text(json.dumps({"state": "done", "step": 10, "max_steps": 10}))
        assert Job(folder).is_alive(), "the process is still there"
        assert manager.active() is None, "but it no longer trains"
    finally:
        exiting.kill()
        exiting.wait()


def test_no_job_starts_while_another_trainer_holds_the_device(tmp_path):
    """A ``rapid-diffusion train`` in a terminal holds the same slot a job's process does."""
    from rapid_diffusion.training.slot import slot_path, training_slot

    manager = JobManager(tmp_path / "jobs")
    with training_slot(slot_path(manager.root)):
        with pytest.raises(JobBusyError, match="already training"):
            manager.start(TrainConfig(base="tiny", data=tmp_path, output=tmp_path, max_steps=1), tmp_path)
    assert manager.jobs() == []


def test_a_job_message_shows_no_server_path(tmp_path):
    folder = tmp_path / "jobs" / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"pid": 2**22 + 12345}))
    (folder / "status.json").write_text(json.dumps({"state": "running", "step": 5, "max_steps": 10}))
    (folder / "log.txt").write_text(f'  File "{tmp_path}/site-packages/torch/x.py", line 3\nKilled\n')
    view = job_view(Job(folder))
    assert str(tmp_path) not in view.status_markdown and "…/x.py" in view.status_markdown
    assert "训练进程已退出" in view.status_markdown


@pytest.mark.parametrize(
    "overrides, chinese",
    [
        ({"name": "  "}, "「新模型的名字」无效：请给新模型起个名字"),
        ({"name": "a/b"}, "「新模型的名字」无效：名字不能含"),
        ({"name": "长" * 41}, "「新模型的名字」无效：名字最多 40 个字"),
        ({"learning_rate": "fast"}, "「学习率」无效：须为数，例如 1e-5（收到 'fast'）"),
        ({"steps": 0}, "「训练步数」无效：须不小于 1（收到 0）"),
        ({"steps": 4.5}, "「训练步数」无效：须为整数（收到 4.5）"),
        ({"seed": float("nan")}, "「随机种子」无效：须为有限的数"),
        ({"resolution": 33}, "「分辨率」无效：须为 8 的倍数（收到 33）"),
    ],
)
def test_input_errors_are_caught_before_a_job_starts_in_chinese_first(service, manager, uploads, overrides, chinese):
    """The tab's settings are refused by TrainConfig's own bounds, each named by its label in the tab."""
    outcome = service.start(uploads, [], form(**overrides), names=finetune_ui.LABELS)
    assert outcome.job_id is None and outcome.message.startswith(chinese) and " / Invalid " in outcome.message
    assert manager.jobs() == []


def test_no_pairs_is_refused_before_a_job_starts(service, manager, tmp_path):
    outcome = service.start([], [], form())
    assert outcome.job_id is None and outcome.message.startswith("没有可用的图文对")
    assert manager.jobs() == []


def test_password_is_needed_for_every_action_and_the_base_is_whitelisted(monkeypatch, service, manager, uploads):
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_PASSWORD", "s3cret")
    wrong = say("wrong_password")
    assert service.start(uploads, [], form(), password="wrong").message == wrong
    assert service.stop(None, "wrong") == wrong
    assert service.resume(None, "wrong").message == wrong
    assert service.delete("tiny", "wrong") == wrong
    assert service.check(uploads, [], "wrong") == wrong
    assert service.view(None, "wrong") is None and service.view(None, "s3cret") is not None
    assert finetune_service.access_problem(None) == wrong and finetune_service.access_problem("s3cret") is None
    assert manager.jobs() == []
    outcome = service.start(uploads, [], form(base="/etc"), password="s3cret")
    assert outcome.job_id is None and "unknown base model" in outcome.message
    assert manager.jobs() == []


def test_a_public_host_without_a_password_has_no_fine_tuning(monkeypatch, service, uploads):
    import gradio as gr

    monkeypatch.setenv("RAPID_DIFFUSION_PUBLIC", "1")
    assert service.start(uploads, [], form()).message == say("finetune_off")
    with gr.Blocks() as demo:
        assert finetune_ui.build_finetune_tab(service) == {}
    assert [type(block).__name__ for block in demo.blocks.values()] == ["Markdown"]
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_PASSWORD", "s3cret")
    assert finetune_service.access_problem("s3cret") is None


def test_shipped_and_configured_domains_cannot_be_deleted(test_domains, manager):
    with pytest.raises(DeleteRefused, match="只能删除微调得到的模型"):
        delete_finetuned("tiny", manager)
    with pytest.raises(DeleteRefused):
        delete_finetuned("no-such-domain", manager)
    assert (test_domains / "tiny.yaml").is_file()


def test_cli_job_and_tab_defaults_are_the_train_config_defaults(service, tmp_path):
    """Training defaults are defined once, in TrainConfig."""
    import gradio as gr

    from rapid_diffusion.training.train import parse_args

    schema = defaults()
    parsed = parse_args(["--base", "b", "--data", "d", "--output", "o"])
    assert {k: getattr(parsed, k) for k in schema} == schema
    config = TrainConfig(base="tiny", data=tmp_path, output=tmp_path)
    config.save(tmp_path / "run.json")
    assert TrainConfig.load(tmp_path / "run.json") == config
    assert PRESETS["large"]["standard"].values() == {k: schema[k] for k in PRESETS["large"]["standard"].values()}

    with gr.Blocks() as demo:
        finetune_ui.build_finetune_tab(service)
    by_label = {b.label: b.value for b in demo.blocks.values() if getattr(b, "label", None) and hasattr(b, "value")}
    small_quick = PRESETS["small"]["quick"]
    assert by_label["训练步数 / training steps"] == small_quick.max_steps
    assert float(by_label["学习率（越大学得越快，也越容易学坏）/ learning rate"]) == small_quick.learning_rate
    assert by_label["每步图片数 / pictures per step"] == small_quick.batch_size
    assert by_label["累积几次再更新 / passes per update"] == small_quick.gradient_accumulation_steps
    assert by_label["分辨率（0 = 模型原生）/ resolution (0 = native)"] == (schema["resolution"] or 0)
    assert by_label["也训练文字理解部分 / also train the text understanding"] == schema["train_text_encoder"]
    assert by_label["精度 / precision"] == schema["mixed_precision"]
    assert by_label["省显存（更慢）/ save memory (slower)"] == schema["gradient_checkpointing"]
    assert by_label["权重平均（结果更平稳）/ weight averaging (smoother result)"] == schema["use_ema"]
    assert by_label["随机种子 / seed"] == schema["seed"]
    assert by_label["保留原有能力 / keep what the model knew"] == schema["prior_preservation"]


def test_presets_follow_the_base_and_say_how_long(service):
    assert service.preset_fields("tiny", "quick") == (300, "0.0002", 8, 1)
    assert "预计用时约" in service.duration("tiny", "quick")
    assert service.duration("tiny", "quick") == service.duration("tiny", "quick", "normal") != service.duration("tiny", "quick", "off")
    big = service.preset_fields(None, "thorough")
    assert big[2] == 1 and big[3] > 1 and float(big[1]) <= 1e-5
    assert "开始后几步内显示剩余时间" in service.duration(None, "standard")


def test_tab_builds_and_polls_without_a_job(service):
    import gradio as gr

    with gr.Blocks() as demo:
        components = finetune_ui.build_finetune_tab(service)
    assert set(components) >= {"new_domain", "loss_plot", "timer"}
    view = service.view(None)
    plot = finetune_ui.loss_plot_value(view)
    assert view.job_id is None and plot["data"] == []
    assert components["loss_plot"].postprocess(plot) == plot
    assert all(fn.api_visibility == "private" for fn in demo.fns.values()), "no fine-tune event is in the public API"


def test_smoothed_loss_is_debiased_and_flat_on_a_constant():
    assert finetune_service.smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    values = finetune_service.smoothed([1.0, 0.0] * 50)
    assert max(values[-10:]) - min(values[-10:]) < 0.2


def test_the_host_step_limit_caps_presets_and_refuses_longer_jobs(monkeypatch, service, uploads):
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_MAX_STEPS", "50")
    assert service.preset_fields("tiny", "thorough")[0] == 50
    outcome = service.start(uploads, [], form(steps=60))
    assert outcome.job_id is None and outcome.message.startswith("本服务器每次最多训练 50 步")


def test_uploads_over_the_job_budget_are_refused_before_a_folder_is_written(monkeypatch, service, manager, uploads):
    monkeypatch.setenv("RAPID_DIFFUSION_MAX_JOB_BYTES", str(sum(Path(f).stat().st_size for f in uploads) - 1))
    outcome = service.start(uploads, [], form())
    assert outcome.job_id is None and outcome.message.startswith("上传文件共") and "exceed a job's budget" in outcome.message
    assert manager.jobs() == []
    monkeypatch.setenv("RAPID_DIFFUSION_MAX_JOB_BYTES", str(sum(Path(f).stat().st_size for f in uploads)))
    assert finetune_service.job_budget_problem(uploads) is None
