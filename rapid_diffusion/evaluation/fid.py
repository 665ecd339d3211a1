"""FID as pytorch-fid computes it: Inception pool3 features, their mean and covariance, the Fréchet distance.

    extractor = standard_extractor()                 # the published weights (downloaded once, sha256-checked)
    fid = frechet_distance(*feature_statistics(extractor(real_images)), *feature_statistics(extractor(fakes)))

The Fréchet distance is computed in float64 without scipy, by one of two exact routes for
``Tr sqrt(S1 S2)``. From features (:func:`fid`) with at most 2048 images per set: the nuclear norm of
``A1 A2^T / sqrt((n1 - 1)(n2 - 1))`` (A: centred features), whose singular values are the square roots
of the eigenvalues of ``S1 S2``; no 2048 x 2048 matrix is formed, and singular covariances (fewer images
than dimensions, the usual case) stay exact, where ``scipy.linalg.sqrtm`` warns and pytorch-fid may add
a diagonal offset. From statistics (:func:`frechet_distance`, and larger sets): the eigenvalues of the
symmetric ``sqrt(S1) S2 sqrt(S1)``, which has the same spectrum as ``S1 S2``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from ..messages import say
from .common import batched, default_device
from .inception import FEATURE_DIM, FIDInceptionV3, load_fid_state_dict, preprocess, seeded_state_dict
from .weights import FID_WEIGHTS_FILE, fid_weights_file, load_fid_weights

STAND_IN_SEED = 0


@dataclass
class FeatureExtractor:
    """Images -> pool3 features (N x 2048, float64). ``standard`` is False for the stand-in weights."""

    model: FIDInceptionV3
    name: str
    standard: bool
    device: torch.device
    batch_size: int = 16

    def __call__(self, images: Iterable[Image.Image]) -> np.ndarray:
        batches = [self._features(batch) for batch in batched(images, self.batch_size)]
        return np.concatenate(batches) if batches else np.empty((0, FEATURE_DIM))

    @torch.inference_mode()
    def _features(self, images: list[Image.Image]) -> np.ndarray:
        x = torch.stack([preprocess(image) for image in images]).to(self.device)
        return self.model(x).double().cpu().numpy()


def standard_extractor(weights: Path | None = None, device: torch.device | None = None) -> FeatureExtractor:
    """pytorch-fid's FID Inception with its published weights (``weights``: a local copy of the file).

    Raises :class:`~.weights.WeightsUnavailable` with a message naming the file and how to get it.
    """
    path = fid_weights_file(weights)
    return _extractor(load_fid_weights(path), f"pytorch-fid Inception v3 ({FID_WEIGHTS_FILE})", True, device)


def stand_in_extractor(seed: int = STAND_IN_SEED, device: torch.device | None = None) -> FeatureExtractor:
    """The same network with seeded random weights, for runs where the standard weights cannot be had.

    Its distances say whether two image sets differ in this fixed random feature space; they are not FID
    and are never reported as FID (the report names them ``fid_stand_in``, with this warning).
    """
    shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    return _extractor(seeded_state_dict(shapes, seed), say("stand_in_features", seed=seed), False, device)


def _extractor(state_dict: dict, name: str, standard: bool, device: torch.device | None) -> FeatureExtractor:
    device = device or default_device()
    model = load_fid_state_dict(FIDInceptionV3(), state_dict).to(device)
    return FeatureExtractor(model, name, standard, device)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N x D features, in float64, as pytorch-fid computes them."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(say("fid_too_few", count=len(features)))
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` between two Gaussians (see the module docstring)."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    product = root1 @ np.asarray(sigma2, np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below zero from rounding count as zero)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to two feature sets (N x D each; see the module docstring)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    for features in (a, b):
        if len(features) < 2:
            raise ValueError(say("fid_too_few", count=len(features)))
    centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    trace_sqrt = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum() / scale
    diff = a.mean(axis=0) - b.mean(axis=0)
    trace_a, trace_b = (centred_a**2).sum() / (len(a) - 1), (centred_b**2).sum() / (len(b) - 1)
    return float(diff @ diff + trace_a + trace_b - 2 * trace_sqrt)
