"""The Models tab's operations, and ``rapid-diffusion import``'s: every model, and what can be done with it.

:class:`ModelsService` (``AppService.models``) lists every model under the name its owner chose, with
what it is (base model, steps, date, size on disk, how its training ended) and what it costs once
loaded; it loads, unloads, renames, deletes, exports and imports models. Shipped and configured
models are protected: only the owner's own (fine-tuned or imported, registered in
``$RAPID_DIFFUSION_HOME/domains``) can be renamed, deleted or exported. Every action checks
:func:`authorize` itself: on a public host (``RAPID_DIFFUSION_PUBLIC=1``) it needs the owner's
password, and without one it is off.

An export is the model's diffusers pipeline, its ``knowledge/`` folder when it has one, and its domain's
texts and sampling settings in ``rapid_diffusion_domain.yaml`` (no paths), so that an import brings the
model back as it was. Import has one path, :func:`import_any`: a zip this tab exported is read entry by entry with the
fine-tuning data reader's checks (unsafe names, links, encryption, bombs: each refusal named, nothing
extracted blindly) into a temporary folder, and that folder, or any other path, goes to
:func:`rapid_diffusion.models.importing.import_checkpoint` (diffusers, EasyNLP, single-file).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable

import yaml

from ..domains import (DOMAIN_ID_PATTERN, SETTINGS_FILE, DomainSpec, load_domains, portable_settings, user_domains_dir,
                       write_domain_yaml)
from ..errors import ModelUnavailableError, UserFacingError
from ..knowledge import KNOWLEDGE_DIR
from ..messages import say
from ..models.checkpoints import ImportFailed
from ..models.hub import find_cached_snapshot
from ..models.registry import Acceleration, LoadedModel, ModelRegistry
from ..paths import SHIPPED_DOMAINS_DIR, models_dir
from ..settings import settings
from ..training.data import ZIP_READ_ERRORS, normal_name, zip_entry_problem
from ..training.pairs import REASONS, DataLimits
from ..training.jobs import DeleteRefused
from ..training.options import TrainConfig, TrainingError, name_problem
from ..training.publish import finetune_title
from ..training.run_files import CONFIG_FILE, read_losses, read_status, rename_run
from .batching import GpuGate, QueueFullError
from .finetune import FinetuneService

if TYPE_CHECKING:
    from ..models.importing import ImportResult

log = logging.getLogger(__name__)

OWNED_KINDS = ("finetuned", "imported")
# A model's files are large (an SD UNet is 3.4 GB in fp32): the data reader's checks with a model's sizes.
MODEL_ZIP_LIMITS = DataLimits(max_file_bytes=16 * 2**30, max_zip_total_bytes=32 * 2**30)
COPY_CHUNK = 2**20
EXPORT_LIFETIME_S = 3600  # as long as Gradio keeps its cached copy of a download


@dataclass(frozen=True)
class ModelInfo:
    """One model as the Models tab lists it."""

    id: str
    name: str
    kind: str  # shipped | configured | finetuned | imported
    state: str  # the registry's: loaded, offline-ready, cached, needs-download, incomplete, missing
    base: str | None = None
    steps: int | None = None
    created: float | None = None  # seconds since the epoch
    size_bytes: int | None = None
    outcome: str | None = None  # how a fine-tune ended: done | stopped | failed (training: resumed, running)
    memory_mb: float | None = None
    load_seconds: float | None = None
    acceleration: Acceleration | None = None  # once loaded

    @property
    def owned(self) -> bool:
        return self.kind in OWNED_KINDS


def admin_access() -> str:
    """Who may act on models: ``open`` (anyone), ``password``, or ``off`` (public host, no password)."""
    current = settings()
    if current.password_required:
        return "password"
    return "off" if current.is_public else "open"


def authorize(password: str | None) -> None:
    """Refuse a model action the host does not allow this caller (403)."""
    access = admin_access()
    if access == "off":
        raise UserFacingError(403, say("admin_off"))
    if access == "password" and not settings().password_check(password):
        raise UserFacingError(403, say("wrong_password"), "password")


class ModelsService:
    """The Models tab's actions on one registry, behind one GPU gate; deletion is the fine-tune service's."""

    def __init__(self, registry: ModelRegistry, gate: GpuGate, finetune: FinetuneService):
        self.registry = registry
        self.gate = gate
        self.finetune = finetune

    # ------------------------------------------------------------------ what there is

    def rows(self) -> list[ModelInfo]:
        loaded = {model.key: model for model in self.registry.loaded()}
        return [self.info(spec, loaded.get(self.registry.key_for(spec))) for spec in self.registry.domains.values()]

    def info(self, spec: DomainSpec, model: LoadedModel | None = None) -> ModelInfo:
        kind = kind_of(spec)
        details = finetune_details(spec, self.registry.domains) if kind == "finetuned" else {}
        created = details.pop("created", None) or (spec.source_file.stat().st_mtime if kind == "imported" else None)
        common = dict(name=spec.title_zh, kind=kind, created=created, size_bytes=model_bytes(spec), **details)
        if model is None:
            return ModelInfo(spec.id, state=self.registry.state(spec), **common)
        return ModelInfo(
            spec.id, state="loaded", memory_mb=round(model.nbytes / 2**20, 1), load_seconds=round(model.load_seconds, 2),
            acceleration=self.registry.acceleration(spec), **common,
        )

    def choices(self) -> list[tuple[str, str]]:
        """Every model for a picker: the owner's name, then the id."""
        return [(f"{spec.title_zh} · {spec.id}", spec.id) for spec in self.registry.domains.values()]

    # ------------------------------------------------------------------ actions

    def load(self, domain_id: str | None, password: str | None = None) -> str:
        """Load a model now (behind the GPU gate); returns the sentence to show."""
        authorize(password)
        spec = self.spec(domain_id)
        try:
            with self.gate.slot():
                model = self.registry.get(spec)
        except QueueFullError as exc:
            raise UserFacingError(503, say("queue_full")) from exc
        except ModelUnavailableError as exc:
            raise UserFacingError(503, str(exc), "domain") from exc
        return say("loaded", domain=spec.title_zh, seconds=model.load_seconds)

    def unload(self, domain_id: str | None, password: str | None = None) -> str:
        authorize(password)
        spec = self.spec(domain_id)
        done = self.registry.unload(self.registry.key_for(spec))
        return say("unloaded" if done else "not_loaded", domain=spec.title_zh)

    def delete(self, domain_id: str | None, password: str | None = None) -> str:
        """Remove one of the owner's models (registration and files) through the fine-tune service's removal."""
        authorize(password)
        spec = self.owned_spec(domain_id)
        try:
            return self.finetune.remove(spec.id)
        except DeleteRefused as exc:
            raise UserFacingError(409, str(exc), "domain") from exc

    def rename(self, domain_id: str | None, name: str | None, password: str | None = None) -> str:
        """Give one of the owner's models a new display name (its id, which the API uses, stays). A fine-tune's
        name goes into its run's ``run.json`` too, so that resuming the run publishes under it, and its title
        follows the one rule publishing uses ("<name>（基于 <base>）")."""
        authorize(password)
        spec = self.owned_spec(domain_id)
        new_name = (name or "").strip()
        problem = name_problem(new_name)
        if problem:
            raise UserFacingError(422, problem, "name")
        if kind_of(spec) == "finetuned":
            set_title(spec, self.renamed_finetune_title(spec, new_name))
        else:
            set_title(spec, {"zh": new_name, "en": new_name})
        self.registry.reload_domains()
        return say("model_renamed", old=spec.title_zh, new=new_name)

    def export(self, domain_id: str | None, password: str | None = None) -> Path:
        """A zip of the model (:func:`write_model_zip`), written for this caller in a fresh temporary folder."""
        authorize(password)
        spec = self.owned_spec(domain_id)
        if not spec.model.is_local or not (spec.model.path / "model_index.json").is_file():
            raise UserFacingError(409, say("model_files_missing_short", name=spec.title_zh), "domain")
        root = Path(tempfile.gettempdir()) / "rapid-diffusion-exports"
        remove_old_exports(root)
        folder = root / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return write_model_zip(spec, folder / f"{spec.id}.zip")

    def import_model(self, upload: str | None, folder: str | None, name: str | None, password: str | None = None) -> str:
        """A zip the visitor uploaded, or a folder on the server (the owner's), as a new model named ``name``."""
        authorize(password)
        given = [value for value in (upload, (folder or "").strip()) if value]
        if len(given) != 1:
            raise UserFacingError(422, say("import_one_source"), "path")
        source = Path(given[0])
        display = (name or "").strip() or source.stem
        problem = name_problem(display)
        if problem:
            raise UserFacingError(422, problem, "name")
        try:
            result = import_any(source, new_model_id(display))
        except ImportFailed as exc:
            raise UserFacingError(422, str(exc), "path") from exc
        spec = load_domains()[result.domain_id]
        set_title(spec, {"zh": display, "en": display})  # the owner chose one name, for both languages
        self.registry.reload_domains()
        return say("model_imported", name=display)

    def renamed_finetune_title(self, spec: DomainSpec, name: str) -> dict[str, str]:
        """Record ``name`` in the fine-tune's run folder; the title it publishes under from now on."""
        try:
            config = rename_run(spec.model.path, name, spec.id)
        except (TrainingError, OSError) as exc:
            log.warning("rename of %s: %s", spec.id, exc)  # the reason names a server path: the log, not the page
            raise UserFacingError(409, say("model_run_unreadable", name=spec.title_zh), "domain") from exc
        stopped = read_status(spec.model.path).get("state") != "done"  # the published model is the last stopped one
        return finetune_title(name, self.registry.domains.get(config.base), config.base, stopped)

    # ------------------------------------------------------------------ lookups

    def spec(self, domain_id: str | None) -> DomainSpec:
        if not domain_id:
            raise UserFacingError(422, say("no_model_picked"), "domain")
        try:
            return self.registry.spec(domain_id)
        except KeyError:
            raise UserFacingError(404, say("unknown_domain", domain=domain_id, known=", ".join(self.registry.domains)), "domain") from None

    def owned_spec(self, domain_id: str | None) -> DomainSpec:
        """The owner's own model; shipped and configured ones are refused (409)."""
        spec = self.spec(domain_id)
        if kind_of(spec) not in OWNED_KINDS:
            raise UserFacingError(409, say("model_protected", name=spec.title_zh), "domain")
        return spec


