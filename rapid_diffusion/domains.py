"""Domain specs: one YAML file per domain, validated once on load.

A domain is a named model plus the defaults that suit it (size, steps, sampler, negative
prompt, example prompts). The shipped ones are package data (``rapid_diffusion/data/domains``);
an owner adds one by dropping a YAML file into a folder listed in ``RAPID_DIFFUSION_DOMAINS``
(``os.pathsep``-separated) or into ``$RAPID_DIFFUSION_HOME/domains`` (where fine-tuned and
imported models register themselves).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .paths import SHIPPED_DOMAINS_DIR, home_dir
from .settings import settings

SAMPLER_NAMES = ("pndm", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "euler", "euler_a", "unipc")
OPTIMIZATION_LEVELS = ("none", "flash", "compile", "openvino", "openvino-int8", "auto")  # speed/levels.py says what each does
log = logging.getLogger(__name__)
DOMAIN_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_ID_PATTERN = re.compile(f"^{DOMAIN_ID_PATTERN}$")


class DomainSpecError(ValueError):
    """A domain YAML file is invalid; the message names the file and the field."""

    def __init__(self, source: str, field_name: str, problem: str):
        self.source = source
        self.field_name = field_name
        self.problem = problem
        super().__init__(f"{source}: field '{field_name}': {problem}")


@dataclass(frozen=True)
class ModelSource:
    """Where a domain's diffusers pipeline lives: a hub repo (+ revision) or a local folder."""

    repo_id: str | None = None
    revision: str = "main"
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def key(self) -> str:
        return str(self.path) if self.path is not None else f"{self.repo_id}@{self.revision}"

    def describe(self) -> str:
        return str(self.path) if self.path is not None else f"{self.repo_id} (revision {self.revision})"

    @property
    def name(self) -> str:
        """What users see (page, PNG metadata, API errors): never a server path, only its last two parts."""
        return "/".join(self.path.parts[-2:]) if self.path is not None else self.repo_id

    @classmethod
    def parse(cls, value: str) -> "ModelSource":
        """A CLI-style source: an existing folder, else a hub id (``owner/name[@revision]``)."""
        if Path(value).expanduser().is_dir():
            return cls(path=Path(value).expanduser().resolve())
        repo_id, _, revision = value.partition("@")
        if not re.match(r"^[\w.-]+/[\w.-]+$", repo_id):
            raise ValueError(f"'{value}' is neither a folder nor a hub id like 'owner/name'")
        return cls(repo_id=repo_id, revision=revision or "main")


@dataclass(frozen=True)
class SuperResolutionWeights:
    """An ESRGAN checkpoint: a local path, or a URL / hub file with its sha256."""

    path: Path | None = None
    url: str | None = None
    repo_id: str | None = None
    filename: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DomainSpec:
    id: str
    title_zh: str
    title_en: str
    description: str
    model: ModelSource
    examples: tuple[str, ...]
    height: int = 512
    width: int = 512
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    sampler: str = "pndm"
    negative_prompt: str = ""
    super_resolution: bool = False
    optimization: str = "none"
    offline_ready: bool = False
    sr_weights: SuperResolutionWeights | None = None
    knowledge_graph: Path | None = None
    source_file: Path | None = field(default=None, compare=False)

    @property
    def title(self) -> str:
        """"中文 / English"; a name its owner gave in one language (the same in both) once."""
        return self.title_zh if self.title_zh == self.title_en else f"{self.title_zh} / {self.title_en}"


def user_domains_dir() -> Path:
    """Where fine-tuned models register themselves (``$RAPID_DIFFUSION_HOME/domains``)."""
    return home_dir() / "domains"


def domain_dirs() -> list[Path]:
    """Folders the owner controls, later ones overriding earlier ids: shipped, then configured."""
    return [SHIPPED_DOMAINS_DIR, *settings().domain_dirs]


