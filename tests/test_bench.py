"""The benchmark runs plain diffusers and the optimisation levels and writes a complete JSON."""

from __future__ import annotations

import json

import pytest
import torch

from rapid_diffusion.bench import BenchConfig, load_bench_model, markdown_table, rss_peak_mb, unet_profile
from rapid_diffusion.cli import main

LEVEL_KEYS = {
    "requested",
    "applied",
    "setup_s",
    "end_to_end_s",
    "stages_s",
    "unet_it_s",
    "peak_memory_mb",
    "memory_before_mb",
    "profile",
    "max_abs_diff_vs_plain",
    "speedup",
}


@pytest.fixture()
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_cli_writes_json_with_speedup(tmp_path, capsys, restore_threads):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny-random", "--steps", "2", "--runs", "1", "--levels", "none,flash", "--threads", "1"]
    argv += ["--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"date", "machine", "model", "device", "levels", "best_level", "speedup"} <= set(result)
    assert result["model"] == "tiny-random" and result["device"] == "cpu"
    assert (result["height"], result["width"]) == (64, 64)
    assert list(result["levels"]) == ["none", "flash"]
    for entry in result["levels"].values():
        assert set(entry) == LEVEL_KEYS
        assert {"text_encoder", "unet", "vae_decode", "total"} <= set(entry["stages_s"])
        assert entry["end_to_end_s"]["median"] > 0 and entry["unet_it_s"] > 0
        assert entry["peak_memory_mb"] > 0
        assert entry["max_abs_diff_vs_plain"] < 1e-4
        assert set(entry["profile"]["seconds"]) == {"attention", "resnet", "other"}
    assert result["levels"]["flash"]["applied"] == "flash"
    assert result["speedup"] > 0
    assert set(result["attention_padding"]) == {"40", "80", "160"}
    printed = capsys.readouterr().out
    assert "| none | none |" in printed and "speedup" in printed


def test_bench_sr_adds_a_timed_x4_stage(tmp_path, capsys, restore_threads):
    from rapid_diffusion.upscale import DEMO_SR_WEIGHTS

    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny-random", "--steps", "2", "--runs", "1", "--levels", "none", "--threads", "1"]
    assert main(argv + ["--sr", str(DEMO_SR_WEIGHTS), "--json", str(out)]) == 0
    plain = json.loads(out.read_text(encoding="utf-8"))["levels"]["none"]
    assert plain["stages_s"]["super_resolution"]["median"] > 0


def test_bench_cli_rejects_unknown_level(capsys):
    assert main(["bench", "--model", "tiny-random", "--levels", "none,warp"]) == 2
    assert "unknown warp" in capsys.readouterr().err


def test_pipeline_folder_model_and_unet_profile(tiny_model_dir):
    model = load_bench_model(str(tiny_model_dir), log=lambda message: None)
    profile = unet_profile(model.pipe, BenchConfig(steps=2), 64, 64, torch.device("cpu"))
    assert profile["unet_s"] > 0
    assert profile["seconds"]["attention"] > 0 and profile["seconds"]["resnet"] > 0
    assert sum(profile["share"].values()) == pytest.approx(1.0)


def test_markdown_table_has_one_row_per_level():
    stages = {name: {"median": 0.1, "min": 0.1, "max": 0.2, "runs": [0.1]} for name in ("text_encoder", "unet", "vae_decode")}
    entry = {
        "applied": "flash",
        "end_to_end_s": {"median": 0.5, "min": 0.4, "max": 0.6, "runs": [0.5]},
        "stages_s": stages,
        "unet_it_s": 20.0,
        "peak_memory_mb": 300.0,
        "max_abs_diff_vs_plain": 0.0,
        "speedup": 1.25,
    }
    table = markdown_table({"levels": {"none": entry, "flash": entry}})
    assert table.count("\n") == 3
    assert "| flash | flash | 0.500 (0.400-0.600)" in table and "1.25x" in table


def test_rss_peak_is_measured():
    assert rss_peak_mb() > 10