# ----------------------------------------------------------------------------- what a model is


def kind_of(spec: DomainSpec) -> str:
    folder = spec.source_file.parent if spec.source_file is not None else None
    if folder == user_domains_dir():
        return "finetuned" if spec.model.is_local and (spec.model.path / CONFIG_FILE).is_file() else "imported"
    return "shipped" if folder == SHIPPED_DOMAINS_DIR else "configured"


def finetune_details(spec: DomainSpec, domains: dict[str, DomainSpec]) -> dict:
    """Base, steps, date and outcome of a fine-tuned model, read from its run folder."""
    folder = spec.model.path
    try:
        config = TrainConfig.load(folder / CONFIG_FILE)
    except TrainingError:
        return {}
    status = read_status(folder)
    base = domains[config.base].title_zh if config.base in domains else config.base
    state = status.get("state")
    outcome = state if state in ("done", "stopped", "failed") else "training"
    job = folder / "job.json"
    created = json.loads(job.read_text(encoding="utf-8")).get("created_at") if job.is_file() else None
    return {"base": base, "steps": status.get("step") or len(read_losses(folder)), "outcome": outcome, "created": created}


def model_bytes(spec: DomainSpec) -> int | None:
    """The size on disk of the model's pipeline (its components, not a run's checkpoints); None when not on disk."""
    folder = spec.model.path if spec.model.is_local else find_cached_snapshot(spec.model)
    if folder is None or not (folder / "model_index.json").is_file():
        return None
    return sum(path.stat().st_size for path in pipeline_files(folder))


