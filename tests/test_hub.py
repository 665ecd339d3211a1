"""Hub snapshots: a half-downloaded snapshot is never "cached"; online it is completed from
the repo's file list, offline it is "incomplete" with a clear message. The HF cache is a
fake one in a temp HF_HOME, in the hub library's layout (refs, blobs, snapshot links); the
hub API and downloads are monkeypatched, so nothing touches the network."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rapid_diffusion.domains import load_domains
from rapid_diffusion.models.hub import IncompleteSnapshotError, cached_snapshot, download_snapshot, find_cached_snapshot
from rapid_diffusion.models.registry import ModelRegistry, ModelUnavailableError
from rapid_diffusion.paths import SHIPPED_DOMAINS_DIR

SHA = "0123456789abcdef0123456789abcdef01234567"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture()
def food(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return load_domains([SHIPPED_DOMAINS_DIR])["food"]


def repo_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf" / "hub" / "models--alibaba-pai--pai-diffusion-food-large-zh"


def model_files(model_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file())


def cache_file(repo: Path, model_dir: Path, name: str) -> None:
    """Store one file as the hub does: a blob named by its hash, linked from the snapshot."""
    data = (model_dir / name).read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / SHA / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(Path("../" * name.count("/")) / ".." / ".." / "blobs" / blob.name)


@pytest.fixture()
def snapshot(tmp_path, tiny_model_dir, food) -> Path:
    """A complete cached snapshot of the food repo (the tiny model's files)."""
    repo = repo_dir(tmp_path)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA, encoding="utf-8")
    for name in model_files(tiny_model_dir):
        cache_file(repo, tiny_model_dir, name)
    return repo / "snapshots" / SHA


def registry_for(spec) -> ModelRegistry:
    return ModelRegistry(domains={spec.id: spec}, device=torch.device("cpu"), dtype=torch.float32)


def test_complete_snapshot_is_cached_and_loads_offline(snapshot, food):
    assert cached_snapshot(food.model).state == "cached"
    assert find_cached_snapshot(food.model) == snapshot
    registry = registry_for(food)
    assert registry.state(food) == "cached"
    assert registry.get(food).pipe.unet is not None


@pytest.mark.parametrize(
    "name, how",
    [
        (UNET_WEIGHTS, "link removed"),
        (UNET_WEIGHTS, "blob unfinished"),
        ("text_encoder/config.json", "link removed"),
        ("tokenizer", "folder removed"),
        ("scheduler/scheduler_config.json", "link removed"),
        ("model_index.json", "link removed"),
    ],
)
def test_half_downloaded_snapshot_is_incomplete_offline(snapshot, food, name, how):
    link = snapshot / name
    if how == "blob unfinished":  # the hub renames blob.incomplete only when the download ends
        blob = link.resolve()
        blob.rename(blob.with_name(blob.name + ".incomplete"))
    elif how == "folder removed":
        shutil.rmtree(link)
    else:
        link.unlink()
    state = cached_snapshot(food.model)
    assert state.state == "incomplete"
    assert any(m.split("/")[0] == name.split("/")[0] for m in state.missing)
    assert find_cached_snapshot(food.model) is None
    registry = registry_for(food)
    assert registry.state(food) == "incomplete"
    with pytest.raises(ModelUnavailableError) as info:
        registry.get(food)
    message = str(info.value)
    assert "不完整" in message and "incomplete" in message and name.split("/")[0] in message


def test_no_snapshot_needs_download(food):
    assert cached_snapshot(food.model).state == "needs-download"
    assert registry_for(food).state(food) == "needs-download"


