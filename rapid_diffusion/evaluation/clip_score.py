"""Chinese CLIP score and text-to-image retrieval through transformers' ``ChineseCLIPModel``.

CLIP score (Hessel et al.'s CLIPScore convention, as torchmetrics reports it): ``100 * max(cos, 0)``
between a caption's and its image's embeddings, averaged over pairs. Retrieval (the paper's Table 2):
each caption ranks every image of the set by cosine; R@K is the share of captions with one of their
own images among the first K. The Fine-tune tab and the CLI both call :meth:`ChineseClip.pair_scores`.

    clip = ChineseClip.load()                       # OFA-Sys/chinese-clip-vit-base-patch16, cached by the hub
    clip_score(clip, [("一碗牛肉拉面", image), ...])  # -> 31.2
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import huggingface_hub.constants
import numpy as np
import torch
from PIL import Image
from transformers import ChineseCLIPModel, ChineseCLIPProcessor

from ..messages import say
from ..settings import settings
from .common import batched, default_device
from .weights import WeightsUnavailable

DEFAULT_CLIP_MODEL = "OFA-Sys/chinese-clip-vit-base-patch16"
RECALL_KS = (1, 5, 10)
BATCH_SIZE = 32

Pair = tuple[str, Image.Image]


@dataclass
class ChineseClip:
    """A Chinese CLIP model with its processor (PIL image preprocessing: no torchvision needed)."""

    model: ChineseCLIPModel
    processor: ChineseCLIPProcessor
    name: str
    device: torch.device

    @classmethod
    def load(cls, name_or_path: str = DEFAULT_CLIP_MODEL, device: torch.device | None = None) -> "ChineseClip":
        """From the hub (downloaded on first use, then cached) or a local folder; offline and not cached:
        :class:`~.weights.WeightsUnavailable` saying what is missing and how to get it."""
        offline = settings().hub_offline
        try:
            processor = ChineseCLIPProcessor.from_pretrained(name_or_path, backend="pil", local_files_only=offline)
            model = ChineseCLIPModel.from_pretrained(name_or_path, local_files_only=offline)
        except (OSError, ValueError) as exc:  # not cached offline, no such repo or folder, network errors
            raise _unavailable(str(name_or_path), exc) from exc
        device = device or default_device()
        return cls(model.to(device).eval(), processor, str(name_or_path), device)

    @property
    def max_text_tokens(self) -> int:
        return min(self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    @torch.inference_mode()
    def text_embeddings(self, texts: Iterable[str]) -> torch.Tensor:
        """Unit-length text embeddings (one row per text, projection_dim wide), float32 on the CPU."""
        chunks = []
        for batch in batched(texts, BATCH_SIZE):
            inputs = self.processor.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
            ).to(self.device)
            chunks.append(self.model.get_text_features(**inputs).pooler_output)
        return _unit(torch.cat(chunks))

    @torch.inference_mode()
    def image_embeddings(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """Unit-length image embeddings (one row per image), float32 on the CPU; images are read a batch at a time."""
        chunks = []
        for batch in batched(images, BATCH_SIZE):
            pixels = self.processor.image_processor(images=[image.convert("RGB") for image in batch], return_tensors="pt")["pixel_values"]
            chunks.append(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)).pooler_output)
        return _unit(torch.cat(chunks))

    def pair_cosines(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """The cosine between each caption's and its image's embedding."""
        texts = self.text_embeddings([text for text, _ in pairs])
        return (texts * self.image_embeddings([image for _, image in pairs])).sum(dim=1)

    def pair_scores(self, pairs: Sequence[Pair]) -> list[float]:
        """``100 * max(cos, 0)`` of each (caption, image) pair."""
        return (100 * self.pair_cosines(pairs).clamp(min=0)).tolist() if pairs else []


def _unavailable(name: str, exc: Exception) -> WeightsUnavailable:
    """What is missing and how to get it; offline, where the hub cache is (the library's error says neither)."""
    if settings().hub_offline and not Path(name).exists():
        return WeightsUnavailable(say("clip_model_offline", model=name, cache=huggingface_hub.constants.HF_HUB_CACHE))
    reason = f"{type(exc).__name__}: {str(exc).split('. ')[0][:200]}"
    return WeightsUnavailable(say("clip_model_unavailable", model=name, reason=reason))


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu()


def clip_score(clip: ChineseClip, pairs: Sequence[Pair]) -> float:
    """The mean CLIP score of the pairs (what the report and the Fine-tune tab show)."""
    return float(np.mean(clip.pair_scores(pairs)))


def retrieval_recall(clip: ChineseClip, texts: Sequence[str], images: Iterable[Image.Image], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Text-to-image R@K over pairs (``texts[j]``, ``images[j]``); a caption's own images are those paired with
    the same text. ``images`` may be a generator: they are decoded a batch at a time."""
    similarity = (clip.text_embeddings(texts) @ clip.image_embeddings(images).T).numpy()
    return recall_at_k(similarity, texts, ks)


def recall_at_k(similarity: np.ndarray, texts: Sequence[str], ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """R@K from a caption x image similarity matrix whose image ``j`` belongs to caption ``texts[j]``.

    A caption's rank is the number of other captions' images scored strictly above its best own image
    (ties count in the caption's favour). Queries are the distinct captions.
    """
    texts = list(texts)
    queries = list(dict.fromkeys(texts))
    ranks = []
    for query in queries:
        row = similarity[texts.index(query)]
        own = np.array([text == query for text in texts])
        ranks.append(int((row[~own] > row[own].max()).sum()))
    ranks = np.array(ranks)
    return {f"R@{k}": float((ranks < k).mean()) for k in ks}