class Domains(dict):
    """Domain specs by id, plus ``errors``: the files that were skipped, one error each."""

    def __init__(self, specs: dict[str, DomainSpec] | None = None, errors: list[DomainSpecError] | None = None):
        super().__init__(specs or {})
        self.errors = errors or []


def load_domains(dirs: list[Path] | None = None, user_dir: Path | None = None) -> Domains:
    """Every valid domain, sorted by id: the owner's folders (``dirs``), then the user folder
    (by default only when ``dirs`` is not given).

    An invalid file is skipped with a logged error (file + field), kept in ``.errors``, so one
    bad file never hides the others. A file in the user folder (written by fine-tuning, or by
    anyone who can start a job) never replaces a domain of the owner's folders.
    """
    specs: dict[str, DomainSpec] = {}
    errors: list[DomainSpecError] = []
    if dirs is None:
        dirs, user_dir = domain_dirs(), user_dir or user_domains_dir()
    for folder in dirs:
        for spec in _load_folder(folder, errors):
            specs[spec.id] = spec
    owner_ids = set(specs)
    for spec in _load_folder(user_dir, errors) if user_dir is not None else []:
        if spec.id in owner_ids:
            log.error("%s: domain id '%s' is already a configured domain; the file is ignored", spec.source_file, spec.id)
            continue
        specs[spec.id] = spec
    return Domains(dict(sorted(specs.items())), errors)


def domain_files_signature() -> tuple:
    """What :func:`load_domains` would read, as (file, mtime, size) triples: it changes whenever a
    domain file is added, removed or rewritten (a fine-tune finishing, a model deleted or imported)."""
    signature = []
    for folder in [*domain_dirs(), user_domains_dir()]:
        for path in _yaml_files(folder):
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed since the listing
                continue
            signature.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


def _load_folder(folder: Path, errors: list[DomainSpecError]) -> list[DomainSpec]:
    specs = []
    for path in _yaml_files(folder):
        try:
            specs.append(load_domain_file(path))
        except DomainSpecError as exc:
            log.error("domain file skipped / 已跳过域文件: %s", exc)
            errors.append(exc)
    return specs


def _yaml_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.y*ml") if p.is_file()) if folder.is_dir() else []


def load_domain_file(path: Path) -> DomainSpec:
    """One domain file, read as UTF-8; any problem is a :class:`DomainSpecError` naming the file."""
    return parse_domain(_read_mapping(path, str(path)), source=str(path), base_dir=path.parent)


