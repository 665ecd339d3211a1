"""The one schema of fine-tuning options: :class:`TrainConfig`, its command-line flags, its JSON, its presets.

Every option is written once, as a field of the pydantic model :class:`TrainConfig`: its default,
its bounds (``ge``/``le``, ``Literal`` choices), its help (``description``) and, where it is not
``--field-name``, its flag (``json_schema_extra``). The ``train`` flags are generated from the
fields (like ``transformers.HfArgumentParser``, without importing transformers), a job hands its
config to the trainer as ``run.json`` (``model_dump_json`` / ``model_validate_json``, read strictly),
and the Fine-tune tab takes its defaults from here. Whatever the source, a value out of bounds is
refused by pydantic, and :meth:`TrainConfig.checked` turns its errors into one :class:`TrainingError`
through the one table of reasons (``messages.VALIDATION_REASONS``), naming each option as the face
shows it (the flag, the JSON key, the tab's label). No torch import: the CLI parser and the web UI
load this cheaply.

Presets replace steps / learning rate / batch for people who do not want to choose them. They
depend on the base model's size: the demo model (64x64) learns a new shape in a few hundred
large-batch steps at a high rate (measured by ``rapid_diffusion_dev/bench/finetune_concept.py``), while a
512x512 PAI model needs a small rate (1e-5 .. 2e-6) and batch 1 with gradient accumulation.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError

from ..domains import DOMAIN_ID_PATTERN
from ..messages import field_refusals, validation_reason

MIXED_PRECISION = ("no", "fp16", "bf16")
PRIOR_PRESERVATION = ("off", "normal", "strong")
MAX_NAME_CHARS = 40


class TrainingError(RuntimeError):
    """The run cannot start or had to stop (bad data, no memory, NaN loss, disk full); the message says why."""


def _display_name(name: str) -> str:
    """A new model's display name: not blank, at most MAX_NAME_CHARS, no control characters nor / \\ < >."""
    text = name.strip()
    if not text:
        raise PydanticCustomError("name_blank", "give the new model a name")
    if len(text) > MAX_NAME_CHARS:
        raise PydanticCustomError("name_too_long", "at most {max_length} characters", {"max_length": MAX_NAME_CHARS})
    if any(unicodedata.category(c).startswith("C") or c in "/\\<>" for c in text):
        raise PydanticCustomError("name_characters", "no control characters nor / \\ < >")
    return name


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("blank_text", "must not be blank")
    return text


DisplayName = Annotated[str, AfterValidator(_display_name)]
NonBlank = Annotated[str, AfterValidator(_not_blank)]


def flag(name: str) -> dict:
    """A field's flag, where it is not ``--field-name`` (``Field(json_schema_extra=flag("--lr"))``)."""
    return {"flag": name}


