"""Full fine-tuning on the tiny PAI-class model: loss falls, resume, stop, NaN, preflight, 2 processes."""

from __future__ import annotations

import json
import errno
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import rapid_diffusion.training.train as train_module
from rapid_diffusion.training import checkpoints, core, dataset, preflight, trainer
from rapid_diffusion.domains import load_domains
from helpers import REPO_ROOT
from rapid_diffusion.paths import DEMO_MODEL_DIR
from rapid_diffusion.serving.cli import main as cli_main
from rapid_diffusion.training.train import load_fp32_pipeline
from rapid_diffusion.training.options import PRIOR_IMAGES, PRIOR_WEIGHTS
from rapid_diffusion.training.run_files import comparison_lines, read_comparison, read_validation_losses
from rapid_diffusion.training.run_files import complete_checkpoints, read_losses
from rapid_diffusion.training.train import TrainConfig, TrainingError, train

SQUARES = {"红色的方块": (230, 30, 30), "蓝色的方块": (30, 30, 230)}


def write_pairs(folder: Path, extra_rows: list[dict] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (text, colour) in enumerate(SQUARES.items()):
        pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
        pixels[16:48, 16:48] = colour
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": text})
    rows += list(extra_rows)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


def quick_config(base, data: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        base=str(base), data=data, output=output, max_steps=6, learning_rate=1e-3, resolution=32,
        checkpoint_every=0, validation_every=0, lr_warmup_steps=0, prior_preservation="off",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second one mostly waits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state per process; each in-process run here chooses its own precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture()
def pairs(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs")


def test_cli_training_lowers_the_loss_and_registers_a_loadable_model(test_domains, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from rapid_diffusion.models.registry import ModelRegistry

    data = write_pairs(tmp_path / "pairs", [{"file_name": "missing.png", "text": "缺失"}])
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with (data / "metadata.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "坏图"}) + "\n")
    run = tmp_path / "run"
    code = cli_main([
        "train", "--base", "tiny", "--data", str(data), "--output", str(run), "--max-steps", "30", "--lr", "1e-3",
        "--resolution", "32", "--lr-warmup-steps", "0", "--checkpoint-every", "10", "--keep-checkpoints", "1",
        "--validation-prompt", "红色的方块", "--validation-every", "15", "--validation-inference-steps", "2",
        "--domain-id", "tiny-ft",
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "missing.png: 文件不存在 / file not found" in out and "broken.png" in out
    losses = [row["loss"] for row in read_losses(run)]
    assert [row["step"] for row in read_losses(run)] == list(range(1, 31))
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:6])
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-20"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000000", "step-000015", "step-000030"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["domain_id"] == "tiny-ft"

    # prior preservation, on by default: the tiny domain's examples and the captions without their new word: 块 (no
    # example has it), grown to 色的方块, the phrase both captions share around it
    examples = ["一个红色的圆形", "蓝色正方形", "左边有一个小的绿色三角形"]
    rows = [json.loads(line) for line in (run / "prior" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == PRIOR_IMAGES["small"] == status["prior_pairs"]
    assert [row["text"] for row in rows[:5]] == [*examples, "红", "蓝"]
    assert len({row["seed"] for row in rows}) == len(rows) and all((run / "prior" / row["file_name"]).is_file() for row in rows)
    assert all(row["prior_loss"] > 0 for row in read_losses(run))
    # the before/after figures, printed by the CLI from the run's comparison.json
    comparison = read_comparison(run)
    assert comparison["fit_on"] == "training" and comparison["fit_loss_after"] < comparison["fit_loss_before"]
    assert comparison["outside_prompts"] == examples and comparison["clip_unavailable"] and "judge_before" not in comparison
    assert [len(list((run / "outside" / step).glob("*.png"))) for step in ("step-000000", "step-000030")] == [3, 3]
    assert 0 < comparison["outside_changed"] < 100
    assert all(line in out for line in comparison_lines(comparison)) and len(comparison_lines(comparison)) == 3
    assert "与你的图片的接近程度：训练图片上的损失" in out and "上传以外的 3 个提示词" in out and "no CLIP weights on this machine" in out

    pipe = StableDiffusionPipeline.from_pretrained(run, safety_checker=None, requires_safety_checker=False)
    assert {p.suffix for p in (run / "unet").iterdir()} == {".json", ".safetensors"}
    assert not (run / "model.tmp").exists()
    image = pipe("红色的方块", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    spec = ModelRegistry(device=torch.device("cpu")).reload_domains()["tiny-ft"]
    assert spec.model.path == run.resolve() and spec.height == 64 and "红色的方块" in spec.examples


def test_resume_uses_the_newest_complete_checkpoint_and_ignores_a_half_written_one(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    first = train(quick_config(tiny_model_dir, pairs, run, max_steps=4, checkpoint_every=2, use_ema=True), log=lambda *_: None)
    assert first.state == "done" and [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]
    assert not (run / "prior").exists() and all("prior_loss" not in row for row in read_losses(run)), "off: no prior pairs"
    half_written = run / "checkpoints" / "tmp-checkpoint-6"
    shutil.copytree(run / "checkpoints" / "checkpoint-2", half_written)
    (half_written / "optimizer.bin").write_bytes(b"\0" * 10)

    messages = []
    resumed = train(quick_config(tiny_model_dir, pairs, run, max_steps=5, resume=True, use_ema=True), log=messages.append)
    assert resumed.state == "done" and resumed.step == 5
    assert any("resumed from checkpoint-2" in m for m in messages)
    assert len(resumed.losses) == 3
    assert [row["step"] for row in read_losses(run)] == [1, 2, 3, 4, 5]
    assert not half_written.exists()


def test_stop_request_saves_a_checkpoint_then_resume_finishes(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    (run).mkdir()
    (run / "STOP").touch()
    monkeypatch.setattr(checkpoints.StopRequest, "requested", lambda self: len(read_losses(run)) >= 3)
    weights = []
    real_mix = trainer.prior_preservation_loss
    monkeypatch.setattr(trainer, "prior_preservation_loss", lambda i, p, w: weights.append(w) or real_mix(i, p, w))
    strong = dict(prior_preservation="strong", validation_inference_steps=2)
    stopped = train(quick_config(tiny_model_dir, pairs, run, max_steps=10, **strong), log=lambda *_: None)
    assert stopped.state == "stopped" and stopped.step == 3
    assert set(weights) == {PRIOR_WEIGHTS["strong"]} and len(weights) >= 3, "one term per forward pass, at the strong weight"
    assert PRIOR_WEIGHTS["strong"] > PRIOR_WEIGHTS["normal"] > 0
    drawn = {path.name: path.stat().st_mtime_ns for path in (run / "prior").iterdir()}
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-3"]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and "提前停止" in status["message"]
    assert (run / "model_index.json").is_file(), "a stopped run leaves a usable model"
    stopped_spec = load_domains()[stopped.domain_id]
    assert "提前停止" in stopped_spec.title_zh and stopped_spec.model.path == run.resolve()

    monkeypatch.setattr(checkpoints.StopRequest, "requested", lambda self: False)
    finished = train(quick_config(tiny_model_dir, pairs, run, max_steps=5, resume=True, **strong), log=lambda *_: None)
    assert finished.state == "done" and finished.domain_id == stopped.domain_id
    assert {path.name: path.stat().st_mtime_ns for path in (run / "prior").iterdir()} == drawn, "the same prior pairs, not drawn again"
    assert read_comparison(run)["fit_loss_before"] is not None and "fit_loss_after" in read_comparison(run)
    assert [row["step"] for row in read_losses(run)] == [1, 2, 3, 4, 5]
    assert "提前停止" not in load_domains()[finished.domain_id].title_zh


def test_bf16_checkpointing_ema_with_a_frozen_text_encoder(tiny_model_dir, pairs, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    config = quick_config(
        tiny_model_dir, pairs, run, max_steps=3, mixed_precision="bf16", gradient_checkpointing=True,
        train_text_encoder=False, use_ema=True, validation_prompts=["红色的方块"], validation_inference_steps=2,
    )
    assert train(config, log=lambda *_: None).state == "done"
    before = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    after = load_file(run / "text_encoder" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before) and after[next(iter(after))].dtype == torch.float32
    unet_before = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    unet_after = load_file(run / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)


def test_nan_loss_stops_the_run_with_a_clear_status(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    real_loss = trainer.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(trainer, "diffusion_loss", poisoned)
    result = train(quick_config(tiny_model_dir, pairs, tmp_path / "run"), log=lambda *_: None)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert result.state == "failed" and result.step == 3
    assert status["state"] == "failed" and "NaN" in status["message"] and "learning rate" in status["message"]
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_preflight_refuses_settings_that_do_not_fit_and_says_what_to_change(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(preflight, "available_memory", lambda device: 1024)
    with pytest.raises(TrainingError) as failure:
        train(quick_config(tiny_model_dir, pairs, tmp_path / "run", use_ema=True), log=lambda *_: None)
    message = str(failure.value)
    assert "does not fit" in message and "--gradient-checkpointing" in message and "--ema" in message
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and "--mixed-precision bf16" in status["message"]


def test_out_of_range_settings_are_refused_before_loading_anything(tmp_path):
    """Every refusal at once, all the Chinese first (joined by "；"), the English beside (by "; ")."""
    with pytest.raises(TrainingError) as failure:
        TrainConfig.checked(dict(base="x", data=tmp_path, output=tmp_path / "run", max_steps=0, resolution=33, domain_id="Bad Id"))
    chinese, english = str(failure.value).split(" / ", 1)
    assert chinese.count("；") == english.count("; ") == 2 and "「resolution」无效" in chinese and "Invalid resolution" in english
    with pytest.raises(TrainingError, match="「validation_prompts.0」无效：不能为空白"):
        TrainConfig.checked(dict(base="x", data=tmp_path, output=tmp_path, validation_prompts=[" "]))


def test_memory_estimate_shrinks_with_the_advised_settings(tiny_model_dir):
    pipe = load_fp32_pipeline(tiny_model_dir)
    cpu = torch.device("cpu")
    heavy = TrainConfig(base="x", data=Path("."), output=Path("."), use_ema=True, batch_size=4)
    light = TrainConfig(
        base="x", data=Path("."), output=Path("."), gradient_checkpointing=True, mixed_precision="bf16", train_text_encoder=False
    )
    assert preflight.estimate_memory(pipe, light, 64, cpu, False) < preflight.estimate_memory(pipe, heavy, 64, cpu, False)


def test_center_crop_and_flip_are_plain_pil():
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    resized = dataset.resize_short_side(image, 20)
    assert resized.size == (30, 20)
    cropped = dataset.crop(resized, 20, None)
    assert cropped.size == (20, 20) and np.array_equal(np.asarray(cropped), np.asarray(resized)[:, 5:25])
    tensor = dataset.to_tensor(cropped)
    assert tensor.shape == (3, 20, 20) and -1.0 <= tensor.min() and tensor.max() <= 1.0


@pytest.mark.slow
def test_two_process_accelerate_launch_on_cpu(tiny_model_dir, pairs, tmp_path):
    run = tmp_path / "run"
    env = dict(
        os.environ, RAPID_DIFFUSION_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT),
        ACCELERATE_USE_CPU="true",
    )
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rapid_diffusion.training.train",
        "--base", str(tiny_model_dir), "--data", str(pairs), "--output", str(run), "--max-steps", "4",
        "--lr", "1e-3", "--resolution", "32", "--checkpoint-every", "2", "--domain-id", "two-proc",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert [row["step"] for row in read_losses(run)] == [1, 2, 3, 4]
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"
    ]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "done" and status["processes"] == 2
    assert (tmp_path / "home" / "domains" / "two-proc.yaml").is_file()


def test_knowledge_run_trains_the_projection_and_the_new_domain_injects_entities(tiny_model_dir, tmp_path, monkeypatch):
    """``train --knowledge``: TransE vectors injected into the linked spans of the captions, the
    zero projection trained, the model saved with ``knowledge/`` and its domain linking entities."""
    from safetensors.torch import load_file

    from rapid_diffusion.domains import load_domains
    from helpers import generate_one
    from rapid_diffusion.generation.request import GenerationRequest
    from rapid_diffusion.models.registry import ModelRegistry

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    graph = tmp_path / "graph"
    graph.mkdir()
    (graph / "triples.tsv").write_text("番茄\t颜色\t红色\n蓝莓\t颜色\t蓝色\n番茄\t形状\t圆形\n蓝莓\t形状\t圆形\n", encoding="utf-8")
    (graph / "entities.tsv").write_text("番茄\t西红柿\n", encoding="utf-8")
    data = tmp_path / "pairs"
    data.mkdir()
    rows = []
    for i, (text, colour) in enumerate({"一个西红柿": (230, 30, 30), "一颗蓝莓": (30, 30, 230)}.items()):
        pixels = np.full((64, 64, 3), 128, dtype=np.uint8)
        pixels[16:48, 16:48] = colour
        Image.fromarray(pixels).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}, ensure_ascii=False))
    (data / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    lines: list[str] = []
    config = quick_config(
        tiny_model_dir, data, tmp_path / "run", max_steps=4, batch_size=2, knowledge=graph, domain_id="kg-run",
        validation_prompts=["一个西红柿"], validation_every=0, validation_inference_steps=2,
    )
    result = train(config, log=lines.append)
    assert result.state == "done", lines
    assert any("TransE on 5 entities" in line for line in lines)
    projection = load_file(result.model_dir / "knowledge" / "projection.safetensors")
    assert projection["projection.weight"].abs().sum() > 0, "the zero-initialised projection did not train"
    assert (result.model_dir / "knowledge" / "entity_embeddings.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step-000004" / "0.png").is_file()

    spec = load_domains([tmp_path / "home" / "domains"])["kg-run"]
    assert spec.knowledge_graph == (result.model_dir / "knowledge").resolve()
    model = ModelRegistry(domains={"kg-run": spec}, device=torch.device("cpu"), dtype=torch.float32).get(spec)
    assert model.encode_prompt is not None
    request = GenerationRequest(prompt="一个西红柿", num_inference_steps=2, seed=0)
    generated = generate_one(request, spec, registry=ModelRegistry(domains={"kg-run": spec}, device=torch.device("cpu"), dtype=torch.float32))
    assert any("西红柿（番茄） → 颜色: 红色" in note for note in generated.notes), generated.notes


def test_knowledge_graph_errors_are_reported_as_training_errors(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    with pytest.raises(TrainingError, match="knowledge graph"):
        train(quick_config(tiny_model_dir, pairs, tmp_path / "run", max_steps=1, knowledge=tmp_path / "no-graph"), log=lambda *_: None)


DEMO_MODEL = DEMO_MODEL_DIR
KILL_DURING_SAVE = """
import os, signal, sys
from pathlib import Path
from accelerate import Accelerator
from rapid_diffusion.training.train import TrainConfig, train

real_save_state = Accelerator.save_state

def save_state_then_die(self, output_dir=None, **kwargs):
    if str(output_dir).endswith("tmp-checkpoint-4"):
        Path(output_dir, "model.safetensors").write_bytes(b"half written")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_state(self, output_dir, **kwargs)

Accelerator.save_state = save_state_then_die
base, data, run = sys.argv[1:4]
train(TrainConfig(base=base, data=Path(data), output=Path(run), max_steps=6, learning_rate=1e-4, batch_size=2,
                  checkpoint_every=2, keep_checkpoints=2, validation_every=0, lr_warmup_steps=0, prior_preservation="off"))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="assets/demo-model not trained yet")
def test_demo_model_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(pairs, tmp_path, monkeypatch):
    """A real SIGKILL in the middle of writing checkpoint 4: checkpoint 2 stays usable and a resumed
    run continues from step 2 on the shipped demo model; a longer run there lowers the loss."""
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(DEMO_MODEL), str(pairs), str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]
    assert (run / "checkpoints" / "tmp-checkpoint-4").is_dir()

    messages: list[str] = []
    resumed = train(quick_config(DEMO_MODEL, pairs, run, max_steps=6, learning_rate=1e-4, batch_size=2, resolution=None, resume=True), log=messages.append)
    assert resumed.state == "done" and resumed.step == 6 and len(resumed.losses) == 4
    assert any("resumed from checkpoint-2" in m for m in messages)
    assert not (run / "checkpoints" / "tmp-checkpoint-4").exists()

    longer = train(quick_config(DEMO_MODEL, pairs, tmp_path / "longer", max_steps=60, learning_rate=3e-4, batch_size=2, resolution=None), log=lambda *_: None)
    assert longer.state == "done"
    assert np.mean(longer.losses[-15:]) < np.mean(longer.losses[:15]), (longer.losses[:15], longer.losses[-15:])


# ----------------------------------------------------------------------------- standard output, names, hazards


def test_output_folder_is_a_pipeline_that_transformers_4_tokenizers_can_read(tiny_model_dir, pairs, tmp_path, monkeypatch):
    """``--output DIR`` is the pipeline folder. transformers 4.x's BertTokenizer reads only
    ``vocab.txt`` (+ ``special_tokens_map.json``); installing transformers 4.57 in a second venv
    does not fit CI time, so the files are checked, and tokenizers built from those two files alone
    (a folder without transformers 5's ``tokenizer.json``, and the ``tokenizers`` library's
    WordPiece from ``vocab.txt``, which 4.x's fast BertTokenizer is) must tokenize like the saved one."""
    from diffusers import StableDiffusionPipeline
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    result = train(quick_config(tiny_model_dir, pairs, run, max_steps=2, name="我的粉色"), log=lambda *_: None)
    assert result.model_dir == run and (run / "model_index.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(run, safety_checker=None, requires_safety_checker=False)
    tokenizer_dir = run / "tokenizer"
    assert {"vocab.txt", "special_tokens_map.json", "tokenizer_config.json"} <= {p.name for p in tokenizer_dir.iterdir()}
    special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    assert special["unk_token"] == "[UNK]" and special["pad_token"] == "[PAD]"
    legacy = tmp_path / "legacy-tokenizer"
    legacy.mkdir()
    for name in ("vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, legacy / name)
    text = "一个红色的方块，左边有猫 abc"
    expected = pipe.tokenizer(text).input_ids
    assert expected[1] != pipe.tokenizer.unk_token_id
    assert BertTokenizer.from_pretrained(legacy)(text).input_ids == expected
    assert BertWordPieceTokenizer(str(tokenizer_dir / "vocab.txt"), lowercase=True).encode(text).ids == expected
    assert not (run / "model.tmp").exists()


def test_the_model_name_gives_a_fresh_domain_id_and_the_picker_title(test_domains, tiny_model_dir, pairs, tmp_path):
    first = train(quick_config("tiny", pairs, tmp_path / "a", max_steps=1, name="我的粉色"), log=lambda *_: None)
    second = train(quick_config("tiny", pairs, tmp_path / "b", max_steps=1, name="我的粉色"), log=lambda *_: None)
    assert first.domain_id != second.domain_id
    assert first.domain_id.startswith("ft-") and len(first.domain_id) <= 64
    spec = load_domains()[first.domain_id]
    assert spec.title_zh == "我的粉色（基于 测试）" and spec.title_en == "我的粉色 (based on Test)"


def test_held_out_pairs_give_the_default_prompts_and_a_reproducible_validation_loss(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    rows = [{"file_name": f"{i}.png", "text": f"第{i}个方块"} for i in range(2, 8)]
    data = tmp_path / "pairs"
    data.mkdir()
    for row, shade in zip(rows, range(40, 240, 30)):
        Image.fromarray(np.full((64, 64, 3), shade, dtype=np.uint8)).save(data / row["file_name"])
    write_pairs(data, rows)
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for run in runs:
        result = train(quick_config(tiny_model_dir, data, run, max_steps=4, validation_every=2, validation_inference_steps=2), log=lambda *_: None)
        assert result.state == "done"
    status = json.loads((runs[0] / "status.json").read_text())
    assert status["held_out"] == 2 and status["pairs"] == 6 and len(status["validation_prompts"]) == 2
    assert sorted(p.name for p in (runs[0] / "samples").iterdir()) == ["step-000000", "step-000002", "step-000004"]
    assert len(list((runs[0] / "samples" / "step-000004").glob("*.png"))) == 2
    first, second = (read_validation_losses(run) for run in runs)
    assert [row["step"] for row in first] == [0, 2, 4]
    assert first[0]["loss"] == second[0]["loss"], "fixed noise and timesteps: the base model's validation loss repeats exactly"


def test_a_resume_without_a_checkpoint_starts_the_loss_history_over(tiny_model_dir, pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    train(quick_config(tiny_model_dir, pairs, run, max_steps=3), log=lambda *_: None)
    messages = []
    train(quick_config(tiny_model_dir, pairs, run, max_steps=3, resume=True), log=messages.append)
    assert any("no checkpoint to resume from" in m for m in messages)
    assert [row["step"] for row in read_losses(run)] == [1, 2, 3]


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_fails_cleanly_and_resume_works_after(tiny_model_dir, pairs, tmp_path, monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    real_save_state = Accelerator.save_state

    def fills_the_disk(self, output_dir=None, **kwargs):
        if str(output_dir).endswith("tmp-checkpoint-4"):
            Path(output_dir, "model.safetensors").write_bytes(b"half written")
            disk_full()
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    with pytest.raises(TrainingError, match="^磁盘已满.* / disk full"):
        train(quick_config(tiny_model_dir, pairs, run, max_steps=6, checkpoint_every=2), log=lambda *_: None)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["message"].startswith("磁盘已满")
    assert not (run / "checkpoints" / "tmp-checkpoint-4").exists()
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]

    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    resumed = train(quick_config(tiny_model_dir, pairs, run, max_steps=6, checkpoint_every=2, resume=True), log=lambda *_: None)
    assert resumed.state == "done" and [row["step"] for row in read_losses(run)] == [1, 2, 3, 4, 5, 6]


def test_a_failed_final_save_leaves_no_model_tmp(tiny_model_dir, pairs, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    real_save = StableDiffusionPipeline.save_pretrained

    def half_then_full(self, folder, **kwargs):
        real_save(self, folder, **kwargs)
        disk_full()

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", half_then_full)
    with pytest.raises(TrainingError, match="disk full"):
        train(quick_config(tiny_model_dir, pairs, run, max_steps=2), log=lambda *_: None)
    assert not (run / "model.tmp").exists() and not (run / "model_index.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "failed"


def test_train_parses_its_own_flags_and_a_job_config(tmp_path):
    """train.py owns parse_args/main; ``--config run.json`` is the job's hand-over, flags override it."""
    config = TrainConfig(base="tiny", data=tmp_path / "d", output=tmp_path / "o", name="我的", max_steps=7, validation_prompts=["一只猫"])
    config.save(tmp_path / "run.json")
    parsed = train_module.parse_args(["--config", str(tmp_path / "run.json"), "--lr", "3e-4", "--resume"])
    assert parsed == TrainConfig(**{**config.__dict__, "learning_rate": 3e-4, "resume": True})
    assert train_module.parse_args(["--base", "b", "--data", "d", "--output", "o"]) == TrainConfig(base="b", data=Path("d"), output=Path("o"))
    with pytest.raises(TrainingError, match="--base"):
        train_module.parse_args(["--data", "d", "--output", "o"])
    source = Path(train_module.__file__).read_text()
    assert "from .cli" not in source and "import cli" not in source


@pytest.mark.parametrize("scale, expected", [(None, 3.0), (1.0, 1.0)])
def test_token_embeddings_learn_at_their_own_rate(tiny_model_dir, pairs, tmp_path, monkeypatch, scale, expected):
    """One AdamW step moves every weight with a gradient by about the rate (its first step is
    g / |g|), plus the decay's lr * 0.01 * w: the embedding rows of the captions' characters by
    ``expected`` x the rate (3 by default on a small base, 1 when told), the UNet by the rate, and
    rows of characters no caption has by the decay alone."""
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    from transformers import BertTokenizer, CLIPTextModel
    from diffusers import UNet2DConditionModel

    lr = 1e-3
    config = quick_config(tiny_model_dir, pairs, tmp_path / "run", max_steps=1, learning_rate=lr, embedding_lr_scale=scale,
                          unet_max_timestep=1000)  # the UNet learns from both draws' timesteps, whatever they are
    result = train(config, log=lambda *_: None)
    assert result.state == "done"
    tokenizer = BertTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    before = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").get_input_embeddings().weight.detach()
    after = CLIPTextModel.from_pretrained(result.model_dir, subfolder="text_encoder").get_input_embeddings().weight.detach()
    used = sorted({i for text in SQUARES for i in tokenizer(text, add_special_tokens=False)["input_ids"]})
    unused = tokenizer.convert_tokens_to_ids(["粉", "星"])
    moved = (after - before).abs()
    assert moved[used].amax().item() == pytest.approx(expected * lr, rel=0.05)
    assert moved[unused].amax().item() <= expected * lr * 0.01 * before[unused].abs().amax().item() * 1.01
    unet_before = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").conv_in.weight.detach()
    unet_after = UNet2DConditionModel.from_pretrained(result.model_dir, subfolder="unet").conv_in.weight.detach()
    assert (unet_after - unet_before).abs().amax().item() == pytest.approx(lr, rel=0.05)


def test_min_snr_weights_the_loss_per_sample_by_its_timestep():
    """Against a reference computed here from the schedule itself: SNR = a / (1 - a) with a the
    cumulative alpha, weight min(SNR, 5) / (SNR + 1) for v-prediction (min(SNR, 5) / SNR for
    epsilon), the loss the mean of weight x each sample's MSE; without gamma the plain MSE."""
    from diffusers import DDPMScheduler

    from rapid_diffusion.training.core import denoising_loss

    torch.manual_seed(0)
    latents, noise, prediction = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    timesteps = torch.tensor([20, 300, 900])
    unet = lambda noisy, t, hidden, return_dict: (prediction,)  # noqa: E731
    for prediction_type in ("v_prediction", "epsilon"):
        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        alpha = scheduler.alphas_cumprod[timesteps].double()
        snr = alpha / (1 - alpha)
        weights = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
        target = scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise
        per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3)).double()
        loss = denoising_loss(unet, scheduler, latents, torch.zeros(3, 3, 8), noise, timesteps, snr_gamma=5.0)
        assert loss.item() == pytest.approx((weights * per_sample).mean().item(), rel=1e-5)
        plain = denoising_loss(unet, scheduler, latents, torch.zeros(3, 3, 8), noise, timesteps)
        assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
        assert loss.item() != pytest.approx(plain.item(), rel=0.05)
        if prediction_type == "v_prediction":  # the noisiest timestep hardly counts: backgrounds are not memorised
            assert weights[2] < 0.01 < 0.2 < weights[1]


def record_denoising_loss_argument(monkeypatch, name: str) -> list:
    """The trainer's calls of the denoising loss still run; the list gets ``name``'s value of each."""
    seen = []
    real = core.denoising_loss

    def recording(*args, **kwargs):
        seen.append(kwargs.get(name))
        return real(*args, **kwargs)

    monkeypatch.setattr(core, "denoising_loss", recording)
    return seen


@pytest.mark.parametrize("gamma, expected", [(0.0, None), (5.0, 5.0)])
def test_min_snr_weighting_is_used_when_asked(tiny_model_dir, pairs, tmp_path, monkeypatch, gamma, expected):
    """``--snr-gamma 5`` weighs the training loss, 0 (the default) leaves it plain; the validation
    loss stays plain either way, comparable between runs."""
    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    seen = record_denoising_loss_argument(monkeypatch, "snr_gamma")
    config = quick_config(tiny_model_dir, pairs, tmp_path / "run", max_steps=2, snr_gamma=gamma, holdout=2, validation_every=1)
    assert TrainConfig(base="b", data=Path("d"), output=Path("o")).snr_gamma == 0.0
    assert train(config, log=lambda *_: None).state == "done"
    assert seen.count(expected) >= 2 and set(seen) == {expected, None}


def test_the_noisiest_timesteps_teach_the_text_but_not_the_unet():
    """Against references computed here: with ``unet_max_timestep`` the loss is the same number,
    the UNet's gradient is that of the quieter samples' share alone, and the prompt's gradient is
    the plain one (every sample teaches the text); without it the UNet's gradient differs (a
    negative control)."""
    from diffusers import DDPMScheduler

    from rapid_diffusion.training.core import denoising_loss

    class Unet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(8, 4)

        def forward(self, noisy, t, hidden, return_dict=False):
            return (noisy * self.mix(hidden.mean(dim=1))[:, :, None, None] + t[:, None, None, None] / 1000,)

    torch.manual_seed(0)
    unet, scheduler = Unet(), DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    latents, noise, timesteps = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2), torch.tensor([900, 100, 750, 300])
    prompt = torch.randn(4, 3, 8)

    def gradients(loss_of):
        unet.zero_grad()
        hidden = prompt.clone().requires_grad_(True)
        loss = loss_of(hidden)
        loss.backward()
        return loss.item(), unet.mix.weight.grad.clone(), hidden.grad.clone()

    limited = gradients(lambda h: denoising_loss(unet, scheduler, latents, h, noise, timesteps, unet_max_timestep=700))
    plain = gradients(lambda h: denoising_loss(unet, scheduler, latents, h, noise, timesteps))
    quiet = timesteps < 700
    target = scheduler.get_velocity(latents, noise, timesteps)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    reference = gradients(lambda h: ((unet(noisy, timesteps, h)[0] - target) ** 2)[quiet].sum() / target.numel())
    assert limited[0] == pytest.approx(plain[0], rel=1e-6)
    assert torch.allclose(limited[1], reference[1], atol=1e-7)
    assert not torch.allclose(plain[1], reference[1], atol=1e-4)
    assert torch.allclose(limited[2], plain[2], atol=1e-7) and limited[2][~quiet].abs().sum() > 0


def test_the_unet_of_a_small_base_leaves_the_noisiest_timesteps_alone(tiny_model_dir, pairs, tmp_path, monkeypatch):
    """Small bases default to a UNet that learns below timestep 700, large ones from all;
    ``--unet-max-timestep`` overrides either; the validation loss is measured the plain way."""
    from rapid_diffusion.training.options import unet_timestep_limit

    config = TrainConfig(base="b", data=Path("d"), output=Path("o"))
    assert (unet_timestep_limit(config, 64), unet_timestep_limit(config, 512)) == (700, None)
    config.unet_max_timestep = 900
    assert (unet_timestep_limit(config, 64), unet_timestep_limit(config, 512)) == (900, 900)
    for bad in (0, 1001):
        with pytest.raises(ValidationError, match="unet_max_timestep"):
            config.unet_max_timestep = bad

    monkeypatch.setenv("RAPID_DIFFUSION_HOME", str(tmp_path / "home"))
    seen = record_denoising_loss_argument(monkeypatch, "unet_max_timestep")
    config = quick_config(tiny_model_dir, pairs, tmp_path / "run", max_steps=2, holdout=2, validation_every=1)
    assert train(config, log=lambda *_: None).state == "done"
    assert seen.count(700) == 2 and set(seen) == {700, None}


def test_the_cli_trains_within_the_host_step_limit(test_domains, tmp_path, monkeypatch, capsys):
    """``rapid-diffusion train`` goes by the host's cap as the web UI's jobs do (no silent longer run)."""
    monkeypatch.setenv("RAPID_DIFFUSION_FINETUNE_MAX_STEPS", "2")
    run = tmp_path / "run"
    code = cli_main(["train", "--base", "tiny", "--data", str(write_pairs(tmp_path / "pairs")), "--output", str(run),
                     "--max-steps", "6", "--resolution", "32", "--prior-preservation", "off", "--checkpoint-every", "0",
                     "--validation-every", "0", "--lr-warmup-steps", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "6 steps cut to 2" in out and "已从 6 步减为 2 步" in out
    assert [row["step"] for row in read_losses(run)] == [1, 2]


def test_a_second_trainer_on_the_device_is_refused_at_once(test_domains, tmp_path, capsys):
    """Whatever face started the first (a web UI job's process holds the same slot), the CLI waits for nobody."""
    from rapid_diffusion.training.slot import slot_taken, training_slot

    assert not slot_taken()
    with training_slot():
        assert slot_taken()
        code = cli_main(["train", "--base", "tiny", "--data", str(write_pairs(tmp_path / "pairs")), "--output", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code != 0 and "已有训练任务在运行" in captured.err + captured.out and "already training" in captured.err + captured.out
    assert not (tmp_path / "run" / "loss.jsonl").exists()
    assert not slot_taken()
