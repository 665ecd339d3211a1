"""What the metrics share: the device they run on, and fixed-size batches from any iterable (so image
sets are decoded and scored a batch at a time)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

import torch

from ..settings import settings

T = TypeVar("T")


def default_device() -> torch.device:
    """``RAPID_DIFFUSION_DEVICE``, else CUDA where present, else the CPU."""
    return torch.device(settings().device or ("cuda" if torch.cuda.is_available() else "cpu"))


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