class TrainConfig(BaseModel):
    """One fine-tuning run. Defaults are the "standard" preset of a 512x512 PAI base."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    base: str = Field(description="a domain id, a diffusers folder, or a hub id (owner/name)")
    data: Path = Field(description="folder, zip or TSV of image-text pairs")
    output: Path = Field(description="the new model's folder (a diffusers pipeline; run files and checkpoints/ beside)")
    name: DisplayName | None = Field(None, description="display name of the new model, e.g. 我的粉色 (Chinese allowed)")
    max_steps: int = Field(1000, ge=1, le=100_000, description="optimizer steps")
    learning_rate: float = Field(5e-6, gt=0, le=1, description="learning rate", json_schema_extra=flag("--lr"))
    batch_size: int = Field(1, ge=1, le=64, description="pairs per forward pass")
    gradient_accumulation_steps: int = Field(4, ge=1, le=64, description="forward passes per optimizer step")
    resolution: int | None = Field(None, ge=32, le=2048, multiple_of=8, description="default: the model's native size")
    train_text_encoder: bool = Field(True, description="train the text encoder too (as PAI-Diffusion does)")
    mixed_precision: Literal[MIXED_PRECISION] = Field("no", description="no, fp16 (GPU) or bf16")
    gradient_checkpointing: bool = Field(False, description="less activation memory, about 30% slower")
    use_ema: bool = Field(False, description="keep an exponential moving average of the UNet", json_schema_extra=flag("--ema"))
    use_8bit_adam: bool = Field(True, description="8-bit AdamW where bitsandbytes and a GPU exist")
    lr_scheduler: str = Field("constant_with_warmup", description="any diffusers get_scheduler name")
    lr_warmup_steps: int | None = Field(None, ge=0, description="default: 10% of the steps, at most 100")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping")
    center_crop: bool = Field(True, description="centre crop (else a random crop per draw)")
    random_flip: bool = Field(False, description="flip half of the draws left-right (off: captions saying 左/右 would lie)")
    seed: int = Field(0, ge=0, description="seed of training and of the validation images")
    checkpoint_every: int = Field(100, ge=0, description="steps between checkpoints (0 = only when stopped)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept")
    validation_prompts: list[NonBlank] = Field(
        default_factory=list, json_schema_extra=flag("--validation-prompt"),
        description="rendered every --validation-every steps (repeatable); default: the held-out pairs' captions",
    )
    holdout: int | None = Field(
        None, ge=0, le=64, description="pairs kept out of training for the validation loss (and prompts); default: 2 from 8 pairs, 4 from 32"
    )
    validation_every: int = Field(100, ge=0, description="steps between validations (0 = only before and after)")
    validation_inference_steps: int = Field(20, ge=1, description="denoising steps of the validation images")
    resume: bool = Field(False, description="continue from the newest complete checkpoint")
    domain_id: str | None = Field(
        None, pattern=f"^{DOMAIN_ID_PATTERN}$", description="id of the new domain (default: derived from --name, never taken)"
    )
    skip_preflight: bool = Field(False, description="start even if the memory estimate says it will not fit")
    knowledge: Path | None = Field(None, description="a knowledge graph folder (triples.tsv + entities.tsv): inject and train its entities")
    knowledge_lr: float | None = Field(None, gt=0, le=1, description="learning rate of the knowledge projection (default: 10x --lr)")
    embedding_lr_scale: float | None = Field(
        None, gt=0, le=100,
        description="the text encoder's token embeddings learn at this multiple of --lr (default: 3 on small bases, 1 on large ones)",
    )
    snr_gamma: float = Field(
        0.0, ge=0, le=100,
        description="min-SNR loss weighting: gamma (5 is usual; 0 = off): the noisiest steps, where backgrounds are decided, hardly train",
    )
    prior_preservation: Literal[PRIOR_PRESERVATION] = Field(
        "normal",
        description="keep what the base model knew (DreamBooth's prior preservation): off, normal or strong. Before training the base "
                    "draws pairs from prompts outside the upload (its domain's examples, the captions without their new words); "
                    "every step adds their loss at the weight PRIOR_WEIGHTS gives this choice",
    )
    unet_max_timestep: int | None = Field(
        None, ge=1, le=1000,
        description="the UNet learns only from timesteps below this one (of 1000); the noisiest ones, where each picture's ground "
                    "colour is decided, still teach the text encoder (default: 700 on small bases, 1000 = all on large ones)",
    )

    @classmethod
    def checked(cls, values: Mapping[str, Any], names: Mapping[str, tuple[str, str]] | None = None) -> TrainConfig:
        """``values`` (from flags or a form: strings and floats are converted where exact) as a config,
        or one :class:`TrainingError` listing every refusal, each option named as ``names`` says the face
        shows it (field -> (Chinese, English); default: the field's own name, as in run.json)."""
        return _refused_as_training_error(lambda: cls.model_validate(dict(values)), names)

    @property
    def projection_lr(self) -> float:
        """The knowledge projection starts at zero: it gets 10x the model's rate unless told."""
        return self.knowledge_lr if self.knowledge_lr is not None else 10 * self.learning_rate

    @property
    def prior_weight(self) -> float:
        return PRIOR_WEIGHTS[self.prior_preservation]

    @property
    def warmup_steps(self) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else min(100, self.max_steps // 10)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """A ``run.json``, read strictly (the JSON types :meth:`save` writes); unknown keys and values out of
        bounds are refused by their JSON key."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, ValueError) as exc:
            raise TrainingError(f"无法读取训练配置 / cannot read the run config {path}: {exc}") from exc
        return _refused_as_training_error(lambda: cls.model_validate_json(text, strict=True), {"": (Path(path).name,) * 2})


def _refused_as_training_error(validate, names: Mapping[str, tuple[str, str]] | None) -> TrainConfig:
    try:
        return validate()
    except ValidationError as exc:
        raise TrainingError(field_refusals(exc.errors(), names, known=", ".join(TrainConfig.model_fields))) from None


REQUIRED = tuple(name for name, info in TrainConfig.model_fields.items() if info.is_required())


def defaults() -> dict:
    """Every field's default (the required ones left out)."""
    return {
        name: info.get_default(call_default_factory=True)
        for name, info in TrainConfig.model_fields.items() if not info.is_required()
    }


# ----------------------------------------------------------------------------- command line


def flag_of(name: str) -> str:
    extra = TrainConfig.model_fields[name].json_schema_extra or {}
    return extra.get("flag") or "--" + name.replace("_", "-")


FLAG_NAMES = {name: (flag_of(name),) * 2 for name in TrainConfig.model_fields}


def _kind(annotation) -> Any:
    """``int | None`` -> int, ``list[str]`` -> list, ``Literal[...]`` -> the Literal."""
    if get_origin(annotation) is list:
        return list
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if args and get_origin(annotation) is not Literal else annotation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus ``--config run.json``; defaults and conversions are left to the model.

    Every flag defaults to "not given" (``SUPPRESS``), so that :func:`config_from_args` can layer
    the model's defaults, then the JSON config, then the flags that were typed. Values stay strings:
    pydantic converts them, so a wrong one is refused by the table of reasons, naming the flag.
    """
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="a run.json written by a job (flags override it)")
    schema = defaults()
    for name, info in TrainConfig.model_fields.items():
        kind = _kind(info.annotation)
        help_text = info.description.replace("%", "%%") + ("" if name in REQUIRED else f" (default: {schema[name]})")
        common = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag_of(name), action=argparse.BooleanOptionalAction, **common)
        elif kind is list:
            parser.add_argument(flag_of(name), action="append", **common)
        elif get_origin(kind) is Literal:
            parser.add_argument(flag_of(name), metavar="{" + ",".join(get_args(kind)) + "}", **common)
        else:
            parser.add_argument(flag_of(name), **common)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--config``'s JSON, then the flags given; base, data and output must be known."""
    values = TrainConfig.load(args.config).model_dump() if getattr(args, "config", None) else {}
    values.update({name: getattr(args, name) for name in TrainConfig.model_fields if hasattr(args, name)})
    missing = [flag_of(name) for name in REQUIRED if values.get(name) is None]
    if missing:
        raise TrainingError(f"缺少参数 / missing: {', '.join(missing)} (or --config run.json)")
    return TrainConfig.checked(values, FLAG_NAMES)


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """What a non-programmer picks instead of numbers; ``seconds_per_step`` is measured, if known."""

    key: str
    label: str
    max_steps: int
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int

    def values(self) -> dict:
        """The TrainConfig fields this preset sets."""
        return {name: getattr(self, name) for name in PRESET_FIELDS}

    @classmethod
    def of_defaults(cls, key: str) -> Preset:
        """The preset that is TrainConfig's own defaults."""
        schema = defaults()
        return cls(key, PRESET_LABELS[key], *(schema[name] for name in PRESET_FIELDS))


PRESET_FIELDS = ("max_steps", "learning_rate", "batch_size", "gradient_accumulation_steps")


PRESET_LABELS = {"quick": "快速预览 / quick look", "standard": "标准 / standard", "thorough": "精细 / thorough"}
DEFAULT_PRESET = "quick"

# Small bases (the 64x64 demo model): the quick preset (300 steps at batch 8, lr 2e-4, embeddings at
# 3x: EMBEDDING_LR_SCALE, the UNet below timestep 700: UNET_MAX_TIMESTEP) teaches the shipped v5
# model the never-named 粉色 (0% -> 92 / 88 / 83% pink over three training seeds) and the never-seen
# 半圆形 (0% -> 75 / 75 / 83%), old colours 91.7-100%; 400 or 450 steps did no better on v5, 500 worse
# on v3 (benchmarks/README.md). Large bases (512x512 PAI models):
# the usual full fine-tuning range, batch 1 with accumulation; "standard" is TrainConfig's defaults.
PRESETS = {
    "small": {
        "quick": Preset("quick", PRESET_LABELS["quick"], 300, 2e-4, 8, 1),
        "standard": Preset("standard", PRESET_LABELS["standard"], 800, 1e-4, 8, 1),
        "thorough": Preset("thorough", PRESET_LABELS["thorough"], 2000, 1e-4, 8, 1),
    },
    "large": {
        "quick": Preset("quick", PRESET_LABELS["quick"], 300, 1e-5, 1, 4),
        "standard": Preset.of_defaults("standard"),
        "thorough": Preset("thorough", PRESET_LABELS["thorough"], 3000, 2e-6, 1, 4),
    },
}
SMALL_BASE_SIDE = 128


def cadence(max_steps: int) -> int:
    """Validation images, validation loss and a checkpoint every fifth of a run started from the tab."""
    return max(10, max_steps // 5)


def preset_config(preset: Preset, **fields) -> TrainConfig:
    """The run a preset stands for, as the Fine-tune tab starts it (``fields`` add base, data, output...)."""
    every = cadence(preset.max_steps)
    return TrainConfig(**{**preset.values(), "validation_every": every, "checkpoint_every": every, **fields})


def size_class(native_side: int) -> str:
    return "small" if native_side <= SMALL_BASE_SIDE else "large"


def preset_for(key: str, native_side: int) -> Preset:
    return PRESETS[size_class(native_side)][key]


# Seconds per step of a whole quick-preset run without prior pairs (loading, validation, saving included), measured by
# ``python -m rapid_diffusion_dev.bench.finetune_concept --preset quick --threads 2 --prior-preservation off`` on the
# 2-core CPU machine with the demo model: v3 111 s (pink) and 137 s (half disc) for 300 steps, 0.41 s on average; v4
# 0.48 s on a day the same machine ran 1.2x slower throughout; v5 0.35 s on a faster day. Large bases have no
# measurement here: the tab shows the time left after the first steps instead.
SECONDS_PER_STEP = {("small", "cpu"): 0.41}
# With prior preservation, measured against a run without in the same session (the machine's load changes from day
# to day; the ratios less): a step trains on half a batch more (PRIOR_BATCH_SHARE), PRIOR_STEP_COST times as long;
# drawing one prior pair takes PRIOR_IMAGE_COST steps' time (benchmarks/README.md, 2026-12-05).
PRIOR_STEP_COST = {("small", "cpu"): 1.41}
PRIOR_IMAGE_COST = {("small", "cpu"): 0.47}

# The prior pairs, by base size: how many the base draws before training (DreamBooth's paper draws
# 200 per class, diffusers' script 100), and the weight of their loss for each choice of the tab's
# "keep what the model knew" (DreamBooth's prior_loss_weight is 1). On the demo world (uploads of only 24 pictures of
# a new colour or a new shape, quick preset, one training seed each): pink 100% learnt, outside prompts 100% kept
# (off: 100%, 94.3%); half disc 54%, 87.1% kept (off: 100%, 90.0%); normal at 0.5 taught the half disc only 12%.
# benchmarks/README.md has the runs.
PRIOR_IMAGES = {"small": 48, "large": 100}
PRIOR_WEIGHTS = {"off": 0.0, "normal": 1.0, "strong": 2.0}
# Prior pairs per step, as a share of the user's pairs in the batch: DreamBooth pairs them one to one;
# half keeps the step 1.5x (not 2x) as long, and the weight, not the count, sets how much they count.
PRIOR_BATCH_SHARE = 0.5
PRIOR_LABELS = {"off": "关闭 / off", "normal": "普通 / normal", "strong": "加强 / strong"}
# How many prompts from outside the upload the before/after comparison shows (the base's first examples).
OUTSIDE_SHOWN = 4

# How much faster than the rest the token embeddings learn, by base size. A character the base
# never saw (粉 in 粉色 for the demo model: its world has no such word) keeps its untrained
# embedding, norm 0.18 against 0.85 for trained ones; at the model's rate it moved 0.03 in the quick
# preset, and pink reached 58 / 71 / 67% over three training seeds (small objects drawn purple).
# At 3x: 83 / 71 / 75%, old colours 96-100% (with UNET_MAX_TIMESTEP since: 92 / 88 / 83%). The
# half-disc runs' lost old colours (71 / 75 / 96% at 3x; 1x: 92 / 87.5 / 96%) turned out to be
# small objects on grounds memorised from its world pairs, at either rate; UNET_MAX_TIMESTEP fixed
# them (91.7 / 91.7 / 95.8%). Boosting only the new word's row
# (10x or 30x) left pink at 58-62%: its neighbours have to move too. benchmarks/README.md has every
# run. Large bases were trained on every common character: no measurement, no change.
EMBEDDING_LR_SCALE = {"small": 3.0, "large": 1.0}


def embedding_lr_scale(config: TrainConfig, native_side: int) -> float:
    return config.embedding_lr_scale if config.embedding_lr_scale is not None else EMBEDDING_LR_SCALE[size_class(native_side)]


# The timesteps whose loss trains the UNet, by base size; above, the loss still trains the text
# encoder, through the UNet as it is. On the demo base (v-prediction, 1000 linear steps) the grounds
# are decided above ~700: a quick fine-tune there memorised the magenta grounds of 3 of its 48 pairs
# and guidance drew most images on magenta (37 of 48), losing old colours (half disc 54 / 46 / 83%,
# old colours 71 / 75 / 96% over three training seeds). With the UNet learning below 700: half disc
# 75 / 75 / 83%, old colours 91.7 / 91.7 / 95.8%; pink 92 / 88 / 83%, old colours 100 / 95.8 / 91.7%.
# Training nothing above 700 (neither the UNet nor the text) kept the grounds grey too but taught
# pink less (67 / 67%): the new word has to work at the noisiest steps as well. benchmarks/README.md
# has every run. Large bases: no measurement, no change.
UNET_MAX_TIMESTEP = {"small": 700, "large": None}


def unet_timestep_limit(config: TrainConfig, native_side: int) -> int | None:
    """The UNet learns from timesteps below this (None: from all)."""
    return config.unet_max_timestep if config.unet_max_timestep is not None else UNET_MAX_TIMESTEP[size_class(native_side)]


def prior_batch_size(batch_size: int) -> int:
    return max(1, round(batch_size * PRIOR_BATCH_SHARE))


def prior_images(native_side: int) -> int:
    return PRIOR_IMAGES[size_class(native_side)]


def estimate_seconds(preset: Preset, native_side: int, device: str, prior_preservation: str) -> float | None:
    """The whole run: the prior pairs' generation (when on) and the steps, from measured times; None unmeasured."""
    key = (size_class(native_side), device)
    per_step = SECONDS_PER_STEP.get(key)
    if per_step is None or prior_preservation == "off":
        return None if per_step is None else per_step * preset.max_steps
    return per_step * (PRIOR_STEP_COST[key] * preset.max_steps + PRIOR_IMAGE_COST[key] * prior_images(native_side))


# ----------------------------------------------------------------------------- names


def name_problem(name: str) -> str | None:
    """Why a display name cannot be used (Chinese first), or None: the model's own check of ``name``."""
    try:
        _DISPLAY_NAME.validate_python(name)
    except ValidationError as exc:
        return " / ".join(validation_reason(exc.errors()[0]))
    return None


_DISPLAY_NAME = TypeAdapter(DisplayName)


def derived_domain_id(name: str | None, output: Path) -> str:
    """``ft-<ascii slug of the name>-<6 hex of name + folder>``: stable for one run, distinct across runs."""
    text = (name or Path(output).name).strip()
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:40]
    digest = hashlib.sha1(f"{text}\0{Path(output).resolve()}".encode()).hexdigest()[:6]
    return "-".join(filter(None, ["ft", slug, digest]))
