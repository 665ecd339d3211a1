"""What a user may ask for, and how a request is checked: the one validation every face relies on.

:class:`GenerationRequest` is filled with a domain's defaults and validated once
(:meth:`GenerationRequest.resolve`); each ``_check_*`` validator raises :class:`RequestError`,
which names the field and the allowed range in English and Chinese. :func:`inspect_prompt`
says which characters of a prompt fall outside the text encoder's window. Nothing here imports
torch or diffusers: a face can check a request before any model loads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from ..messages import say
from ..domains import SAMPLER_NAMES, DomainSpec
from ..settings import settings

MAX_SEED = 2**32 - 1


class RequestError(ValueError):
    """A request field is invalid. ``field`` names it; ``reason`` (English) and ``reason_zh``
    (Chinese) say the allowed range."""

    def __init__(self, field_name: str, message: str, zh: str):
        self.field = field_name
        self.reason = message
        self.reason_zh = zh
        super().__init__(f"{field_name}: {message}")


@dataclass(frozen=True)
class Limits:
    """Bounds a request must respect; a public host can tighten them through the environment."""

    max_prompt_chars: int = 1000
    max_steps: int = 150
    max_guidance: float = 30.0
    max_images: int = 8
    min_side: int = 64
    max_side: int = 1024

    def bounds(self) -> dict[str, tuple[int | float, int | float]]:
        """Each number's (lowest, highest) allowed value: what :meth:`GenerationRequest.validate`
        checks and what a face's schema (the JSON API's OpenAPI page) shows."""
        return {
            "num_inference_steps": (1, self.max_steps),
            "guidance_scale": (0.0, self.max_guidance),
            "num_images": (1, self.max_images),
            "seed": (0, MAX_SEED),
        }

    @classmethod
    def from_env(cls) -> "Limits":
        current = settings()
        return cls(max_images=current.max_images, max_side=current.max_side, max_steps=current.max_steps)


@dataclass(frozen=True)
class GenerationRequest:
    """What a user asks for. ``None`` means "the domain's default" until :meth:`resolve`."""

    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    sampler: str | None = None
    super_resolution: bool | None = None

    def resolve(self, spec: DomainSpec, limits: Limits | None = None) -> "GenerationRequest":
        """Fill the domain's defaults, pick a seed if none was given, and validate every field.

        A picked seed leaves room for the largest batch: image ``i`` uses ``seed + i``.
        """
        limits = limits or Limits.from_env()
        filled = replace(
            self,
            negative_prompt=spec.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            num_inference_steps=spec.num_inference_steps if self.num_inference_steps is None else self.num_inference_steps,
            guidance_scale=spec.guidance_scale if self.guidance_scale is None else self.guidance_scale,
            seed=random.randint(0, MAX_SEED + 1 - limits.max_images) if self.seed is None else self.seed,
            height=spec.height if self.height is None else self.height,
            width=spec.width if self.width is None else self.width,
            sampler=spec.sampler if self.sampler is None else self.sampler,
            super_resolution=spec.super_resolution if self.super_resolution is None else self.super_resolution,
        )
        filled.validate(limits)
        return filled

    def validate(self, limits: Limits) -> None:
        _check_text("prompt", self.prompt, limits.max_prompt_chars, required=True)
        _check_text("negative_prompt", self.negative_prompt, limits.max_prompt_chars, required=False)
        bounds = limits.bounds()
        _check_int("num_inference_steps", self.num_inference_steps, *bounds["num_inference_steps"])
        _check_number("guidance_scale", self.guidance_scale, *bounds["guidance_scale"])
        _check_int("num_images", self.num_images, *bounds["num_images"])
        _check_int("seed", self.seed, *bounds["seed"])
        if self.seed + self.num_images - 1 > MAX_SEED:
            raise RequestError(
                "seed",
                f"must be between 0 and {MAX_SEED + 1 - self.num_images} for {self.num_images} images "
                f"(image i uses seed + i, at most {MAX_SEED}), got {self.seed}",
                f"生成 {self.num_images} 张图时须在 0 到 {MAX_SEED + 1 - self.num_images} 之间（第 i 张用 seed + i）",
            )
        for name in ("height", "width"):
            _check_int(name, getattr(self, name), limits.min_side, limits.max_side)
            if getattr(self, name) % 8:
                raise RequestError(name, f"must be a multiple of 8, got {getattr(self, name)}", f"须为 8 的倍数（收到 {getattr(self, name)}）")
        if self.sampler not in SAMPLER_NAMES:
            raise RequestError(
                "sampler", f"must be one of {', '.join(SAMPLER_NAMES)}, got {self.sampler!r}", f"须为 {', '.join(SAMPLER_NAMES)} 之一"
            )
        if not isinstance(self.super_resolution, bool):
            raise RequestError("super_resolution", f"must be true or false, got {self.super_resolution!r}", "须为 true 或 false")


def _check_text(name: str, value: Any, max_chars: int, required: bool) -> None:
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {type(value).__name__}", "须为文本")
    if required and not value.strip():
        raise RequestError(name, "must not be empty", "不能为空")
    if len(value) > max_chars:
        raise RequestError(name, f"must be at most {max_chars} characters, got {len(value)}", f"最多 {max_chars} 个字符（收到 {len(value)} 个）")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        raise RequestError(
            name,
            f"must be valid Unicode text; a lone surrogate U+{code:04X} is at position {exc.start}",
            f"含无效字符（第 {exc.start} 位的孤立代理 U+{code:04X}）",
        ) from None


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer between {low} and {high}, got {value!r}", f"须为 {low} 到 {high} 之间的整数")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}", f"须在 {low} 到 {high} 之间（收到 {value}）")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(name, f"must be a number between {low} and {high}, got {value!r}", f"须为 {low} 到 {high} 之间的数")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}", f"须在 {low} 到 {high} 之间（收到 {value}）")


@dataclass(frozen=True)
class PromptReport:
    """How the prompt fits the text encoder's window (BERT tokens, one per Chinese character)."""

    num_tokens: int
    max_tokens: int
    dropped_text: str = ""
    mostly_latin: bool = False

    @property
    def truncated(self) -> bool:
        return bool(self.dropped_text)

    def notes(self) -> list[str]:
        """What the user should know about this prompt (each a bilingual sentence); empty when all is well."""
        notes = []
        if self.mostly_latin:
            notes.append(say("prompt_not_chinese"))
        if self.truncated:
            notes.append(say("prompt_truncated", window=self.max_tokens, count=len(self.dropped_text), dropped=self.dropped_text))
        return notes


def inspect_prompt(tokenizer, text: str) -> PromptReport:
    """Count the prompt's tokens and say which characters fall outside the encoder's window."""
    max_tokens = int(tokenizer.model_max_length)
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    latin = mostly_latin(text)
    if len(ids) <= max_tokens:
        return PromptReport(len(ids), max_tokens, mostly_latin=latin)
    last_kept = encoded["offset_mapping"][max_tokens - 2]
    return PromptReport(len(ids), max_tokens, text[last_kept[1]:].strip(), latin)


def mostly_latin(text: str) -> bool:
    """More Latin letters than Chinese characters: an English prompt, which these models (trained on
    Chinese captions) read as noise."""
    latin = sum(1 for c in text if c.isascii() and c.isalpha())
    chinese = sum(1 for c in text if "\u3400" <= c <= "\u9fff" or "\uf900" <= c <= "\ufaff")
    return latin > chinese