class FakeHub:
    """The repo's listing (the tiny model plus files a pipeline does not need) and a download
    that writes blobs and links like the hub library."""

    def __init__(self, tmp_path: Path, model_dir: Path, reachable: bool = True, delivers: bool = True):
        self.repo, self.model_dir = repo_dir(tmp_path), model_dir
        self.reachable, self.delivers = reachable, delivers
        self.downloads: list[tuple[str, bool]] = []

    def model_info(self, repo_id, revision=None, files_metadata=False):
        if not self.reachable:
            raise OSError("connection refused")
        assert files_metadata and revision == "main"
        siblings = [SimpleNamespace(rfilename=n, size=(self.model_dir / n).stat().st_size) for n in model_files(self.model_dir)]
        siblings += [SimpleNamespace(rfilename="README.md", size=10), SimpleNamespace(rfilename="safety_checker/pytorch_model.bin", size=10**9)]
        return SimpleNamespace(sha=SHA, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, revision=None, cache_dir=None, force_download=False, tqdm_class=None):
        assert Path(cache_dir) == self.repo.parent and revision == "main"
        self.downloads.append((filename, force_download))
        if self.delivers:
            cache_file(self.repo, self.model_dir, filename)
            (self.repo / "refs").mkdir(exist_ok=True)
            (self.repo / "refs" / "main").write_text(SHA, encoding="utf-8")
        return str(self.repo / "snapshots" / SHA / filename)


@pytest.fixture()
def online(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def install(hub: FakeHub) -> FakeHub:
        monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
        return hub

    return install


def test_online_a_missing_weight_is_downloaded_again_and_nothing_else(snapshot, food, online, tmp_path, tiny_model_dir):
    (snapshot / UNET_WEIGHTS).unlink()
    hub = online(FakeHub(tmp_path, tiny_model_dir))
    registry = registry_for(food)
    assert registry.resolve_folder(food) == snapshot
    assert hub.downloads == [(UNET_WEIGHTS, False)]
    assert registry.state(food) == "cached"


def test_online_a_file_of_the_wrong_size_is_forced_again(snapshot, food, online, tmp_path, tiny_model_dir):
    weights = "text_encoder/model.safetensors"
    assert weights in model_files(tiny_model_dir)
    blob = (snapshot / weights).resolve()
    blob.write_bytes(blob.read_bytes()[:100])
    hub = online(FakeHub(tmp_path, tiny_model_dir))
    assert download_snapshot(food.model) == snapshot
    assert hub.downloads == [(weights, True)]
    assert (snapshot / weights).stat().st_size == (tiny_model_dir / weights).stat().st_size


def test_online_with_nothing_cached_downloads_only_pipeline_files(food, online, tmp_path, tiny_model_dir):
    hub = online(FakeHub(tmp_path, tiny_model_dir))
    messages = []
    folder = download_snapshot(food.model, progress=messages.append)
    assert sorted(name for name, _ in hub.downloads) == model_files(tiny_model_dir)
    assert cached_snapshot(food.model).folder == folder and cached_snapshot(food.model).state == "cached"
    assert any(UNET_WEIGHTS in m for m in messages)


def test_online_a_download_that_does_not_complete_is_an_error(snapshot, food, online, tmp_path, tiny_model_dir):
    (snapshot / UNET_WEIGHTS).unlink()
    online(FakeHub(tmp_path, tiny_model_dir, delivers=False))
    with pytest.raises(IncompleteSnapshotError, match=UNET_WEIGHTS):
        download_snapshot(food.model)
    with pytest.raises(ModelUnavailableError, match="incomplete"):
        registry_for(food).resolve_folder(food)


@pytest.mark.parametrize("complete", [True, False])
def test_hub_unreachable_falls_back_to_a_complete_cache_only(snapshot, food, online, tmp_path, tiny_model_dir, complete, caplog):
    if not complete:
        shutil.rmtree(snapshot / "vae")
    online(FakeHub(tmp_path, tiny_model_dir, reachable=False))
    registry = registry_for(food)
    if complete:
        assert registry.resolve_folder(food) == snapshot
        return
    with pytest.raises(ModelUnavailableError) as info, caplog.at_level("WARNING"):
        registry.resolve_folder(food)
    assert "vae/" in str(info.value) and str(info.value).startswith("模型 ")
    assert "connection refused" not in str(info.value), "why the hub failed is the log's business, not the user's"
    assert "connection refused" in caplog.text
