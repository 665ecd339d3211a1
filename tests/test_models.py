"""The Models tab's service (``service/models.py``) and its widget values (``serving/models_ui.py``), without a browser.

A fine-tuned model is made the cheap way (a copy of the tiny model registered as a finished job
registers it, ``helpers.finished_finetune``); every action is checked against the files on disk.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rapid_diffusion.domains import SETTINGS_FILE, user_domains_dir, write_domain_yaml
from rapid_diffusion.errors import UserFacingError
from rapid_diffusion.knowledge import EntityEmbeddings, Knowledge, KnowledgeGraph, Triple
from rapid_diffusion.models.checkpoints import ImportFailed
from rapid_diffusion.paths import models_dir
from rapid_diffusion.service.app import AppService, GpuGate
from rapid_diffusion.service.models import import_any
from rapid_diffusion.serving.models_ui import act, domain_errors_markdown, models_table, table_row
from rapid_diffusion.training.options import TrainConfig
from rapid_diffusion.training.publish import register_domain

from helpers import finished_finetune, patch_zip_entry, write_domain

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def service(registry) -> AppService:
    return AppService(registry, GpuGate(1, 4))


@pytest.fixture()
def finetuned(service, tiny_model_dir) -> str:
    return finished_finetune(tiny_model_dir, service.spec("tiny"), name="我的粉色", steps=4)


def files_of(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_each_model_is_listed_by_its_name_with_base_steps_date_size_and_how_training_ended(service, finetuned, tiny_model_dir):
    stopped = finished_finetune(tiny_model_dir, service.spec("tiny"), name="半途", steps=2, state="stopped")
    rows = {row.id: row for row in service.models.rows()}
    mine = rows[finetuned]
    assert (mine.name, mine.kind, mine.base, mine.steps, mine.outcome) == ("我的粉色（基于 测试）", "finetuned", "测试", 4, "done")
    assert time.time() - 60 < mine.created <= time.time()
    assert mine.size_bytes == sum(files_of(tiny_model_dir).values()), "the pipeline's files, not the run's"
    assert (rows[stopped].steps, rows[stopped].outcome) == (2, "stopped")
    assert (rows["tiny"].kind, rows["tiny"].base, rows["tiny"].outcome) == ("configured", None, None)
    assert {finetuned, stopped} <= {model_id for _, model_id in service.models.choices()}, "the picker offers fine-tuned models"
    name, origin, base, steps, date, size, *_ = table_row(mine)
    assert name == f"**我的粉色（基于 测试）**<br><small>`{finetuned}`</small>"
    assert (origin, base, steps) == ("微调 / fine-tuned · 完成 / done", "测试", "4")
    assert date == time.strftime("%Y-%m-%d %H:%M", time.localtime(mine.created)) and size.endswith(" MB")
    assert table_row(rows[stopped])[1] == "微调 / fine-tuned · 提前停止 / stopped early"
    order = [row[0].split("`")[1] for row in models_table(service)]
    assert order[:3] == [stopped, finetuned, "demo"], "the owner's models first, newest first"


def test_a_loaded_model_shows_its_memory_and_what_it_runs_on_in_words(service):
    table, _, message, picker, _ = act(service, service.models.load, "tiny", None)
    assert message.startswith("已加载 测试")
    row = next(r for r in table if "`tiny`" in r[0])
    assert row[6] == "已加载 loaded" and row[7].endswith(" s") and float(row[7].split()[0]) > 0
    assert row[8] == "未加速 / not accelerated", "no 'eager', no 'none → none'"
    table, _, message, *_ = act(service, service.models.unload, "tiny", None)
    assert message == "已卸载 测试 / Unloaded 测试" and next(r for r in table if "`tiny`" in r[0])[6] == "本地可用 offline-ready"


def test_a_failed_load_keeps_the_table_and_says_why_without_a_path(service, test_domains, tmp_path):
    write_domain(test_domains, "broken", tmp_path / "gone")
    table, _, message, *_ = act(service, service.models.load, "broken", None)
    assert len(table) == len(service.domains) and "`broken`" in table[0][0], "the table stays on screen"
    assert message.startswith("**") and "领域「测试」的模型文件缺失" in message and str(tmp_path) not in message


def test_rename_gives_a_new_name_keeps_the_id_and_protects_the_others(service, finetuned, tiny_model_dir):
    assert service.models.rename(finetuned, "  猫咪  ") == "已将「我的粉色（基于 测试）」改名为「猫咪」 / renamed '我的粉色（基于 测试）' to '猫咪'"
    spec = service.spec(finetuned)
    assert (spec.title_zh, spec.title_en, spec.id) == ("猫咪（基于 测试）", "猫咪 (based on Test)", finetuned), "the rule publishing uses"
    assert TrainConfig.load(spec.model.path / "run.json").name == "猫咪"
    (spec.model.path / "run.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserFacingError, match="「猫咪（基于 测试）」的训练记录 run.json 无法读取，名字未改") as refused:
        service.models.rename(finetuned, "小狗")
    assert refused.value.status == 409 and str(spec.model.path) not in refused.value.message
    assert service.spec(finetuned).title_zh == "猫咪（基于 测试）"
    service.models.import_model(None, str(tiny_model_dir), "导入的")
    imported = next(s for s in service.domains.values() if s.title_zh == "导入的")
    service.models.rename(imported.id, "别名")
    assert (service.spec(imported.id).title, service.spec(imported.id).title_en) == ("别名", "别名"), "one name, not '别名 / 别名'"
    for model_id, name, refusal in [("tiny", "x", "受保护"), (finetuned, "", "起个名字"), (finetuned, "a/b", "不能含"), (None, "x", "请先选择")]:
        with pytest.raises(UserFacingError, match=refusal):
            service.models.rename(model_id, name)
    assert service.spec("tiny").title_zh == "测试"


def test_a_renamed_stopped_fine_tune_keeps_its_name_and_id_when_its_run_publishes_again(service, tiny_model_dir):
    """Resuming reads run.json and publishes again (register_domain); it used to bring the old name back, under a new id."""
    stopped = finished_finetune(tiny_model_dir, service.spec("tiny"), name="半途", steps=2, state="stopped")
    assert service.spec(stopped).title_zh == "半途（基于 测试）·提前停止"
    service.models.rename(stopped, "猫咪")
    assert service.spec(stopped).title_zh == "猫咪（基于 测试）·提前停止"
    folder = service.spec(stopped).model.path
    resumed = TrainConfig.load(folder / "run.json")
    assert register_domain(resumed, folder, 64, service.spec("tiny"), stopped=True) == stopped
    assert register_domain(resumed, folder, 64, service.spec("tiny")) == stopped, "the resumed run finishes"
    service.registry.reload_domains()
    assert service.spec(stopped).title_zh == "猫咪（基于 测试）" and ("猫咪（基于 测试） · " + stopped, stopped) in service.models.choices()
    assert [spec.id for spec in service.domains.values() if spec.model.path == folder] == [stopped], "no second domain"

    running = TrainConfig.load(folder / "run.json")  # a run that started before the rename holds the old name
    service.models.rename(stopped, "小狗")
    assert register_domain(running, folder, 64, service.spec("tiny")) == stopped
    assert service.registry.reload_domains()[stopped].title_zh == "小狗（基于 测试）"


def test_export_and_import_round_trip_the_weights_through_one_import_path(service, finetuned, tiny_model_dir, tmp_path):
    exported = service.models.export(finetuned)
    assert exported.name == f"{finetuned}.zip"
    with zipfile.ZipFile(exported) as archive:
        exported_files = {info.filename: info.file_size for info in archive.infolist()}
    assert exported_files.keys() - {SETTINGS_FILE} == files_of(tiny_model_dir).keys()
    assert all(exported_files[name] == size for name, size in files_of(tiny_model_dir).items())
    assert service.models.import_model(str(exported), None, "导入的猫") == "已导入新模型「导入的猫」，可在「文生图」中选用 / imported '导入的猫'; pick it in the Text to image tab"
    imported = next(spec for spec in service.domains.values() if spec.title_zh == "导入的猫")
    row = service.models.info(imported)
    assert (row.kind, row.base, row.outcome) == ("imported", None, None)
    original, copy = load_file(tiny_model_dir / UNET_WEIGHTS), load_file(imported.model.path / UNET_WEIGHTS)
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    assert [p.name for p in models_dir().iterdir()] == [imported.id], "the unpacked zip is gone"

    out = subprocess.run([sys.executable, "-m", "rapid_diffusion", "import", str(exported), "--name", "cli-copy"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "domain: cli-copy" in out.stdout and (models_dir() / "cli-copy" / UNET_WEIGHTS).is_file()

    assert service.models.delete(imported.id).startswith("已删除模型「导入的猫」")
    assert not imported.model.path.exists() and imported.id not in service.domains, "an imported model's folder goes too"


def knowledge_for(pipe) -> Knowledge:
    """A knowledge graph of two facts with random entity vectors and a non-zero projection (seeded)."""
    triples = [Triple("番茄", "颜色", "红色"), Triple("香蕉", "颜色", "黄色")]
    graph = KnowledgeGraph(triples, {"番茄": ("西红柿",)})
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(len(graph.entities), 8, generator=generator)
    knowledge = Knowledge.create(graph, EntityEmbeddings(graph.entities, graph.relations, vectors, torch.zeros(1, 8)),
                                 pipe.text_encoder.config.hidden_size)
    torch.nn.init.normal_(knowledge.injector.projection.weight, generator=generator)
    return knowledge


def test_an_export_carries_the_settings_and_the_knowledge_and_the_import_brings_them_back(service, tiny_model_dir):
    pipe = service.registry.get(service.spec("tiny")).pipe
    finetuned = finished_finetune(tiny_model_dir, service.spec("tiny"), name="番茄", steps=2, knowledge=knowledge_for(pipe))
    original = service.spec(finetuned)
    settings = dict(height=96, width=128, num_inference_steps=7, guidance_scale=3.5, sampler="euler_a",
                    negative_prompt="模糊, 低质量", examples=["红色的番茄", "黄色的香蕉", "西红柿"], description="知识增强 / knowledge")
    data = yaml.safe_load(original.source_file.read_text(encoding="utf-8"))
    write_domain_yaml(finetuned, {**{k: v for k, v in data.items() if k != "id"}, **settings})
    service.registry.reload_domains()
    original = service.spec(finetuned)

    exported = service.models.export(finetuned)
    with zipfile.ZipFile(exported) as archive:
        names = set(archive.namelist())
        carried = yaml.safe_load(archive.read(SETTINGS_FILE))
    knowledge_files = {p.relative_to(original.model.path).as_posix() for p in (original.model.path / "knowledge").iterdir()}
    assert len(knowledge_files) == 4 and knowledge_files <= names
    assert carried == {"title": {"zh": "番茄（基于 测试）", "en": "番茄 (based on Test)"}, **settings}, "texts and settings, no path"

    service.models.import_model(str(exported), None, "导入的番茄")
    imported = next(spec for spec in service.domains.values() if spec.title_zh == "导入的番茄")
    for field in ("height", "width", "num_inference_steps", "guidance_scale", "sampler", "negative_prompt", "examples", "description"):
        assert getattr(imported, field) == getattr(original, field), field
    assert imported.knowledge_graph == imported.model.path / "knowledge"
    for name in knowledge_files:
        assert (imported.model.path / name).read_bytes() == (original.model.path / name).read_bytes(), name
    model = service.registry.get(imported)
    assert model.encode_prompt.describe("西红柿") == ["西红柿（番茄） → 颜色: 红色"], "the imported model loads its graph"


def test_a_plain_diffusers_folder_imports_with_the_defaults(service, tiny_model_dir):
    service.models.import_model(None, str(tiny_model_dir), "普通")
    spec = next(spec for spec in service.domains.values() if spec.title_zh == "普通")
    assert (spec.num_inference_steps, spec.guidance_scale, spec.sampler, spec.negative_prompt) == (20, 7.5, "pndm", "")
    assert spec.examples == ("一只猫", "一幅山水画", "一碗面条") and spec.knowledge_graph is None


@pytest.mark.parametrize("settings, field, problem", [
    ({"sampler": "euler", "extra": 1}, "extra", "not a setting a model carries"),
    ({"knowledge_graph": "/etc"}, "knowledge_graph", "not a setting a model carries"),
    ({"model": {"path": "/etc"}}, "model", "not a setting a model carries"),
    ({"title": {"zh": "a", "en": "b", "path": "/etc"}}, "title.path", "not a setting a model carries"),
    ({"num_inference_steps": 100_000}, "num_inference_steps", "must be between 1 and 200, got 100000"),
    ({"guidance_scale": "high"}, "guidance_scale", "must be a number"),
    ({"examples": ["x" * 3000, "b", "c"]}, "examples[0]", "at most 2000 characters, got 3000"),
    ({"description": "长" * 1_000_000}, "<file>", "larger than 64 KiB"),
])
def test_a_hostile_settings_file_refuses_the_import_by_name_and_registers_nothing(test_domains, tiny_model_dir, tmp_path, settings, field, problem):
    archive_path = tmp_path / "model.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        for path in sorted(p for p in tiny_model_dir.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(tiny_model_dir).as_posix())
        archive.writestr(SETTINGS_FILE, yaml.safe_dump(settings, allow_unicode=True))
    with pytest.raises(ImportFailed) as refused:
        import_any(archive_path, "hostile")
    message = str(refused.value)
    assert f"设置文件 {SETTINGS_FILE} 中「{field}」不可用" in message and "未导入任何内容" in message
    assert f"refused at '{field}': {problem}" in message and "nothing was imported" in message and len(message) < 600
    assert list(models_dir().iterdir()) == [] and not (user_domains_dir() / "hostile.yaml").exists()


def test_a_diffusers_folder_on_the_server_imports_and_a_bad_one_is_named(service, tiny_model_dir, tmp_path):
    assert "导入的文件夹" in service.models.import_model(None, str(tiny_model_dir), "导入的文件夹")
    for upload, folder, refusal in [(None, str(tmp_path / "nothing"), "找不到"), (None, "", "二选一"), ("a.zip", "/x", "二选一")]:
        with pytest.raises(UserFacingError, match=refusal):
            service.models.import_model(upload, folder, "x")


def test_delete_removes_a_fine_tuned_model_and_refuses_a_configured_one(service, finetuned):
    folder = service.spec(finetuned).model.path
    with pytest.raises(UserFacingError, match="受保护") as refused:
        service.models.delete("tiny")
    assert refused.value.status == 409 and "tiny" in service.domains
    assert service.models.delete(finetuned) == "已删除模型「我的粉色（基于 测试）」 / deleted 我的粉色 (based on Test)"
    assert not folder.exists() and not (user_domains_dir() / f"{finetuned}.yaml").exists()


def hostile_zip(path: Path, kind: str) -> str:
    """A zip with one hostile entry beside a model_index.json; returns the entry's name."""
    entry = {"slip": "../evil.json", "absolute": "/tmp/evil.json", "symlink": "unet/link", "encrypted": "unet/config.json",
             "bomb": "unet/zeros.bin", "nested": "inner.zip", "method": "vae/config.json"}[kind]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model_index.json", "{}")
        if kind == "symlink":
            info = zipfile.ZipInfo(entry)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
        else:
            archive.writestr(entry, b"\0" * 200_000 if kind == "bomb" else b"{}")
    if kind == "encrypted":
        patch_zip_entry(path, entry, flag_bits=0x1)
    if kind == "method":
        patch_zip_entry(path, entry, method=99)
    return entry


