"""The one schema of fine-tuning options: :class:`TrainConfig`, its command-line flags, its JSON, its presets.

Every default is written once, on a dataclass field; the ``train`` flags are generated from the
fields (like ``transformers.HfArgumentParser``, without importing transformers), a job hands its
config to the trainer as ``run.json`` (``train --config run.json``), and the Fine-tune tab takes
its defaults from here. No torch import: the CLI parser and the web UI load this cheaply.

Presets replace steps / learning rate / batch for people who do not want to choose them. They
depend on the base model's size: the demo model (64x64) learns a new shape in a few hundred
large-batch steps at a high rate (measured by ``rapid_diffusion_dev/bench/finetune_concept.py``), while a
512x512 PAI model needs a small rate (1e-5 .. 2e-6) and batch 1 with gradient accumulation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import unicodedata
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import get_type_hints

from ..domains import DOMAIN_ID_PATTERN

MIXED_PRECISION = ("no", "fp16", "bf16")
PRIOR_PRESERVATION = ("off", "normal", "strong")
MAX_NAME_CHARS = 40


class TrainingError(RuntimeError):
    """The run cannot start or had to stop (bad data, no memory, NaN loss, disk full); the message says why."""


def option(default=MISSING, *, help: str, flag: str | None = None, choices=None, factory=None):
    """A dataclass field with its command-line help (and flag name, when not ``--field-name``)."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """One fine-tuning run. Defaults are the "standard" preset of a 512x512 PAI base."""

    base: str = option(help="a domain id, a diffusers folder, or a hub id (owner/name)")
    data: Path = option(help="folder, zip or TSV of image-text pairs")
    output: Path = option(help="the new model's folder (a diffusers pipeline; run files and checkpoints/ beside)")
    name: str | None = option(None, help="display name of the new model, e.g. 我的粉色 (Chinese allowed)")
    max_steps: int = option(1000, help="optimizer steps")
    learning_rate: float = option(5e-6, flag="--lr", help="learning rate")
    batch_size: int = option(1, help="pairs per forward pass")
    gradient_accumulation_steps: int = option(4, help="forward passes per optimizer step")
    resolution: int | None = option(None, help="default: the model's native size")
    train_text_encoder: bool = option(True, help="train the text encoder too (as PAI-Diffusion does)")
    mixed_precision: str = option("no", choices=MIXED_PRECISION, help="no, fp16 (GPU) or bf16")
    gradient_checkpointing: bool = option(False, help="less activation memory, about 30%% slower")
    use_ema: bool = option(False, flag="--ema", help="keep an exponential moving average of the UNet")
    use_8bit_adam: bool = option(True, help="8-bit AdamW where bitsandbytes and a GPU exist")
    lr_scheduler: str = option("constant_with_warmup", help="any diffusers get_scheduler name")
    lr_warmup_steps: int | None = option(None, help="default: 10%% of the steps, at most 100")
    max_grad_norm: float = option(1.0, help="gradient clipping")
    center_crop: bool = option(True, help="centre crop (else a random crop per draw)")
    random_flip: bool = option(False, help="flip half of the draws left-right (off: captions saying 左/右 would lie)")
    seed: int = option(0, help="seed of training and of the validation images")
    checkpoint_every: int = option(100, help="steps between checkpoints (0 = only when stopped)")
    keep_checkpoints: int = option(2, help="complete checkpoints kept")
    validation_prompts: list[str] = option(
        flag="--validation-prompt", factory=list,
        help="rendered every --validation-every steps (repeatable); default: the held-out pairs' captions",
    )
    holdout: int | None = option(None, help="pairs kept out of training for the validation loss (and prompts); default: 2 from 8 pairs, 4 from 32")
    validation_every: int = option(100, help="steps between validations (0 = only before and after)")
    validation_inference_steps: int = option(20, help="denoising steps of the validation images")
    resume: bool = option(False, help="continue from the newest complete checkpoint")
    domain_id: str | None = option(None, help="id of the new domain (default: derived from --name, never taken)")
    skip_preflight: bool = option(False, help="start even if the memory estimate says it will not fit")
    knowledge: Path | None = option(None, help="a knowledge graph folder (triples.tsv + entities.tsv): inject and train its entities")
    knowledge_lr: float | None = option(None, help="learning rate of the knowledge projection (default: 10x --lr)")
    embedding_lr_scale: float | None = option(
        None, help="the text encoder's token embeddings learn at this multiple of --lr (default: 3 on small bases, 1 on large ones)"
    )
    snr_gamma: float = option(
        0.0, help="min-SNR loss weighting: gamma (5 is usual; 0 = off): the noisiest steps, where backgrounds are decided, hardly train"
    )
    prior_preservation: str = option(
        "normal", choices=PRIOR_PRESERVATION,
        help="keep what the base model knew (DreamBooth's prior preservation): off, normal or strong. Before training the base "
             "draws pairs from prompts outside the upload (its domain's examples, the captions without their new words); "
             "every step adds their loss at the weight PRIOR_WEIGHTS gives this choice",
    )
    unet_max_timestep: int | None = option(
        None, help="the UNet learns only from timesteps below this one (of 1000); the noisiest ones, where each picture's ground "
                   "colour is decided, still teach the text encoder (default: 700 on small bases, 1000 = all on large ones)"
    )

    def validate(self) -> None:
        """Bounds that keep a request from a browser or an API reasonable; raises TrainingError."""
        checks = [
            (1 <= self.max_steps <= 100_000, "训练步数应在 1 到 100000 之间 / max_steps must be between 1 and 100000"),
            (0 < self.learning_rate <= 1, "学习率应在 (0, 1] 之间 / learning rate must be in (0, 1]"),
            (1 <= self.batch_size <= 64, "批大小应在 1 到 64 之间 / batch size must be between 1 and 64"),
            (1 <= self.gradient_accumulation_steps <= 64, "梯度累积应在 1 到 64 之间 / gradient accumulation must be between 1 and 64"),
            (self.resolution is None or (32 <= self.resolution <= 2048 and self.resolution % 8 == 0),
             "分辨率应为 32 到 2048 之间 8 的倍数 / resolution must be a multiple of 8 between 32 and 2048"),
            (self.mixed_precision in MIXED_PRECISION, f"混合精度只能是 / mixed precision must be one of {', '.join(MIXED_PRECISION)}"),
            (self.domain_id is None or re.fullmatch(DOMAIN_ID_PATTERN, self.domain_id) is not None,
             "领域 id 只能含小写字母、数字、- 和 _ / domain id: lowercase letters, digits, '-' or '_' (max 64)"),
            (self.holdout is None or 0 <= self.holdout <= 64, "验证对数应在 0 到 64 之间 / holdout must be between 0 and 64"),
            (self.embedding_lr_scale is None or 0 < self.embedding_lr_scale <= 100,
             "词向量学习率倍数应在 (0, 100] 之间 / embedding_lr_scale must be in (0, 100]"),
            (0 <= self.snr_gamma <= 100, "min-SNR gamma 应在 [0, 100] 之间 / snr_gamma must be in [0, 100]"),
            (self.unet_max_timestep is None or 1 <= self.unet_max_timestep <= 1000,
             "UNet 最大时间步应在 1 到 1000 之间 / unet_max_timestep must be between 1 and 1000"),
            (self.prior_preservation in PRIOR_PRESERVATION,
             f"保留原有能力只能是 / prior preservation must be one of {', '.join(PRIOR_PRESERVATION)}"),
            (self.name is None or name_problem(self.name) is None, name_problem(self.name or "") or ""),
            (all(p.strip() for p in self.validation_prompts), "验证提示词不能为空白 / a validation prompt is blank"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise TrainingError("; ".join(problems))

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

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        """The inverse of :meth:`to_json`; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainingError(f"未知的训练选项 / unknown training options: {', '.join(unknown)}")
        return cls(**{k: _as_field_type(k, v) for k, v in data.items()})

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TrainingError(f"无法读取训练配置 / cannot read the run config {path}: {exc}") from exc
        return cls.from_json(data)