def pipeline_files(folder: Path) -> list[Path]:
    """``model_index.json`` and the files of the components it names."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    components = [name for name, value in index.items() if not name.startswith("_") and isinstance(value, list) and value[0]]
    files = [folder / "model_index.json"]
    for component in sorted(components):
        files += sorted(p for p in (folder / component).rglob("*") if p.is_file())
    return files


def set_title(spec: DomainSpec, title: dict[str, str]) -> None:
    """Rewrite the model's domain file with ``title`` (``zh`` and ``en``)."""
    data = yaml.safe_load(spec.source_file.read_text(encoding="utf-8"))
    data.pop("id", None)
    data["title"] = title
    write_domain_yaml(spec.id, data)


def new_model_id(name: str) -> str:
    """The name itself when it is a free id, else ``model-<8 hex>``."""
    taken = set(load_domains())
    if re.fullmatch(DOMAIN_ID_PATTERN, name) and name not in taken and not (models_dir() / name).exists():
        return name
    return f"model-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------- zips


def write_model_zip(spec: DomainSpec, target: Path) -> Path:
    """The pipeline's files (:func:`pipeline_files`) and its ``knowledge/`` folder, stored under their relative
    names, and the domain's texts and sampling settings (no paths) as ``SETTINGS_FILE`` at the root: what the
    model needs to come back as it was (``importing.read_diffusers`` reads them)."""
    folder = spec.model.path
    knowledge = sorted(p for p in (folder / KNOWLEDGE_DIR).rglob("*") if p.is_file())
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in pipeline_files(folder) + knowledge:
            archive.write(path, path.relative_to(folder).as_posix())
        archive.writestr(SETTINGS_FILE, yaml.safe_dump(portable_settings(spec), allow_unicode=True, sort_keys=False))
    return target


