"""The standard FID Inception weights: found in the torch hub cache, else downloaded once, always sha256-checked.

pytorch-fid publishes the weights ported from TensorFlow's FID graph as one file. It is cached where
pytorch-fid itself caches it (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch``), so an
existing download is reused; torch-fidelity's copy of the same bytes is accepted too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..messages import say
from ..settings import settings

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# torch-fidelity (and torchmetrics through it) caches the same file under this name.
OTHER_CACHED_NAMES = ("weights-inception-2015-12-05-6726825d.pth",)


class WeightsUnavailable(RuntimeError):
    """A metric's weights cannot be had; the message (Chinese / English) says which file and how to get it."""


def weights_dir() -> Path:
    """torch hub's checkpoint folder, where pytorch-fid keeps this file."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified(path: Path, sha256: str = FID_WEIGHTS_SHA256) -> Path:
    actual = sha256_of(path)
    if actual != sha256:
        raise WeightsUnavailable(say("fid_weights_mismatch", path=path, actual=actual, expected=sha256))
    return path


def fid_weights_file(explicit: Path | None = None, url: str = FID_WEIGHTS_URL, sha256: str = FID_WEIGHTS_SHA256) -> Path:
    """The verified weights file: ``explicit``, else a cached copy, else a download (refused offline)."""
    if explicit is not None:
        if not explicit.is_file():
            raise WeightsUnavailable(say("fid_weights_not_found", path=explicit))
        return verified(explicit, sha256)
    folder = weights_dir()
    for name in (FID_WEIGHTS_FILE, *OTHER_CACHED_NAMES):
        if (folder / name).is_file():
            return verified(folder / name, sha256)
    where = {"file": FID_WEIGHTS_FILE, "url": url, "sha256": sha256, "folder": folder}
    if settings().hub_offline:
        raise WeightsUnavailable(say("fid_weights_offline", **where))
    return _download(url, folder / FID_WEIGHTS_FILE, sha256, where)


def _download(url: str, target: Path, sha256: str, where: dict) -> Path:
    """torch hub's downloader: a temporary file, checked against ``sha256``, then moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a hash mismatch a RuntimeError
        raise WeightsUnavailable(say("fid_weights_download_failed", error=f"{type(exc).__name__}: {exc}", **where)) from exc
    return target


def load_fid_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a verified weights file, unpickled with ``weights_only`` (tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