REQUIRED = ("base", "data", "output")


def defaults() -> dict:
    """Every field's default (the required ones left out)."""
    values = {}
    for f in fields(TrainConfig):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    return values


def _types() -> dict:
    return get_type_hints(TrainConfig)


def _base_type(annotation):
    """``int | None`` -> int, ``list[str]`` -> list, ``Path`` -> Path."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if getattr(annotation, "__origin__", None) is list:
        return list
    return args[0] if args and getattr(annotation, "__origin__", None) is not list else annotation


def _as_field_type(name: str, value):
    kind = _base_type(_types()[name])
    if value is None or kind in (list, str, bool, int, float):
        return list(value) if kind is list and value is not None else value
    return kind(value)


# ----------------------------------------------------------------------------- command line


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, plus ``--config run.json``; defaults are left to the dataclass.

    Every flag defaults to "not given" (``SUPPRESS``), so that :func:`config_from_args` can layer
    dataclass defaults, then the JSON config, then the flags that were typed.
    """
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="a run.json written by a job (flags override it)")
    types = _types()
    for f in fields(TrainConfig):
        kind = _base_type(types[f.name])
        default = defaults().get(f.name)
        help_text = f.metadata["help"] + ("" if f.name in REQUIRED else f" (default: {default})")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **common)
        elif kind is list:
            parser.add_argument(flag_of(f), action="append", **common)
        else:
            parser.add_argument(flag_of(f), type=kind, choices=f.metadata.get("choices"), **common)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, then ``--config``'s JSON, then the flags given; base, data and output must be known."""
    values = TrainConfig.load(args.config).to_json() if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    missing = [f"--{name}" for name in REQUIRED if values.get(name) is None]
    if missing:
        raise TrainingError(f"缺少参数 / missing: {', '.join(missing)} (or --config run.json)")
    return TrainConfig.from_json(values)


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
        return {
            "max_steps": self.max_steps, "learning_rate": self.learning_rate,
            "batch_size": self.batch_size, "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }


PRESET_LABELS = {"quick": "快速预览 / quick look", "standard": "标准 / standard", "thorough": "精细 / thorough"}
DEFAULT_PRESET = "quick"

# Small bases (the 64x64 demo model): the quick preset (300 steps at batch 8, lr 2e-4, embeddings at
# 3x: EMBEDDING_LR_SCALE, the UNet below timestep 700: UNET_MAX_TIMESTEP) teaches the shipped v5
# model the never-named 粉色 (0% -> 92 / 88 / 83% pink over three training seeds) and the never-seen
# 半圆形 (0% -> 75 / 75 / 83%), old colours 91.7-100%; 400 or 450 steps did no better on v5, 500 worse
# on v3 (benchmarks/README.md). Large bases (512x512 PAI models):
# the usual full fine-tuning range, batch 1 with accumulation; "standard" equals TrainConfig's defaults.
PRESETS = {
    "small": {
        "quick": Preset("quick", PRESET_LABELS["quick"], 300, 2e-4, 8, 1),
        "standard": Preset("standard", PRESET_LABELS["standard"], 800, 1e-4, 8, 1),
        "thorough": Preset("thorough", PRESET_LABELS["thorough"], 2000, 1e-4, 8, 1),
    },
    "large": {
        "quick": Preset("quick", PRESET_LABELS["quick"], 300, 1e-5, 1, 4),
        "standard": Preset("standard", PRESET_LABELS["standard"], 1000, 5e-6, 1, 4),
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
    """Why a display name cannot be used (Chinese first), or None."""
    text = name.strip()
    if not text:
        return "请给新模型起个名字 / give the new model a name"
    if len(text) > MAX_NAME_CHARS:
        return f"名字最多 {MAX_NAME_CHARS} 个字 / the name has at most {MAX_NAME_CHARS} characters"
    if any(unicodedata.category(c).startswith("C") or c in "/\\<>" for c in text):
        return "名字不能含控制字符或 / \\ < > / the name cannot contain control characters or / \\ < >"
    return None


def derived_domain_id(name: str | None, output: Path) -> str:
    """``ft-<ascii slug of the name>-<6 hex of name + folder>``: stable for one run, distinct across runs."""
    text = (name or Path(output).name).strip()
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:40]
    digest = hashlib.sha1(f"{text}\0{Path(output).resolve()}".encode()).hexdigest()[:6]
    return "-".join(filter(None, ["ft", slug, digest]))
