"""What hosting needs from the repository itself: the port a Space assigns, one declaration of
dependencies (pyproject.toml) that requirements.txt follows, and every binary file routed to LFS."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from rapid_diffusion.serving.server import default_port
from rapid_diffusion.settings import Settings


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 7860),
        ({"PORT": "8080"}, 8080),
        ({"GRADIO_SERVER_PORT": "7861"}, 7861),
        ({"PORT": "8080", "GRADIO_SERVER_PORT": "7861"}, 7861),  # Gradio's own variable wins over a generic one
    ],
)
def test_gradio_server_port_wins_over_port(monkeypatch, env, expected):
    for name in ("PORT", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_port() == expected


def test_port_out_of_range_stops_the_start(monkeypatch):
    monkeypatch.delenv("PORT", raising=False)
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT"):
        Settings(_env_file=None, **{"GRADIO_SERVER_PORT": "70000"})


# ----------------------------------------------------------------------------- dependencies

REPO = Path(__file__).resolve().parent.parent
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Extras CI does not install: CUDA-only builds (flash-attn compiles against CUDA; bitsandbytes' 8-bit
# AdamW is used only on CUDA), so constraints.txt, made on a CPU machine, has no pin for them.
CUDA_ONLY_EXTRAS = ("flash", "adam8bit")


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}."""
    found = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def declared(*extras: str) -> list[Requirement]:
    """The runtime requirements plus the named extras', in pyproject's order (self-references expanded)."""
    project = pyproject()["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        for text in project["optional-dependencies"][extra]:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) == canonicalize_name(project["name"]):
                requirements += declared(*requirement.extras)[len(project["dependencies"]):]
            else:
                requirements.append(requirement)
    return requirements


SPACE_FILES = {
    # file: (extras, CPU torch index?, what it is for)
    "requirements.txt": (("openvino",), True,
                         "a CPU Space (the default hardware): torch's CPU build and OpenVINO, the CPU fast path"),
    "requirements-zerogpu.txt": ((), False,
                                 "a ZeroGPU Space: torch's CUDA build from PyPI; the platform installs `spaces` itself"),
}


def expected_space_file(name: str) -> str:
    extras, cpu_index, purpose = SPACE_FILES[name]
    versions = pins()
    lines = [
        f"# {name}: {purpose}.",
        "# Generated from pyproject.toml (dependencies" + "".join(f" + [{e}]" for e in extras) + ") at constraints.txt's",
        "# versions; tests/test_hosting.py fails when it drifts. Rewrite: python tests/test_hosting.py --write",
    ]
    if cpu_index:
        lines += [
            "# The CPU index offers torch==X+cpu, which pip prefers to PyPI's X (a later local version):",
            "# about 190 MB instead of the CUDA build and its multi-GB CUDA libraries.",
            f"--extra-index-url {CPU_TORCH_INDEX}",
        ]
    lines += [f"{req.name}=={versions[canonicalize_name(req.name)]}" for req in declared(*extras)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(SPACE_FILES))
def test_space_requirements_follow_pyproject(name):
    """Each Space file is exactly what pyproject.toml + constraints.txt give (so it cannot drift)."""
    assert (REPO / name).read_text(encoding="utf-8") == expected_space_file(name), (
        f"{name} is out of step with pyproject.toml / constraints.txt: run python tests/test_hosting.py --write")


def test_constraints_pin_every_declared_requirement_within_its_range():
    project = pyproject()["project"]
    extras = [e for e in project["optional-dependencies"] if e not in CUDA_ONLY_EXTRAS]
    versions = pins()
    for requirement in declared(*extras):
        version = versions.get(canonicalize_name(requirement.name))
        assert version is not None, f"constraints.txt has no pin for {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name}=={version} is outside {requirement.specifier}"


def test_the_space_runs_the_gradio_it_was_tested_with():
    """The README front matter's sdk_version (what Spaces installs for the Gradio SDK) is constraints.txt's gradio."""
    front_matter = (REPO / "README.md").read_text(encoding="utf-8").split("---")[1]
    assert f"sdk_version: {pins()['gradio']}" in front_matter.splitlines()


def test_bitsandbytes_is_declared_and_never_assumed():
    """8-bit AdamW needs bitsandbytes (the adam8bit extra); without it, or without CUDA, training uses torch's AdamW."""
    import torch

    from rapid_diffusion.training.options import TrainConfig
    from rapid_diffusion.training.train import make_optimizer

    assert any(Requirement(r).name == "bitsandbytes" for r in pyproject()["project"]["optional-dependencies"]["adam8bit"])
    config = TrainConfig(base="demo", data=Path("unused"), output=Path("unused"))
    assert config.use_8bit_adam  # the default asks for it where possible ...
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW  # ... and a CPU host gets the plain optimizer


def write_space_files() -> None:
    for name in SPACE_FILES:
        (REPO / name).write_text(expected_space_file(name), encoding="utf-8")
        print(f"wrote {name}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_hosting.py --write   (rewrites the Space requirement files)")
    write_space_files()


# ----------------------------------------------------------------------------- pushable to a Space

LFS_SIZE_LIMIT = 10 * 2**20  # the Hub refuses larger files that are not stored with LFS/Xet


def repository_files() -> list[str]:
    """Tracked files and new ones git does not ignore: what the next commit would hold."""
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in listing.stdout.decode().split("\0") if name and (REPO / name).is_file()]


def is_binary(path: Path) -> bool:
    """By content, as git judges it (a NUL byte in the first 8000 bytes), or any byte that is not UTF-8."""
    data = path.read_bytes()
    if b"\0" in data[:8000]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def lfs_routed(names: list[str]) -> dict[str, bool]:
    """``git check-attr filter`` for every name: True where the filter is lfs."""
    done = subprocess.run(["git", "check-attr", "--stdin", "-z", "filter"], cwd=REPO, input="\0".join(names).encode(),
                          capture_output=True, check=True)
    fields = done.stdout.decode().split("\0")
    return {fields[i]: fields[i + 2] == "lfs" for i in range(0, len(fields) - 2, 3)}


def test_every_binary_and_every_large_file_goes_to_lfs():
    names = repository_files()
    needs_lfs = [n for n in names if is_binary(REPO / n) or (REPO / n).stat().st_size > LFS_SIZE_LIMIT]
    assert "rapid_diffusion/data/assets/demo-model/unet/diffusion_pytorch_model.safetensors" in needs_lfs  # the check sees them
    routed = lfs_routed(needs_lfs)
    assert sorted(n for n in needs_lfs if not routed[n]) == [], "add a filter=lfs rule for these to .gitattributes"


def test_the_lfs_check_catches_an_unrouted_binary_and_leaves_text_alone(tmp_path):
    """The negative control: a binary with an unknown extension is found and is not routed."""
    odd = tmp_path / "weights.unknownext"
    odd.write_bytes(b"\x89\x00\x01binary")
    text = tmp_path / "notes.md"
    text.write_text("中文 text", encoding="utf-8")
    assert is_binary(odd) and not is_binary(text)
    routed = lfs_routed(["rapid_diffusion/data/weights.unknownext", "docs/new.png", "docs/new.md"])
    assert routed == {"rapid_diffusion/data/weights.unknownext": False, "docs/new.png": True, "docs/new.md": False}
