"""One evaluation run: images generated from a test set's captions, scored against its real pictures.

Generation comes in as a callable (``generate(caption, first_seed, count) -> images``), so this module
needs no model code: the CLI passes the app's own service, a notebook any pipeline. Generated images are
scored as they come (:class:`GeneratedScores`), so no image set is held in memory.

    metrics = load_metrics()                                   # before generating: missing weights are known at once
    report = evaluate_generation(pairs, generate, sampling, metrics, data="test.tsv", out=Path("eval-out"))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..messages import say
from .clip_score import DEFAULT_CLIP_MODEL, ChineseClip, retrieval_recall
from .fid import FeatureExtractor, fid, stand_in_extractor, standard_extractor
from .report import EvalReport, Sampling
from .weights import WeightsUnavailable

IMAGES_DIR = "images"
REPORT_FILE = "report.json"
RETRIEVAL = "R@K"

GenerateFn = Callable[[str, int, int], list[Image.Image]]


class RealPair(Protocol):
    """A test pair: its caption and its real picture (decoded on demand; ``training.data.Pair`` is one)."""

    text: str

    def image(self) -> Image.Image: ...


@dataclass
class Metrics:
    """What a run can measure, loaded before any image is generated; ``unavailable`` says why not, per metric."""

    features: FeatureExtractor | None = None
    clip: ChineseClip | None = None
    retrieval: bool = False
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def fid_name(self) -> str:
        """``fid`` for the standard weights; the stand-in's figure is never called FID."""
        return "fid" if self.features is None or self.features.standard else "fid_stand_in"

    @property
    def anything(self) -> bool:
        return self.features is not None or self.clip is not None


def load_metrics(fid_weights: Path | None = None, stand_in: bool = False, clip_model: str | None = None) -> Metrics:
    """FID features (standard, from ``fid_weights`` or the cache or a download; or the stand-in) and the
    Chinese CLIP model (``clip_model``, else the default); naming ``clip_model`` also asks for R@K."""
    metrics = Metrics(retrieval=clip_model is not None)
    try:
        metrics.features = stand_in_extractor() if stand_in else standard_extractor(fid_weights)
    except WeightsUnavailable as exc:
        metrics.unavailable[metrics.fid_name] = str(exc)
    try:
        metrics.clip = ChineseClip.load(clip_model or DEFAULT_CLIP_MODEL)
    except WeightsUnavailable as exc:
        metrics.unavailable["clip_score"] = str(exc)
        if metrics.retrieval:
            metrics.unavailable[RETRIEVAL] = str(exc)
    return metrics


def evaluate_generation(
    real: Sequence[RealPair],
    generate: GenerateFn,
    sampling: Sampling,
    metrics: Metrics,
    *,
    data: str,
    out: Path | None = None,
    progress: bool = True,
) -> EvalReport:
    """Generate ``sampling.images_per_caption`` images per caption, then FID (generated vs real), CLIP score
    (generated vs their captions) and, where asked, R@K (real pairs); ``out`` gets report.json and the images."""
    start = time.perf_counter()
    report = EvalReport(
        sampling, data, num_captions=len(real), num_real=len(real), num_generated=0,
        feature_extractor=metrics.features.name if metrics.features else None,
        clip_model=metrics.clip.name if metrics.clip else None, unavailable=dict(metrics.unavailable),
    )
    features = metrics.features
    if features is not None and len(real) < 2:
        report.unavailable[metrics.fid_name] = say("fid_too_few", count=len(real))
        features = None
    tally = GeneratedScores(features, metrics.clip)
    for i, pair in enumerate(tqdm(real, desc="生成 generating", unit="caption", disable=not progress)):
        images = generate(pair.text, sampling.first_seed(i), sampling.images_per_caption)
        seeds = list(range(sampling.first_seed(i), sampling.first_seed(i) + len(images)))
        item = {"caption": pair.text, "seeds": seeds, **tally.add(pair.text, images)}
        if out is not None:
            item["files"] = save_images(images, seeds, out / IMAGES_DIR, i)
        report.items.append(item)
        report.num_generated += len(images)
    if features is not None:
        report.metrics[metrics.fid_name] = fid(features(pair.image() for pair in real), tally.features_so_far())
    if tally.clip_scores:
        report.metrics["clip_score"] = float(np.mean(tally.clip_scores))
    if metrics.retrieval and metrics.clip is not None:
        report.metrics.update(retrieval_recall(metrics.clip, [pair.text for pair in real], (pair.image() for pair in real)))
    report.seconds = round(time.perf_counter() - start, 2)
    if out is not None:
        report.save(out / REPORT_FILE)
    return report


@dataclass
class GeneratedScores:
    """Scores of generated images as they come: CLIP per caption, Inception features per full batch
    (the network is fastest on full batches; no image is kept once scored)."""

    features: FeatureExtractor | None
    clip: ChineseClip | None
    feature_batches: list[np.ndarray] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)
    clip_scores: list[float] = field(default_factory=list)

    def add(self, caption: str, images: list[Image.Image]) -> dict:
        """Score one caption's images; returns what the report's item keeps (its CLIP scores)."""
        if self.features is not None:
            self.pending += images
            if len(self.pending) >= self.features.batch_size:
                self._flush()
        if self.clip is None:
            return {}
        scores = self.clip.pair_scores([(caption, image) for image in images])
        self.clip_scores += scores
        return {"clip_scores": scores}

    def features_so_far(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.feature_batches)

    def _flush(self) -> None:
        if self.pending:
            self.feature_batches.append(self.features(self.pending))
            self.pending = []


def save_images(images: list[Image.Image], seeds: list[int], folder: Path, caption_index: int) -> list[str]:
    """PNG files ``<caption index>-<seed>.png``; returns their names relative to the run's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for image, seed in zip(images, seeds):
        path = folder / f"{caption_index:05d}-{seed}.png"
        image.save(path)
        names.append(f"{folder.name}/{path.name}")
    return names
