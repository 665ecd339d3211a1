"""Every setting of the product, read from the environment once, in one validated object.

``settings()`` builds :class:`Settings` on first use and returns the same object after that;
entry points (the CLI, the server) read it once and pass values down. Tests that change the
environment call :func:`reload`. Variables carry the ``RAPID_DIFFUSION_`` prefix, except the
ones other tools define (``SPACE_ID``, ``SPACES_ZERO_GPU``, ``HF_HUB_OFFLINE``, ``PORT``, ``GRADIO_SERVER_*``).
"""

from __future__ import annotations

import os
import threading
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .access import ApiTokenCheck, PasswordCheck, hash_password, parse_hash

PREFIX = "RAPID_DIFFUSION_"


def _env(name: str, *others: str) -> AliasChoices:
    return AliasChoices(PREFIX + name, *others)


class Settings(BaseSettings):
    """The product's settings; each field's description is the documentation of its variable."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    # Files
    home: Path = Field(Path("~/.rapid-diffusion"), validation_alias=_env("HOME"),
                       description="fine-tuned models, jobs, user domains, compile caches")
    domains: str = Field("", validation_alias=_env("DOMAINS"),
                         description="extra folders of domain YAML files, os.pathsep-separated")

    # Devices and loaded models
    device: str | None = Field(None, validation_alias=_env("DEVICE"), description="torch device; default CUDA, else CPU")
    max_models: int = Field(2, ge=1, validation_alias=_env("MAX_MODELS"), description="loaded pipelines kept")
    max_memory_gb: float | None = Field(None, gt=0, validation_alias=_env("MAX_MEMORY_GB"),
                                        description="memory budget of loaded pipelines")

    # Request limits
    max_images: int = Field(8, ge=1, le=64, validation_alias=_env("MAX_IMAGES"))
    max_side: int = Field(1024, ge=64, le=4096, validation_alias=_env("MAX_SIDE"))
    max_steps: int = Field(150, ge=1, le=1000, validation_alias=_env("MAX_STEPS"))

    # Serving
    concurrency: int | None = Field(None, ge=1, validation_alias=_env("CONCURRENCY"),
                                    description="generations at once; default one per GPU")
    queue_size: int = Field(16, ge=1, validation_alias=_env("QUEUE_SIZE"), description="requests waiting at most")
    max_upload: str = Field("10mb", validation_alias=_env("MAX_UPLOAD"), description="largest single uploaded file")
    max_upload_total: int = Field(200 * 2**20, ge=1, validation_alias=_env("MAX_UPLOAD_TOTAL"),
                                  description="bytes one upload request may carry in all (every file together)")
    max_job_bytes: int = Field(1024 * 2**20, ge=1, validation_alias=_env("MAX_JOB_BYTES"),
                               description="bytes of uploads one fine-tuning job may take into its folder")
    body_timeout: float = Field(10.0, gt=0, validation_alias=_env("BODY_TIMEOUT"),
                                description="seconds a client may take to send the next piece of a request body")
    host: str | None = Field(None, validation_alias=AliasChoices("GRADIO_SERVER_NAME"))
    port: int = Field(7860, ge=1, le=65535, validation_alias=AliasChoices("GRADIO_SERVER_PORT", "PORT"),
                      description="GRADIO_SERVER_PORT (what Spaces and Gradio set), else a generic PORT, else 7860")
    space_id: str | None = Field(None, validation_alias=AliasChoices("SPACE_ID"),
                                 description="set by Hugging Face Spaces: implies a public host")
    public: bool = Field(False, validation_alias=_env("PUBLIC"),
                         description="public-host mode (also on whenever SPACE_ID is set)")
    zero_gpu: bool = Field(False, validation_alias=AliasChoices("SPACES_ZERO_GPU"),
                           description="set (true) by Hugging Face on ZeroGPU hardware: the GPU part runs under spaces.GPU")
    preload: str = Field("", validation_alias=_env("PRELOAD"),
                         description="domain ids (comma-separated, or 'all') loaded at start; on ZeroGPU the default is "
                                     "every configured domain, elsewhere none")
    hub_offline: bool = Field(False, validation_alias=AliasChoices("HF_HUB_OFFLINE"))
    hf_home: Path | None = Field(None, validation_alias=AliasChoices("HF_HOME"), description="Hugging Face's home folder")
    hf_hub_cache: Path | None = Field(None, validation_alias=AliasChoices("HF_HUB_CACHE"),
                                      description="the hub cache (default HF_HOME/hub)")

    # The JSON API's token (SECURITY.md): set, every /api/... route needs it
    api_token: SecretStr | None = Field(None, validation_alias=_env("API_TOKEN"),
                                        description="the JSON API's token (a Space secret or the environment); clients send it "
                                                    "signed (PAI-EAS: PredictClient.set_token) or as the Authorization header")
    api_token_file: Path | None = Field(None, validation_alias=_env("API_TOKEN_FILE"),
                                        description="a file holding the token (its first line), so the token need not sit in "
                                                    "the process environment; set this or API_TOKEN, not both")
    api_clock_skew: float = Field(900.0, gt=0, le=3600, validation_alias=_env("API_CLOCK_SKEW"),
                                  description="seconds a signed request's Date may stray beyond the span of the world's time "
                                              "zones (the official client stamps local time as GMT)")

    # Fine-tuning
    finetune: bool = Field(True, validation_alias=_env("FINETUNE"), description="the Fine-tune tab and jobs")
    finetune_password_hash: str | None = Field(None, validation_alias=_env("FINETUNE_PASSWORD_HASH"),
                                               description="the owner's password as a hash (rapid-diffusion hash-password): "
                                                           "fine-tuning and model actions; the recommended form")
    finetune_password: SecretStr | None = Field(None, validation_alias=_env("FINETUNE_PASSWORD"),
                                                description="the same password in plain text (hashed when read; prefer _HASH)")
    finetune_max_steps: int | None = Field(None, ge=1, validation_alias=_env("FINETUNE_MAX_STEPS"),
                                           description="most steps a fine-tune may run on this host, from the web UI or the CLI (presets are capped)")

    # Uploaded data
    max_pixels: int = Field(4096 * 4096, ge=1, validation_alias=_env("MAX_PIXELS"),
                            description="Pillow's decompression cap, checked before decoding")
    max_file_bytes: int = Field(20 * 2**20, ge=1, validation_alias=_env("MAX_FILE_BYTES"))
    max_items: int = Field(10_000, ge=1, validation_alias=_env("MAX_ITEMS"))

    # Speed
    batch_window_ms: float = Field(30.0, ge=0, validation_alias=_env("BATCH_WINDOW_MS"),
                                   description="concurrent same-shape requests within this window share a batch; 0 = off")
    compile_cache: bool = Field(True, validation_alias=_env("COMPILE_CACHE"),
                                description="keep compiled/converted models under HOME/cache")
    openvino_precision: Literal["f32", "bf16"] = Field("f32", validation_alias=_env("OPENVINO_PRECISION"))
    warm_sizes: str = Field("", validation_alias=_env("WARM_SIZES"),
                            description="extra WxH sizes (comma-separated) whose shapes are compiled at warm-up")
    background_warmup: bool = Field(True, validation_alias=_env("BACKGROUND_WARMUP"),
                                    description="serve on the eager pipeline while a domain compiles")

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("device", "api_token", "api_token_file", "finetune_password", "finetune_password_hash", "finetune_max_steps", "space_id", "host", "max_memory_gb",
                     "concurrency", "hf_home", "hf_hub_cache", mode="before")
    @classmethod
    def _blank_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("finetune_password_hash", mode="after")
    @classmethod
    def _hash(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hash(value)
        return value

    @field_validator("warm_sizes", mode="after")
    @classmethod
    def _sizes(cls, value: str) -> str:
        parse_sizes(value)
        return value

    @property
    def warm_size_list(self) -> list[tuple[int, int]]:
        """``WARM_SIZES`` as (height, width) pairs."""
        return parse_sizes(self.warm_sizes)

    @property
    def is_public(self) -> bool:
        """A public host: a Space, or the owner said so. Fine-tuning then needs a password."""
        return self.public or bool(self.space_id)

    @property
    def domain_dirs(self) -> list[Path]:
        return [Path(p).expanduser() for p in self.domains.split(os.pathsep) if p.strip()]

    @property
    def hub_cache(self) -> Path | None:
        """The hub cache folder when the environment names one; None means the library's default."""
        if self.hf_hub_cache:
            return self.hf_hub_cache.expanduser()
        return self.hf_home.expanduser() / "hub" if self.hf_home else None

    @property
    def max_memory_bytes(self) -> int | None:
        return int(self.max_memory_gb * 2**30) if self.max_memory_gb else None

    @cached_property
    def password_check(self) -> PasswordCheck | None:
        """Checks a candidate against the owner's password (constant-time), or None when none is set."""
        if self.finetune_password_hash:
            return PasswordCheck(self.finetune_password_hash)
        if self.finetune_password:
            return PasswordCheck(hash_password(self.finetune_password.get_secret_value()))
        return None

    @cached_property
    def api_token_check(self) -> ApiTokenCheck | None:
        """Checks the JSON API's token, or None when no token is set (the API is then open).

        ValueError when both sources are set or the file is missing or empty: the server refuses to start.
        """
        if self.api_token is not None and self.api_token_file is not None:
            raise ValueError("set RAPID_DIFFUSION_API_TOKEN or RAPID_DIFFUSION_API_TOKEN_FILE, not both")
        if self.api_token_file is not None:
            try:
                lines = self.api_token_file.expanduser().read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"RAPID_DIFFUSION_API_TOKEN_FILE cannot be read: {exc.strerror}") from None
            token = lines[0].strip() if lines else ""
            if not token:
                raise ValueError("RAPID_DIFFUSION_API_TOKEN_FILE is empty")
            return ApiTokenCheck(token, self.api_clock_skew)
        if self.api_token is not None:
            return ApiTokenCheck(self.api_token.get_secret_value().strip(), self.api_clock_skew)
        return None

    @property
    def password_required(self) -> bool:
        return self.finetune_password_hash is not None or self.finetune_password is not None

    @property
    def finetune_allowed(self) -> bool:
        """Fine-tuning is on, and on a public host only behind a password."""
        return self.finetune and (not self.is_public or self.password_required)

    @property
    def server_host(self) -> str:
        """127.0.0.1 locally; 0.0.0.0 on Hugging Face Spaces."""
        return self.host or ("0.0.0.0" if self.space_id else "127.0.0.1")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"128x128,256x192"`` (width x height) -> ``[(128, 128), (192, 256)]`` as (height, width)."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            width, height = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ValueError(f"sizes must look like 128x128,256x256; got {part!r}") from None
        sizes.append((height, width))
    return sizes


_current: Settings | None = None
_lock = threading.Lock()


def settings() -> Settings:
    """The process's settings, read from the environment on first call."""
    global _current
    with _lock:
        if _current is None:
            _current = Settings()
        return _current


def reload() -> Settings:
    """Read the environment again (tests that change it; nothing in the product calls this)."""
    global _current
    with _lock:
        _current = Settings()
        return _current
