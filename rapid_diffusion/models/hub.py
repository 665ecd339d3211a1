"""Hub snapshots of diffusers pipelines: find them in the cache, verify them, complete them.

A download cut short leaves a snapshot folder with ``model_index.json`` but without a weight
file; such a folder must not count as cached. Offline, a snapshot is checked against its own
``model_index.json`` (each component folder has its config and, for models, a weight file);
online, against the repo's file list and sizes, and whatever is missing or the wrong size is
fetched again. Nothing here imports ``huggingface_hub`` until it is called.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..domains import ModelSource
from ..messages import say
from ..settings import settings

SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "tokenizer.json", "spiece.model")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class IncompleteSnapshotError(RuntimeError):
    """A cached snapshot lacks files the pipeline needs, and they could not be fetched."""


def hub_offline() -> bool:
    return settings().hub_offline


@dataclass(frozen=True)
class Snapshot:
    """A cached snapshot folder (None when there is none) and the pipeline files it lacks."""

    folder: Path | None
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.folder is not None and not self.missing

    @property
    def state(self) -> str:
        """``cached``, ``incomplete`` or ``needs-download`` (the registry's state strings)."""
        if self.folder is None:
            return "needs-download"
        return "incomplete" if self.missing else "cached"


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return settings().hub_cache or Path(constants.HF_HUB_CACHE)


def repo_cache_dir(source: ModelSource) -> Path:
    """``<cache>/models--owner--name``, the hub library's layout."""
    return hub_cache_dir() / ("models--" + source.repo_id.replace("/", "--"))


def cached_snapshot(source: ModelSource) -> Snapshot:
    """The cached snapshot of ``source`` checked against its model_index.json; no network."""
    folder = _snapshot_folder(source)
    if folder is None:
        return Snapshot(None)
    return Snapshot(folder, tuple(missing_pipeline_files(folder)))


def find_cached_snapshot(source: ModelSource) -> Path | None:
    """The local snapshot folder of a hub model, only if it is complete; no network."""
    snapshot = cached_snapshot(source)
    return snapshot.folder if snapshot.complete else None


def _snapshot_folder(source: ModelSource) -> Path | None:
    repo = repo_cache_dir(source)
    commit = source.revision
    if not _COMMIT.match(commit):
        ref = repo / "refs" / source.revision
        try:
            commit = ref.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
    folder = repo / "snapshots" / commit
    return folder if commit and folder.is_dir() else None


def missing_pipeline_files(folder: Path) -> list[str]:
    """What a pipeline folder lacks, per model_index.json: each component's config, and a
    weight file for each model (a broken link to an unfinished blob counts as missing)."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ["model_index.json"]
    if not isinstance(index, dict):
        return ["model_index.json"]
    missing = []
    for name, value in index.items():
        if name.startswith("_") or name in SKIPPED_COMPONENTS or not _is_component(value):
            continue
        missing += _missing_component_files(folder / name, name, value[1])
    return missing


def _is_component(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _missing_component_files(path: Path, name: str, class_name: str) -> list[str]:
    if class_name.endswith("Scheduler"):
        return [] if (path / "scheduler_config.json").is_file() else [f"{name}/scheduler_config.json"]
    if "Tokenizer" in class_name:
        return [] if any((path / f).is_file() for f in TOKENIZER_FILES) else [f"{name}/{TOKENIZER_FILES[0]}"]
    if class_name.endswith(("FeatureExtractor", "ImageProcessor")):
        return [] if (path / "preprocessor_config.json").is_file() else [f"{name}/preprocessor_config.json"]
    missing = [] if (path / "config.json").is_file() else [f"{name}/config.json"]
    has_weights = path.is_dir() and any(f.suffix in WEIGHT_SUFFIXES and f.is_file() for f in path.iterdir())
    return missing + ([] if has_weights else [f"{name}/*.safetensors|*.bin"])


def download_snapshot(source: ModelSource, progress: Callable[[str], None] | None = None) -> Path:
    """The snapshot of ``source``, verified against the repo's file list (names and sizes);
    files missing or of the wrong size are downloaded again (safetensors preferred over .bin)."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(source.repo_id, revision=source.revision, files_metadata=True)
    sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
    wanted = choose_weight_files(list(sizes))
    folder = repo_cache_dir(source) / "snapshots" / info.sha
    for name in _unverified(folder, wanted, sizes):
        stale = (folder / name).exists()
        if progress:
            progress(f"downloading {source.repo_id}/{name}" + (" (wrong size, again)" if stale else ""))
        hf_hub_download(
            source.repo_id, name, revision=source.revision, cache_dir=hub_cache_dir(),
            force_download=stale, tqdm_class=_progress_tqdm(progress) if progress else None,
        )
    remaining = _unverified(folder, wanted, sizes)
    if remaining:
        raise IncompleteSnapshotError(incomplete_message(source, remaining))
    return folder


def _unverified(folder: Path, wanted: list[str], sizes: dict[str, int | None]) -> list[str]:
    """Files of ``wanted`` absent from ``folder`` or whose size differs from the repo's."""
    return [
        name for name in wanted
        if not (folder / name).is_file() or (sizes.get(name) is not None and (folder / name).stat().st_size != sizes[name])
    ]


def incomplete_message(source: ModelSource, missing: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5})" if len(missing) > 5 else "")
    return say("model_incomplete", model=source.describe(), missing=shown)


def choose_weight_files(files: list[str]) -> list[str]:
    """The files a pipeline needs: configs, vocab and one weight format per component."""
    chosen = []
    folders_with_safetensors = {f.split("/")[0] for f in files if f.endswith(".safetensors")}
    for name in files:
        folder = name.split("/")[0] if "/" in name else ""
        if folder in SKIPPED_COMPONENTS or name.count("/") > 1:
            continue
        if name == "model_index.json" or (folder and name.endswith((".json", ".txt"))):
            chosen.append(name)
        elif folder and name.endswith(".safetensors"):
            chosen.append(name)
        elif folder and name.endswith(".bin") and folder not in folders_with_safetensors:
            chosen.append(name)
    return chosen


def _progress_tqdm(progress: Callable[[str], None]):
    import io

    from tqdm.auto import tqdm

    class ReportingTqdm(tqdm):
        """Reports each file's download through ``progress`` in 10% steps, drawing no bar."""

        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=io.StringIO())
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            result = super().update(n)
            if self.total:
                tenth = int(10 * self.n / self.total)
                if tenth != getattr(self, "_reported_tenth", None):
                    self._reported_tenth = tenth
                    progress(f"{self.desc or 'download'}: {self.n / self.total:.0%}")
            return result

    return ReportingTqdm
