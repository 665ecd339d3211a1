"""A wheel that stands alone: built from the checkout, installed into a fresh environment, run
from an empty folder, it lists the four shipped domains and draws with the demo model offline.

The fresh environment is a new venv (no pip, nothing installed) holding only the wheel; the heavy
dependencies (torch, diffusers, ...) come from this test's own environment through a ``.pth`` line.
A ``.pth`` line adds a folder to the path without running that folder's own ``.pth`` files, so the
editable install of the checkout that the development venv has is never activated: the package
can only come from the wheel, and the test checks that it does.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from helpers import REPO_ROOT

pytestmark = pytest.mark.slow

SHIPPED_DOMAINS = ["demo", "ecommerce", "food", "guohua"]


def tracked_files() -> list[str]:
    """What a fresh clone has: tracked files plus new ones git does not ignore (no build leftovers)."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name and (REPO_ROOT / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline (no build isolation: the build backend is the one installed) from a copy of the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, source / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-index", "--no-build-isolation", "-q", "-w", str(root / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    [built] = (root / "dist").glob("rapid_diffusion-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed; returns its folder."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "dependencies-of-the-test-env.pth").write_text("\n".join(site.getsitepackages()) + "\n", encoding="utf-8")
    return venv


def run_installed(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RAPID_DIFFUSION_DOMAINS")}
    env.update(HF_HUB_OFFLINE="1", RAPID_DIFFUSION_HOME=str(cwd / "home"))
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_wheel_ships_the_data_and_no_dev_tools_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"rapid_diffusion", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    assert not any(name.startswith(("rapid_diffusion_dev/", "tests/")) for name in names)
    for shipped in ("rapid_diffusion/data/domains/demo.yaml", "rapid_diffusion/data/assets/demo-model/unet/diffusion_pytorch_model.safetensors",
                    "rapid_diffusion/data/assets/demo-sr.safetensors", "rapid_diffusion/data/assets/demo-kg/triples.tsv"):
        assert shipped in names
    assert sorted(Path(n).stem for n in names if n.startswith("rapid_diffusion/data/domains/")) == SHIPPED_DOMAINS


def test_the_installed_wheel_runs_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    python, command = str(installed / "bin" / "python"), str(installed / "bin" / "rapid-diffusion")

    where = run_installed(installed, empty, python, "-c", "import importlib.util as u, rapid_diffusion; "
                          "print(rapid_diffusion.__file__); print(u.find_spec('rapid_diffusion_dev'))")
    assert where.returncode == 0, where.stderr
    package_file, dev_spec = where.stdout.split()
    assert Path(package_file).is_relative_to(installed) and dev_spec == "None"

    listed = run_installed(installed, empty, command, "domains")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == SHIPPED_DOMAINS

    # The demo domain as shipped (its YAML finds the model beside it, inside the installed package),
    # through the service every face calls; level "none" because the domain's "auto" would spend most
    # of a minute converting for OpenVINO here (the CLI's `generate --domain demo` is tested in
    # test_demo_model on the checkout).
    drawn = run_installed(installed, empty, python, "-c", GENERATE_DEMO)
    assert drawn.returncode == 0, drawn.stderr
    model_dir, png_name = drawn.stdout.split()
    assert Path(model_dir).is_relative_to(installed)
    image = Image.open(empty / png_name)
    assert image.size == (64, 64) and any(low < high for low, high in image.getextrema())  # a picture, not a flat field
    assert {p.name for p in empty.iterdir()} <= {"home", png_name}  # nothing written beside them


GENERATE_DEMO = """
from pathlib import Path
from rapid_diffusion.service.app import AppService
from rapid_diffusion.service.inputs import request_from_inputs

service = AppService()
request = request_from_inputs("左边有一个大的红色圆形", num_inference_steps=4, seed=0)
result = service.generate(request, "demo", optimization="none")
name = result.file_stem(0) + ".png"
Path(name).write_bytes(result.png_bytes(0))
print(service.spec("demo").model.path, name)
"""
