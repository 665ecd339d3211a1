"""What an evaluation run reports, as plain JSON: how the images were made, and what was measured.

Metric names: ``fid`` (standard Inception weights only), ``fid_stand_in`` (the labelled stand-in
features, never called FID), ``clip_score`` (Chinese CLIP, 0-100), ``R@1`` / ``R@5`` / ``R@10``
(text-to-image retrieval over the real pairs). A metric that could not be computed is absent from
``metrics`` and present in ``unavailable`` with the message that says why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SEED_RULE = "image j of caption i uses seed + i * images_per_caption + j"


@dataclass(frozen=True)
class Sampling:
    """How every evaluated image was generated (the domain's defaults already filled in)."""

    model: str
    seed: int
    steps: int
    sampler: str
    guidance: float
    width: int
    height: int
    negative_prompt: str
    super_resolution: bool = False
    images_per_caption: int = 1

    def first_seed(self, caption_index: int) -> int:
        return self.seed + caption_index * self.images_per_caption


@dataclass
class EvalReport:
    sampling: Sampling
    data: str
    num_captions: int
    num_real: int
    num_generated: int
    metrics: dict[str, float] = field(default_factory=dict)
    feature_extractor: str | None = None
    clip_model: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    items: list[dict] = field(default_factory=list)
    seed_rule: str = SEED_RULE

    def as_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), ensure_ascii=False, indent=2), encoding="utf-8")
        return path

    def summary_lines(self) -> list[str]:
        """The figures as lines for a terminal; missing metrics with their message."""
        s = self.sampling
        lines = [
            f"{self.num_generated} images from {self.num_captions} captions ({s.images_per_caption} each), "
            f"{self.num_real} real images; {s.model}, {s.sampler}, {s.steps} steps, guidance {s.guidance:g}, seed {s.seed}",
        ]
        lines += [f"{name}: {value:.4f}" for name, value in self.metrics.items()]
        if self.feature_extractor:
            lines.append(f"features: {self.feature_extractor}")
        lines += [f"{name} unavailable: {message}" for name, message in self.unavailable.items()]
        return lines