@pytest.mark.parametrize("kind, reason", [
    ("slip", "路径不安全"), ("absolute", "路径不安全"), ("symlink", "符号链接"), ("encrypted", "压缩包条目已加密"),
    ("bomb", "压缩比异常（压缩炸弹）"), ("nested", "压缩包内的压缩包"), ("method", "不支持的压缩方式"),
])
def test_a_hostile_zip_is_refused_by_name_and_nothing_is_written(test_domains, tmp_path, kind, reason):
    entry = hostile_zip(tmp_path / "model.zip", kind)
    with pytest.raises(ImportFailed) as refused:
        import_any(tmp_path / "model.zip", "hostile")
    assert f"zip 中的「{entry}」被拒绝：{reason}" in str(refused.value) and "nothing was imported" in str(refused.value)
    assert list(models_dir().iterdir()) == [] and not (user_domains_dir() / "hostile.yaml").exists()
    assert not (tmp_path / "evil.json").exists() and not Path("/tmp/evil.json").exists()


def test_a_zip_without_a_model_or_with_clashing_names_is_refused(test_domains, tmp_path):
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("a/b/model_index.json", "{}")
    with pytest.raises(ImportFailed, match="photos.zip 中没有 diffusers 模型"):
        import_any(tmp_path / "photos.zip", "photos")
    with zipfile.ZipFile(tmp_path / "clash.zip", "w") as archive:
        archive.writestr("model_index.json", "{}")
        archive.writestr("unet", "a file")
        archive.writestr("unet/config.json", "{}")
    with pytest.raises(ImportFailed, match="zip 中的「unet/config.json」被拒绝：压缩包损坏或无法读取"):
        import_any(tmp_path / "clash.zip", "clash")
    assert list(models_dir().iterdir()) == []


