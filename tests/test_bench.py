"""The benchmark runs plain diffusers and the optimisation levels and writes a complete JSON."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rapid_diffusion.serving.cli import main
from rapid_diffusion_dev.bench.speed import BenchConfig, load_bench_model, markdown_table, rss_peak_mb, unet_profile

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
    argv = ["dev", "bench", "--model", "tiny-random", "--steps", "2", "--runs", "1", "--levels", "none,flash", "--threads", "1"]
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
    medians = {level: entry["end_to_end_s"]["median"] for level, entry in result["levels"].items()}
    assert result["best_level"] == min(medians, key=medians.get)
    assert result["speedup"] == pytest.approx(medians["none"] / medians[result["best_level"]])
    assert result["levels"]["flash"]["speedup"] == pytest.approx(medians["none"] / medians["flash"])
    assert set(result["attention_padding"]) == {"40", "80", "160"}
    printed = capsys.readouterr().out
    assert "| none | none |" in printed and "speedup" in printed


def test_bench_sr_adds_a_timed_x4_stage(tmp_path, capsys, restore_threads):
    from rapid_diffusion.upscaling.esrgan import DEMO_SR_WEIGHTS

    out = tmp_path / "bench.json"
    argv = ["dev", "bench", "--model", "tiny-random", "--steps", "2", "--runs", "1", "--levels", "none", "--threads", "1"]
    assert main(argv + ["--sr", str(DEMO_SR_WEIGHTS), "--json", str(out)]) == 0
    plain = json.loads(out.read_text(encoding="utf-8"))["levels"]["none"]
    assert plain["stages_s"]["super_resolution"]["median"] > 0


def test_bench_cli_rejects_unknown_level(capsys):
    assert main(["dev", "bench", "--model", "tiny-random", "--levels", "none,warp"]) == 2
    assert "unknown warp" in capsys.readouterr().err


def test_bench_default_levels_include_openvino_when_installed():
    import argparse

    from rapid_diffusion.speed.openvino import openvino_missing
    from rapid_diffusion_dev.cli import bench_levels

    args = argparse.Namespace(levels=None, shapes=False, restart=False, concurrency=None, api=False, load=None, device="cpu")
    expected = ("none", "flash", "compile", "openvino", "auto") if openvino_missing("cpu") is None else ("none", "flash", "compile", "auto")
    assert bench_levels(args) == expected


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
        "setup_s": 12.34,
    }
    table = markdown_table({"levels": {"none": entry, "flash": entry}})
    assert table.count("\n") == 3
    assert "| flash | flash | 12.3 | 0.500 (0.400-0.600)" in table and "1.25x" in table


def test_rss_peak_follows_an_allocation():
    import numpy as np

    before = rss_peak_mb()
    block = np.ones(200 * 2**20 // 8)  # 200 MB, written so that it is resident
    assert rss_peak_mb() >= before + 150
    del block


def test_shapes_reports_first_and_steady_per_shape(restore_threads):
    from rapid_diffusion_dev.bench.speed import run_shapes, shapes_table

    config = BenchConfig(model="tiny-random", steps=1, runs=2, levels=("none",))
    result = run_shapes(config, log=lambda message: None, max_images=2, sizes=((64, 64),))
    rows = result["levels"]["none"]["shapes"]
    assert [(r["images"], r["height"]) for r in rows] == [(1, 64), (2, 64)]
    for row in rows:
        assert len(row["steady_s"]["runs"]) == 2
        assert row["first_over_steady"] == pytest.approx(row["first_s"] / row["steady_s"]["median"])
    assert result["levels"]["none"]["worst_first_over_steady"] == max(r["first_over_steady"] for r in rows)
    assert shapes_table(result).count("| none (none) |") == 2


def test_concurrency_runs_through_the_service_with_batching_off_and_on(test_domains):
    from rapid_diffusion_dev.bench.serving import concurrency_table, run_concurrency

    result = run_concurrency("tiny", "none", clients=2, per_client=2, log=lambda message: None)
    assert list(result["modes"]) == ["batching off", "batching 30 ms"]
    for entry in result["modes"].values():
        assert entry["latency_s"]["n"] == 4
        assert entry["images_per_s"] == pytest.approx(4 / entry["wall_s"])
        assert entry["latency_s"]["p50"] <= entry["latency_s"]["p95"]
    assert concurrency_table(result).count("\n") == 3


@pytest.mark.slow
def test_restart_reads_the_cache_the_cold_process_left(restore_threads):
    """Two fresh processes: the first converts (cold), the second reads its cache (warm)."""
    from rapid_diffusion_dev.bench.speed import restart_table, run_restart

    result = run_restart(BenchConfig(model="tiny-random", runs=1, levels=("openvino",)), log=lambda message: None, threads=1)
    entry = result["levels"]["openvino"]
    assert [r["applied"] for r in entry["cold"] + entry["warm"]] == ["openvino", "openvino"]
    # The cold process converted; the warm one read what the cold one left (OpenVINO's own log line).
    assert [r["read_cache"] for r in entry["cold"] + entry["warm"]] == [False, True]
    assert entry["warm_over_cold"] == pytest.approx(entry["warm_setup_s"] / entry["cold_setup_s"])
    assert "| openvino | openvino |" in restart_table(result)


def test_a_nan_image_is_an_infinite_difference():
    import numpy as np

    from rapid_diffusion_dev.bench.speed import max_abs_diff

    reference = np.zeros((1, 2, 2, 3))
    assert max_abs_diff(np.full_like(reference, np.nan), reference) == float("inf")
    assert max_abs_diff(reference + 0.25, reference) == 0.25


class StubServer:
    """A JSON API stand-in on loopback: the first ``capacity`` requests of a burst wait at a barrier
    and answer 200 together; the rest answer 503 at once. Records each body it was sent."""

    def __init__(self, capacity: int):
        import http.server
        import threading

        self.bodies: list[dict] = []
        self.admitted = threading.Semaphore(capacity)
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                status = 200 if stub.admitted.acquire(blocking=False) else 503
                payload = json.dumps({"images_base64": ["x"] * body.get("num_images", 1)} if status == 200 else {"error": "busy"})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_burst_counts_served_and_refused_answers_apart():
    from rapid_diffusion_dev.bench.serving import burst, load_table

    with StubServer(capacity=5) as stub:
        row = burst(stub.base, "demo", 12)
    assert (row["served"], row["refused"], row["other"]) == (5, 7, 0)
    assert row["served_s"]["n"] == 5 and row["refused_s"]["n"] == 7
    assert sorted(body["seed"] for body in stub.bodies) == list(range(12)), "one request per client, each its own seed"
    table = load_table({"rows": [{"clients": 12, **row}]})
    assert table.splitlines()[2].startswith("| 12 | 5 | 7 | 0 |")


def test_image_counts_send_each_count_first_then_the_steady_runs():
    from rapid_diffusion_dev.bench.serving import image_counts

    with StubServer(capacity=100) as stub:
        rows = image_counts(stub.base, "demo", runs=3)
    assert [row["images"] for row in rows] == [1, 2, 3, 4]
    assert [body["num_images"] for body in stub.bodies] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    for row in rows:
        assert row["first_over_steady"] == pytest.approx(row["first_s"] / row["steady_s"])


@pytest.mark.slow
def test_one_at_a_time_runs_each_level_in_its_own_process_and_reports_its_peak(tmp_path):
    """The CLI as a user runs it: plain, OpenVINO and int8 in three processes, one JSON."""
    import subprocess
    import sys

    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    out = tmp_path / "one.json"
    command = [sys.executable, "-m", "rapid_diffusion", "dev", "bench", "--model", "tiny-random", "--levels", "none,openvino,openvino-int8",
               "--steps", "2", "--runs", "1", "--threads", "1", "--max-images", "2", "--one-at-a-time", "--json", str(out)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "RAPID_DIFFUSION_HOME": str(tmp_path / "home")})
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads(out.read_text())
    levels = result["levels"]
    assert result["one_at_a_time"] and list(levels) == ["none", "openvino", "openvino-int8"]
    assert [levels[name]["applied"] for name in levels] == ["none", "openvino", "openvino-int8"]
    for entry in levels.values():
        assert entry["peak_memory_mb"] >= entry["memory_before_mb"] > 100, entry  # a whole process: torch alone is more
        assert len(entry["end_to_end_s"]["runs"]) == 1
    assert levels["none"]["max_abs_diff_vs_plain"] == 0 and levels["openvino"]["max_abs_diff_vs_plain"] < 1 / 255
    assert 0 < levels["openvino-int8"]["max_abs_diff_vs_plain"] < 0.5
    assert levels["openvino"]["setup_s"] > 0 and levels["none"]["setup_s"] < levels["openvino"]["setup_s"]
    assert "| openvino-int8 | openvino-int8 |" in finished.stdout
