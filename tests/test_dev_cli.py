"""The product CLI's one plugin boundary: ``rapid-diffusion dev ...`` exists only where
``rapid_diffusion_dev`` is importable (a source checkout), and the product works without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT
from rapid_diffusion.paths import DEMO_SR_WEIGHTS

PRODUCT_COMMANDS = ("domains", "generate", "predict", "upscale", "kg", "serve", "hash-password", "check-data", "train", "eval", "import")
DEV_ONLY_COMMANDS = ("bench", "train-demo", "train-sr")


def run(*args: str, cwd=REPO_ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if env is None else env
    return subprocess.run([sys.executable, "-m", "rapid_diffusion", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def listed_commands(help_text: str) -> set[str]:
    """The subcommands named in argparse's ``{a,b,c}`` usage line."""
    choices = help_text[help_text.index("{") + 1 : help_text.index("}")]
    return set(choices.split(","))


def test_a_checkout_lists_the_product_commands_and_dev():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert listed_commands(done.stdout) == {*PRODUCT_COMMANDS, "dev"}

    done = run("dev", "--help")
    assert done.returncode == 0, done.stderr
    assert listed_commands(done.stdout) == {*DEV_ONLY_COMMANDS, "kg"}

    done = run("dev", "bench", "--help")
    assert done.returncode == 0, done.stderr
    assert "--levels" in done.stdout and "--concurrency" in done.stdout


def test_without_the_dev_package_the_product_has_no_dev_group(tmp_path):
    """An installed product (no rapid_diffusion_dev on the path) lists only its own commands and runs them."""
    (tmp_path / "rapid_diffusion").symlink_to(REPO_ROOT / "rapid_diffusion", target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('rapid_diffusion_dev'))"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert probe.stdout.strip() == "None", "the dev package must not be importable for this test"

    done = run("--help", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert listed_commands(done.stdout) == set(PRODUCT_COMMANDS)

    done = run("dev", "bench", cwd=tmp_path, env=env)
    assert done.returncode == 2 and "invalid choice: 'dev'" in done.stderr

    done = run("domains", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "demo" in {line.split("\t")[0] for line in done.stdout.splitlines()}


def test_a_dev_command_reports_a_bad_argument_like_a_product_command(tmp_path):
    done = run("dev", "kg", "demo-finetune", "--out", str(tmp_path / "out"), "--base", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'missing'} is not a pipeline folder; train the demo model first (rapid-diffusion dev train-demo)"


def test_the_sr_benchmark_times_the_given_weights(tmp_path):
    """``python -m rapid_diffusion_dev.bench.sr`` (the paper's SR timing) on the demo's SR weights, tiny input."""
    out = tmp_path / "sr.json"
    command = [sys.executable, "-m", "rapid_diffusion_dev.bench.sr", "--device", "cpu", "--size", "16", "--runs", "1",
               "--weights", str(DEMO_SR_WEIGHTS), "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(out.read_text(encoding="utf-8"))
    assert (record["method"], record["input"], record["output"], record["runs"]) == ("esrgan", "16x16", "64x64", 1)
    assert record["model"].startswith("SRVGGNetCompact") and record["mean_s"] > 0
