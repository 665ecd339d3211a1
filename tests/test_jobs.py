"""Background training jobs and the fine-tune tab's handlers, on the tiny model in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rapid_diffusion import finetune_ui
from rapid_diffusion.jobs import Job, JobBusyError, JobManager, JobSettings
from rapid_diffusion.train import complete_checkpoints


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


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError("timed out waiting")


def test_caption_editor_rows_and_check_report(uploads):
    rows = finetune_ui.caption_rows(uploads)
    assert rows == [["red.png", ""], ["blue.png", "蓝色的方块"], ["broken.png", ""]]
    rows[0][1] = "红色的方块"
    rows[2][1] = "坏图"
    report = finetune_ui.check_rows(uploads, rows)
    assert [(p.item, p.text) for p in report.pairs] == [("red.png", "红色的方块"), ("blue.png", "蓝色的方块")]
    markdown = finetune_ui.report_markdown(report)
    assert "2 usable pairs, 1 items skipped" in markdown and "broken.png: 无法解码的图片 / not a decodable image" in markdown


@pytest.mark.slow
def test_job_trains_in_a_subprocess_then_the_tab_shows_before_after_and_the_new_domain(manager, uploads, registry):
    rows = [["red.png", "红色的方块"], ["blue.png", "蓝色的方块"]]
    settings = JobSettings(
        base="tiny", max_steps=4, learning_rate=1e-3, resolution=32, validation_prompts=("红色的方块",),
        validation_every=2, validation_inference_steps=2, checkpoint_every=0, domain_id="tiny-job",
    )
    outcome = finetune_ui.start_job(manager, uploads, rows, settings)
    assert outcome.job_id is not None, outcome.message
    with pytest.raises(JobBusyError):
        manager.start(settings, manager.root / outcome.job_id / "data")
    after_refresh = JobManager(manager.root)
    assert after_refresh.active() is not None, manager.job(outcome.job_id).log_tail()
    assert after_refresh.active().id == outcome.job_id

    status = manager.job(outcome.job_id).wait(timeout=240)
    assert status["state"] == "done", manager.job(outcome.job_id).log_tail()
    view = finetune_ui.view_job(JobManager(manager.root), None)
    assert view.job_id == outcome.job_id and view.new_domain == "tiny-job"
    assert [row[0] for row in view.loss_plot["data"]] == [1, 2, 3, 4] and view.loss_plot["columns"] == ["step", "loss"]
    assert [label for _, label in view.comparison] == ["微调前 / before", "微调后 / after"]
    before, after = (np.asarray(Image.open(path)) for path, _ in view.comparison)
    assert before.shape == after.shape == (32, 32, 3) and not np.array_equal(before, after)
    assert "step 4" in view.samples[-1][1] and "4/4" in view.progress_html
    assert "tiny-job" in registry.reload_domains()
    metadata = (manager.root / outcome.job_id / "data" / "metadata.jsonl").read_text(encoding="utf-8")
    assert [json.loads(line)["source"] for line in metadata.splitlines()] == ["red.png", "blue.png"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_state_survives_a_new_manager(manager, uploads):
    settings = JobSettings(base="tiny", max_steps=2000, learning_rate=1e-4, resolution=32, checkpoint_every=0)
    outcome = finetune_ui.start_job(manager, uploads, [["red.png", "红色的方块"]], settings)
    job = manager.job(outcome.job_id)
    wait_for(lambda: job.status().get("step", 0) >= 2, timeout=180)
    JobManager(manager.root).latest().terminate()
    status = job.wait(timeout=120)
    assert status["state"] == "stopped", job.log_tail()
    assert complete_checkpoints(job.folder)[-1].name == f"checkpoint-{status['step']}"
    assert not job.is_alive() and manager.active() is None


def test_stop_button_leaves_a_stop_file_for_the_trainer(manager):
    folder = manager.new_job_folder()
    (folder / "job.json").write_text("{}")
    manager._processes[folder.name] = subprocess.Popen(["sleep", "30"])
    try:
        assert finetune_ui.stop_job(manager, None).startswith("正在保存检查点")
        assert (folder / "STOP").is_file()
    finally:
        manager._processes[folder.name].kill()
        manager._processes[folder.name].wait()
    assert finetune_ui.stop_job(manager, folder.name) == "没有正在运行的任务 / no job is running"


def test_a_job_whose_process_died_reads_as_failed(tmp_path):
    folder = tmp_path / "jobs" / "20260101-000000-abcdef"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"pid": 2**22 + 12345}))
    (folder / "status.json").write_text(json.dumps({"state": "running", "step": 5, "max_steps": 10}))
    (folder / "log.txt").write_text("Killed\n")
    status = Job(folder).status()
    assert status["state"] == "failed" and "Killed" in status["message"]
    assert JobManager(tmp_path / "jobs").active() is None


def test_password_base_whitelist_and_switch_off(monkeypatch, manager, uploads):
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_PASSWORD", "s3cret")
    settings = JobSettings(base="tiny", max_steps=1)
    assert finetune_ui.start_job(manager, uploads, [], settings, password="wrong").message == "密码错误 / wrong password"
    assert manager.jobs() == []
    outcome = finetune_ui.start_job(
        manager, uploads, [], JobSettings(base="/etc"), password="s3cret", allowed_bases={"tiny"}
    )
    assert outcome.job_id is None and "unknown base model" in outcome.message
    assert manager.jobs() == []
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE", "off")
    assert not finetune_ui.finetune_enabled()


def test_tab_builds_and_polls_without_a_job(registry, manager):
    import gradio as gr

    with gr.Blocks():
        components = finetune_ui.build_finetune_tab(registry, manager)
    assert set(components) >= {"new_domain", "loss_plot", "timer"}
    view = finetune_ui.view_job(manager, None)
    assert view.job_id is None and view.loss_plot["data"] == []
    assert components["loss_plot"].postprocess(view.loss_plot) == view.loss_plot


def test_switched_off_tab_is_only_a_notice(monkeypatch, registry, manager):
    import gradio as gr

    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE", "off")
    with gr.Blocks() as demo:
        assert finetune_ui.build_finetune_tab(registry, manager) == {}
    assert [type(block).__name__ for block in demo.blocks.values()] == ["Markdown"]
