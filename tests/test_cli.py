import base64
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rapid_diffusion.serving.cli import main
from rapid_diffusion.generation.pipeline import read_png_settings


def cli(*args, env_extra=None):
    """Run the real console entry in a subprocess, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "rapid_diffusion", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_domains_lists_ids_first():
    out = cli("domains")
    assert out.returncode == 0, out.stderr
    ids = [line.split("\t")[0] for line in out.stdout.splitlines()]
    assert {"ecommerce", "guohua", "food"} <= set(ids)


@pytest.fixture(scope="module")
def unseen_model(tmp_path_factory):
    """A diffusers folder with the PAI classes that no domain YAML mentions."""
    from rapid_diffusion.models.factory import build_pipeline

    folder = tmp_path_factory.mktemp("never-seen")
    build_pipeline(folder, size="tiny", seed=123)
    return folder


@pytest.mark.slow
def test_generate_with_model_folder_is_deterministic(unseen_model, tmp_path):
    args = ["generate", "--model", str(unseen_model), "--prompt", "一只猫", "--steps", "3", "--num-images", "2"]
    first = cli(*args, "--seed", "42", "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    paths = first.stdout.split()
    assert [os.path.basename(p).split("-")[:4] for p in paths] == [["custom", str(s), "pndm", "3steps"] for s in (42, 43)]
    again = cli(*args, "--seed", "42", "--out", str(tmp_path / "b"))
    other = cli(*args, "--seed", "7", "--out", str(tmp_path / "c"))
    a, b, c = (np.asarray(Image.open(next((tmp_path / d).glob(f"custom-{s}-*.png")))) for d, s in (("a", 42), ("b", 42), ("c", 7)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert read_png_settings(paths[1])["seed"] == 43
    assert Image.open(paths[0]).size == (64, 64)  # the model's native size, read from its config


def test_generate_reports_bad_input_in_one_line(unseen_model, tmp_path):
    out = cli("generate", "--model", str(unseen_model), "--prompt", "猫", "--steps", "0", "--out", str(tmp_path))
    assert out.returncode == 2
    assert "Invalid --steps: must be between 1 and 150" in out.stderr and "Traceback" not in out.stderr


def test_generate_offline_unknown_hub_model_is_clear(tmp_path):
    out = cli("generate", "--domain", "food", "--prompt", "面条", "--out", str(tmp_path), env_extra={"HF_HUB_CACHE": str(tmp_path)})
    assert out.returncode == 2
    assert "food" in out.stderr and "Traceback" not in out.stderr


def test_predict_round_trips_easynlp_tsv(test_domains, tmp_path, capsys):
    rows = ["1\t一个红色的圆形", "bad row without a tab", "2\t" + "   ", "3\t蓝色正方形", ""]
    source = tmp_path / "in.tsv"
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")
    target = tmp_path / "out.tsv"
    status = main(["predict", "--domain", "tiny", "--input", str(source), "--output", str(target), "--num-images", "2", "--seed", "5"])
    err = capsys.readouterr().err
    assert status == 0
    assert "row 2" in err and "row 3" in err  # the malformed row and the empty prompt, by number
    out_rows = [line.split("\t") for line in target.read_text(encoding="utf-8").splitlines()]
    assert [(r[0], r[1]) for r in out_rows] == [("1", "一个红色的圆形")] * 2 + [("3", "蓝色正方形")] * 2
    images = [Image.open(io.BytesIO(base64.b64decode(r[2]))) for r in out_rows]
    assert all(im.format == "PNG" and im.size == (64, 64) for im in images)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