def _read_mapping(path: Path, source: str) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DomainSpecError(source, "<file>", f"不是 UTF-8 编码 / not UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise DomainSpecError(source, "<file>", f"无法读取 / cannot be read ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DomainSpecError(source, "<file>", f"not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DomainSpecError(source, "<file>", "must be a mapping of fields")
    return data


def parse_domain(data: dict[str, Any], source: str, base_dir: Path) -> DomainSpec:
    v = _Validator(data, source)
    known = {f.name for f in fields(DomainSpec)} - {"source_file", "title_zh", "title_en"}
    known |= {"title"}
    for key in data:
        if key not in known:
            raise DomainSpecError(source, key, f"unknown field (known: {', '.join(sorted(known))})")
    domain_id = v.string("id")
    if not _ID_PATTERN.match(domain_id):
        raise DomainSpecError(source, "id", "use lowercase letters, digits, '-' or '_' (max 64)")
    title = v.mapping("title")
    examples = v.get("examples")
    if not isinstance(examples, list) or len(examples) < 3 or not all(isinstance(e, str) and e.strip() for e in examples):
        raise DomainSpecError(source, "examples", "must be a list of at least 3 non-empty prompts")
    spec = DomainSpec(
        id=domain_id,
        title_zh=_require_str(title, "zh", source, "title.zh"),
        title_en=_require_str(title, "en", source, "title.en"),
        description=v.string("description"),
        model=_parse_model(v.mapping("model"), source, base_dir),
        examples=tuple(e.strip() for e in examples),
        height=v.integer("height", 512, 64, 2048, multiple=8),
        width=v.integer("width", 512, 64, 2048, multiple=8),
        num_inference_steps=v.integer("num_inference_steps", 20, 1, 200),
        guidance_scale=v.number("guidance_scale", 7.5, 0.0, 30.0),
        sampler=v.choice("sampler", "pndm", SAMPLER_NAMES),
        negative_prompt=v.string("negative_prompt", ""),
        super_resolution=v.boolean("super_resolution", False),
        optimization=v.choice("optimization", "none", OPTIMIZATION_LEVELS),
        offline_ready=v.boolean("offline_ready", False),
        sr_weights=_parse_sr(data.get("sr_weights"), source, base_dir),
        knowledge_graph=_optional_path(data.get("knowledge_graph"), source, "knowledge_graph", base_dir),
        source_file=Path(source),
    )
    return spec


# ----------------------------------------------------------------------------- what an exported model carries

SETTINGS_FILE = "rapid_diffusion_domain.yaml"  # at the root of an exported zip
PORTABLE_FIELDS = ("title", "description", "examples", "height", "width", "num_inference_steps", "guidance_scale",
                   "sampler", "negative_prompt")
MAX_SETTINGS_BYTES = 64 * 1024
MAX_SETTING_CHARS = 2000
MAX_EXAMPLES = 50
_PLACEHOLDERS = {"id": "imported", "title": {"zh": "-", "en": "-"}, "description": "", "model": {"repo_id": "imported/model"},
                 "examples": ["-", "-", "-"]}


def portable_settings(spec: DomainSpec) -> dict[str, Any]:
    """What an exported model carries of its domain: its texts and sampling settings, never a path."""
    return {
        "title": {"zh": spec.title_zh, "en": spec.title_en},
        "description": spec.description,
        "examples": list(spec.examples),
        "height": spec.height,
        "width": spec.width,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "sampler": spec.sampler,
        "negative_prompt": spec.negative_prompt,
    }


def read_portable_settings(path: Path) -> dict[str, Any]:
    """An exported model's settings file (:data:`SETTINGS_FILE`), read as a stranger's input: at most
    :data:`MAX_SETTINGS_BYTES`, only :data:`PORTABLE_FIELDS`, each text bounded, every value checked by the
    domain schema. Returns the fields it gives, as the schema reads them; a problem is a :class:`DomainSpecError`."""
    source = path.name
    if path.stat().st_size > MAX_SETTINGS_BYTES:
        raise DomainSpecError(source, "<file>", f"larger than {MAX_SETTINGS_BYTES // 1024} KiB")
    data = _read_mapping(path, source)
    title = data.get("title")
    unknown = [str(key) for key in data if key not in PORTABLE_FIELDS]
    unknown += [f"title.{key}" for key in title if key not in ("zh", "en")] if isinstance(title, dict) else []
    if unknown:
        raise DomainSpecError(source, unknown[0][:40], f"not a setting a model carries (known: {', '.join(PORTABLE_FIELDS)})")
    _check_text_sizes(data, source)
    checked = portable_settings(parse_domain({**_PLACEHOLDERS, **data}, source, path.parent))
    return {key: checked[key] for key in data}


def _check_text_sizes(data: dict[str, Any], source: str) -> None:
    title, examples = data.get("title"), data.get("examples")
    texts = {f"title.{key}": value for key, value in title.items()} if isinstance(title, dict) else {}
    texts |= {key: data.get(key) for key in ("description", "negative_prompt")}
    if isinstance(examples, list):
        if len(examples) > MAX_EXAMPLES:
            raise DomainSpecError(source, "examples", f"at most {MAX_EXAMPLES} prompts, got {len(examples)}")
        texts |= {f"examples[{i}]": example for i, example in enumerate(examples)}
    for name, text in texts.items():
        if isinstance(text, str) and len(text) > MAX_SETTING_CHARS:
            raise DomainSpecError(source, name, f"at most {MAX_SETTING_CHARS} characters, got {len(text)}")


def _parse_model(model: dict[str, Any], source: str, base_dir: Path) -> ModelSource:
    if "path" in model and "repo_id" in model:
        raise DomainSpecError(source, "model", "give either 'repo_id' or 'path', not both")
    if "path" in model:
        return ModelSource(path=_optional_path(model["path"], source, "model.path", base_dir))
    repo_id = _require_str(model, "repo_id", source, "model.repo_id")
    if not re.match(r"^[\w.-]+/[\w.-]+$", repo_id):
        raise DomainSpecError(source, "model.repo_id", f"'{repo_id}' is not a hub id like 'owner/name'")
    revision = model.get("revision", "main")
    if not isinstance(revision, str) or not revision:
        raise DomainSpecError(source, "model.revision", "must be a branch, tag or commit hash")
    return ModelSource(repo_id=repo_id, revision=revision)


def _parse_sr(value: Any, source: str, base_dir: Path) -> SuperResolutionWeights | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DomainSpecError(source, "sr_weights", "must be a mapping (path, or url/repo_id+filename with sha256)")
    allowed = {"path", "url", "repo_id", "filename", "sha256"}
    for key in value:
        if key not in allowed:
            raise DomainSpecError(source, f"sr_weights.{key}", f"unknown field (known: {', '.join(sorted(allowed))})")
    remote = value.get("url") or value.get("repo_id")
    if not value.get("path") and not remote:
        raise DomainSpecError(source, "sr_weights", "needs 'path', 'url', or 'repo_id' + 'filename'")
    if value.get("repo_id") and not value.get("filename"):
        raise DomainSpecError(source, "sr_weights.filename", "required with 'repo_id'")
    sha = value.get("sha256")
    if remote and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise DomainSpecError(source, "sr_weights.sha256", "a 64-hex-digit sha256 is required for downloaded weights")
    return SuperResolutionWeights(
        path=_optional_path(value.get("path"), source, "sr_weights.path", base_dir),
        url=value.get("url"),
        repo_id=value.get("repo_id"),
        filename=value.get("filename"),
        sha256=sha,
    )


def _optional_path(value: Any, source: str, field_name: str, base_dir: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DomainSpecError(source, field_name, "must be a path (relative to the YAML file or absolute)")
    path = Path(value).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


def _require_str(mapping: dict[str, Any], key: str, source: str, field_name: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DomainSpecError(source, field_name, "required, a non-empty string")
    return value.strip()


class _Validator:
    """Typed getters that raise :class:`DomainSpecError` naming the field."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def _fail(self, key: str, problem: str) -> DomainSpecError:
        return DomainSpecError(self.source, key, problem)

    def string(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            raise self._fail(key, "required, a string")
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, got {type(value).__name__}")
        return value.strip()

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise self._fail(key, "required, a mapping")
        return value

    def integer(self, key: str, default: int, low: int, high: int, multiple: int = 1) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        if not low <= value <= high or value % multiple:
            suffix = f" and a multiple of {multiple}" if multiple > 1 else ""
            raise self._fail(key, f"must be between {low} and {high}{suffix}, got {value}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be a number, got {value!r}")
        if not low <= value <= high:
            raise self._fail(key, f"must be between {low} and {high}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.data.get(key, default)
        if value not in allowed:
            raise self._fail(key, f"must be one of {', '.join(allowed)}, got {value!r}")
        return value


def write_domain_yaml(domain_id: str, data: dict) -> Path:
    """``$RAPID_DIFFUSION_HOME/domains/<id>.yaml`` (written whole, then renamed): the picker lists it."""
    folder = user_domains_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{domain_id}.yaml"
    tmp = folder / f".{domain_id}.yaml.tmp"
    try:
        tmp.write_text(yaml.safe_dump({"id": domain_id, **data}, allow_unicode=True, sort_keys=False), encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