def remove_old_exports(root: Path) -> None:
    cutoff = time.time() - EXPORT_LIFETIME_S
    for old in root.iterdir() if root.is_dir() else []:
        if old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)


def import_any(path: Path, domain_id: str, *, config: Path | str | None = None, log: Callable[[str], None] | None = None) -> ImportResult:
    """The one import path (the Models tab and ``rapid-diffusion import``): a zip is read, checked, into a
    temporary folder; every other path goes to ``import_checkpoint`` as it is. (The converters load when an
    import starts: they bring the diffusers model classes, seconds of a server's start.)"""
    from ..models.importing import import_checkpoint

    path = Path(path).expanduser()
    if path.suffix.lower() != ".zip" or not path.is_file():
        return import_checkpoint(path, domain_id, config=config, log=log)
    models_dir().mkdir(parents=True, exist_ok=True)
    unpacked = Path(tempfile.mkdtemp(prefix=".unzip-", dir=models_dir()))
    try:
        return import_checkpoint(read_model_zip(path, unpacked), domain_id, config=config, log=log)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)


def read_model_zip(path: Path, target: Path) -> Path:
    """Write a model zip's entries into ``target``, each checked from its header and bounded by its declared
    size while it inflates; returns the folder holding ``model_index.json``. Any unsafe entry refuses the zip."""
    try:
        archive = zipfile.ZipFile(path)
    except ZIP_READ_ERRORS as exc:
        raise ImportFailed(zip_refusal(path.name, "bad_archive")) from exc
    with archive:
        members = checked_members(archive)
        for name, info in members.items():
            destination = target / name
            try:  # a file named like another entry's folder ("unet" and "unet/x") cannot be written: OSError
                destination.parent.mkdir(parents=True, exist_ok=True)
                copy_entry(archive, info, destination)
            except ZIP_READ_ERRORS as exc:
                raise ImportFailed(zip_refusal(info.filename, "bad_archive")) from exc
    roots = sorted({PurePosixPath(name).parent for name in members if PurePosixPath(name).name == "model_index.json"},
                   key=lambda root: len(root.parts))
    if not roots or len(roots[0].parts) > 1:
        raise ImportFailed(say("import_zip_no_model", zip=path.name))
    return target / roots[0]


def checked_members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in archive.infolist():
        if info.is_dir():
            continue
        name = normal_name(info.filename)
        problem = zip_entry_problem(MODEL_ZIP_LIMITS, info, total)
        if problem is None and name in members:
            problem = ("duplicate_name", "")
        if problem is not None:
            raise ImportFailed(zip_refusal(info.filename, problem[0]))
        total += info.file_size
        members[name] = info
    return members


def copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, destination: Path) -> None:
    """Inflate one entry; one that inflates past its declared size (its header lied) is a bomb."""
    written = 0
    with archive.open(info) as source, destination.open("wb") as out:
        while chunk := source.read(COPY_CHUNK):
            written += len(chunk)
            if written > info.file_size:
                raise ImportFailed(zip_refusal(info.filename, "zip_bomb"))
            out.write(chunk)


def zip_refusal(entry: str, code: str) -> str:
    zh, en = REASONS.get(code, (code, code))
    return say("import_zip_refused", entry=entry[:120], reason_zh=zh, reason_en=en)
