"""``import_checkpoint(path, name)``: a checkpoint people already have -> a registered domain.

Three layouts are read: a diffusers pipeline folder (what the Models tab exports, loaded as the
registry loads a model), an EasyNLP latent-diffusion fine-tune folder (:mod:`.easynlp`) and a
single-file Stable Diffusion checkpoint with a diffusers folder for its architecture
(:mod:`.single_file`). Each becomes a diffusers folder ``$RAPID_DIFFUSION_HOME/models/<name>``
(safetensors; EasyNLP's ESRGAN weights beside it, in RGB order) registered as domain ``<name>``
in ``$RAPID_DIFFUSION_HOME/domains``, the way a finished fine-tune registers itself.

Nothing is downloaded; weights are read as safetensors or ``torch.load(weights_only=True)``;
zips are refused here, not extracted (``service.models`` reads an exported zip entry by entry, checked,
then imports the folder it wrote). The folder is written under a temporary name and renamed when
complete, and the domain YAML is written last, so a failure leaves neither behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

from ..domains import DOMAIN_ID_PATTERN, SETTINGS_FILE, DomainSpecError, load_domains, read_portable_settings, write_domain_yaml
from ..knowledge import KNOWLEDGE_DIR, GraphError, Knowledge, has_knowledge
from ..messages import say
from ..paths import models_dir
from ..errors import ModelUnavailableError
from .checkpoints import WEIGHT_SUFFIXES, Converted, ImportFailed
from .registry import load_pipeline
from .easynlp import convert_easynlp, read_config
from .sr_weights import esrgan_rgb_state
from .single_file import convert_single_file

logger = logging.getLogger(__name__)
SR_FILE = "esrgan_x4.safetensors"
EXAMPLES = ["一只猫", "一幅山水画", "一碗面条"]
LISTED_ENTRIES = 12
DIFFUSERS_GUIDANCE = 7.5  # a diffusers folder carries no sampling settings: Stable Diffusion's default


@dataclass(frozen=True)
class ImportResult:
    domain_id: str
    model_dir: Path
    domain_file: Path
    layout: str
    sr_weights: Path | None
    notes: tuple[str, ...]


def import_checkpoint(path: Path | str, name: str, *, config: Path | str | None = None,
                      log: Callable[[str], None] | None = None) -> ImportResult:
    """Convert ``path`` and register it as domain ``name``; ``config`` (a diffusers folder or a domain
    id) gives a single-file checkpoint its architecture and vocabulary. Raises :class:`ImportFailed`
    with a message for the user; ``log`` gets one line per stage (default: this module's logger)."""
    log = log or logger.info
    path = Path(path).expanduser()
    check_name(name)
    converted = read_checkpoint(path, config, log)
    model_dir = write_model(converted, name, log)
    try:
        domain_file = register(name, model_dir, path, converted)
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    log(f"registered domain '{name}' ({domain_file})")
    sr = model_dir / SR_FILE if converted.sr_weights else None
    return ImportResult(name, model_dir, domain_file, converted.layout, sr, tuple(converted.notes))


def check_name(name: str) -> None:
    """A valid domain id, not taken by any domain (shipped, configured or user) nor by a model folder."""
    if not re.fullmatch(DOMAIN_ID_PATTERN, name):
        raise ImportFailed(say("import_bad_name", name=name))
    if name in load_domains() or (models_dir() / name).exists():
        raise ImportFailed(say("import_name_taken", name=name))


def read_checkpoint(path: Path, config: Path | str | None, log: Callable[[str], None]) -> Converted:
    """The layout of ``path`` recognised and converted, or a message naming what is there."""
    if not path.exists():
        raise ImportFailed(say("import_no_such_path", path=path))
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return read_diffusers(path, log)
        ldm_config = read_config(path)
        if ldm_config is None:
            raise ImportFailed(say("import_unknown_layout", path=path, found=describe_folder(path)))
        return convert_easynlp(path, ldm_config, log)
    suffix = path.suffix.lower()
    if suffix == ".zip":
        raise ImportFailed(say("import_zip", path=path))
    if suffix not in WEIGHT_SUFFIXES:
        raise ImportFailed(say("import_unknown_layout", path=path, found=f"a {suffix or 'suffix-less'} file"))
    if config is None:
        raise ImportFailed(say("import_needs_config"))
    return convert_single_file(path, resolve_config(config), log)


def read_diffusers(folder: Path, log: Callable[[str], None]) -> Converted:
    """A diffusers pipeline folder, loaded as the registry loads a model (safetensors or weights_only, PAI
    classes), with what an export of this project carries beside it: the domain's settings
    (:data:`SETTINGS_FILE`) and the knowledge folder, both checked before the weights are read."""
    import torch

    settings = read_settings(folder)
    knowledge = read_knowledge(folder)
    log(f"reading the diffusers pipeline in {folder}")
    try:
        pipe = load_pipeline(folder, torch.device("cpu"), torch.float32)
    except ModelUnavailableError as exc:
        raise ImportFailed(say("import_unreadable_pipeline", path=folder.name)) from exc
    return Converted(pipe, "diffusers", guidance_scale=DIFFUSERS_GUIDANCE, settings=settings, knowledge=knowledge)


def read_settings(folder: Path) -> dict:
    """The exported domain settings, checked as a stranger's input; none (the defaults) without the file."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return read_portable_settings(path)
    except DomainSpecError as exc:
        raise ImportFailed(say("import_bad_settings", file=SETTINGS_FILE, field=exc.field_name, problem=exc.problem)) from exc


def read_knowledge(folder: Path) -> Path | None:
    """The model's ``knowledge/`` folder when it holds knowledge weights that load with their graph, else None."""
    knowledge = folder / KNOWLEDGE_DIR
    if not has_knowledge(folder):
        return None
    try:
        Knowledge.load(knowledge)
    except (GraphError, SafetensorError, ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ImportFailed(say("import_bad_knowledge", folder=KNOWLEDGE_DIR, problem=str(exc).replace(str(folder), "")[:200])) from exc
    return knowledge


def describe_folder(folder: Path) -> str:
    entries = sorted(folder.iterdir())
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:LISTED_ENTRIES]]
    if (folder / "config.json").is_file():
        names = [n if n != "config.json" else "config.json (not an LDM config: no model.params.first_stage_config / cond_stage_config)" for n in names]
    more = f", … ({len(entries) - LISTED_ENTRIES} more)" if len(entries) > LISTED_ENTRIES else ""
    return ", ".join(names) + more if names else "nothing (empty folder) / 空文件夹"