@pytest.mark.parametrize("env, password", [({"RAPID_DIFFUSION_PUBLIC": "1"}, None),
                                           ({"RAPID_DIFFUSION_PUBLIC": "1", "RAPID_DIFFUSION_FINETUNE_PASSWORD": "s3cret-pass"}, "wrong")])
def test_on_a_public_host_no_model_action_works_without_the_password(service, finetuned, tiny_model_dir, monkeypatch, env, password):
    exported = service.models.export(finetuned)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    models = service.models
    actions = [(models.load, ("tiny",)), (models.unload, ("tiny",)), (models.rename, (finetuned, "x")), (models.delete, (finetuned,)),
               (models.export, (finetuned,)), (models.import_model, (str(exported), None, "x")),
               (models.import_model, (None, str(tiny_model_dir), "x"))]
    for action, args in actions:
        with pytest.raises(UserFacingError) as refused:
            action(*args, password)
        assert refused.value.status == 403, action
    assert service.registry.loaded() == [] and service.spec(finetuned).title_zh == "我的粉色（基于 测试）"
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


def test_the_tab_lists_skipped_domain_files_by_name(service, test_domains):
    (test_domains / "bad.yaml").write_text("id: bad\nheight: tall\n", encoding="utf-8")
    text = domain_errors_markdown(service)
    assert "已跳过的领域文件 / Skipped domain files" in text and "`bad.yaml`" in text and str(test_domains) not in text
