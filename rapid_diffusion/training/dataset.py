"""The pairs as training batches: images resized once, cropped and flipped per draw; the held-out split."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from ..generation.pipeline import tokenize
from .pairs import Pair
from .options import TrainConfig


class PairDataset(torch.utils.data.Dataset):
    """Images resized once (short side = resolution), cropped and flipped per draw, with PIL/numpy."""

    def __init__(self, pairs: list[Pair], tokenizer, resolution: int, center_crop: bool, random_flip: bool, seed: int, knowledge=None):
        self.images = [resize_short_side(pair.image(), resolution) for pair in pairs]
        texts = [pair.text for pair in pairs]
        if knowledge is None:
            self.input_ids, self.entity_ids = tokenize(tokenizer, texts), None
        else:
            tokens = knowledge.tokenize(tokenizer, texts)
            self.input_ids, self.entity_ids = tokens.input_ids, tokens.entity_ids
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = crop(self.images[index], self.resolution, None if self.center_crop else self.rng)
        if self.random_flip and self.rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        item = {"pixel_values": to_tensor(image), "input_ids": self.input_ids[index]}
        if self.entity_ids is not None:
            item["entity_ids"] = self.entity_ids[index]
        return item


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    scale = side / min(image.size)
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def crop(image: Image.Image, side: int, rng: random.Random | None) -> Image.Image:
    """A ``side`` square: centred, or at a random offset when ``rng`` is given."""
    dx, dy = image.width - side, image.height - side
    left, top = (rng.randint(0, dx), rng.randint(0, dy)) if rng else (dx // 2, dy // 2)
    return image.crop((left, top, left + side, top + side))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], what the VAE encoder expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def split_holdout(pairs: list[Pair], config: TrainConfig) -> tuple[list[Pair], list[Pair]]:
    """Keep a few pairs out of training, seeded: their loss is the validation loss, and their
    captions are the validation prompts (the before/after comparison) unless prompts were given."""
    count = config.holdout
    if count is None:
        count = 4 if len(pairs) >= 32 else 2 if len(pairs) >= 8 else 0
    count = min(count, len(pairs) - 1)
    held = set(random.Random(config.seed).sample(range(len(pairs)), count)) if count > 0 else set()
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]



def holdout_batch(pairs: list[Pair], tokenizer, resolution: int, knowledge) -> dict:
    """The held-out pairs as one batch, centre-cropped and never flipped (the same every time)."""
    dataset = PairDataset(pairs, tokenizer, resolution, center_crop=True, random_flip=False, seed=0, knowledge=knowledge)
    return torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])



def seeded_batch(dataset: PairDataset, size: int, seed: int) -> dict:
    """``size`` items drawn without replacement (with, when there are fewer), by a seed: the prior
    pairs of a step are a function of the step, so a resumed run draws what it would have drawn."""
    rng = random.Random(seed)
    count = len(dataset)
    indices = rng.sample(range(count), size) if size <= count else [rng.randrange(count) for _ in range(size)]
    return torch.utils.data.default_collate([dataset[i] for i in indices])