def resolve_config(config: Path | str) -> Path:
    """A folder as given, or the local model of a domain (its folder, or its cached hub snapshot)."""
    folder = Path(config).expanduser()
    if folder.is_dir():
        return folder
    spec = load_domains().get(str(config))
    if spec is None:
        raise ImportFailed(say("import_config_not_found", value=config))
    if spec.model.is_local:
        return spec.model.path
    from .hub import find_cached_snapshot

    snapshot = find_cached_snapshot(spec.model)
    if snapshot is None:
        raise ImportFailed(say("import_config_unavailable", domain=spec.id))
    return snapshot


def write_model(converted: Converted, name: str, log: Callable[[str], None]) -> Path:
    """The pipeline (and SR weights) saved under a temporary name in the models folder, then renamed."""
    root = models_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        log(f"writing the diffusers folder ({root / name})")
        converted.pipe.save_pretrained(tmp, safe_serialization=True)
        if converted.knowledge is not None:
            shutil.copytree(converted.knowledge, tmp / KNOWLEDGE_DIR)
        if converted.sr_weights is not None:
            from safetensors.torch import save_file

            log(f"converting {converted.sr_weights.name} to RGB order ({SR_FILE})")
            save_file(esrgan_rgb_state(converted.sr_weights), str(tmp / SR_FILE))
        os.replace(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / name


def register(name: str, model_dir: Path, source: Path, converted: Converted) -> Path:
    pipe = converted.pipe
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    data = {
        "title": {"zh": f"{name}（导入）", "en": f"{name} (imported)"},
        "description": f"导入自 {source.name}（{converted.layout}） / Imported from {source.name} ({converted.layout}); "
                       + "; ".join(converted.notes),
        "model": {"path": str(model_dir.resolve())},
        "examples": EXAMPLES,
        "height": max(64, side // 8 * 8),
        "width": max(64, side // 8 * 8),
        "num_inference_steps": 20,
        "guidance_scale": converted.guidance_scale,
        "sampler": "pndm",
        "negative_prompt": "",
        "offline_ready": True,
        **converted.settings,
    }
    if converted.sr_weights is not None:
        data["sr_weights"] = {"path": str((model_dir / SR_FILE).resolve())}
    if converted.knowledge is not None:  # the imported folder's own graph, never a path from the settings
        data["knowledge_graph"] = str((model_dir / KNOWLEDGE_DIR).resolve())
    return write_domain_yaml(name, data)
