"""The before/after figures of a run, from the same-seed images and the fit loss (written to ``comparison.json``).

- **Closer to the uploads**: the loss on the held-out pairs (else a few training pairs) at fixed
  timesteps and noise, before and after (``Validator``).
- **Outside prompts changed**: the mean absolute pixel difference between the same-seed images of
  the prompts from outside the upload before and after (0% unchanged, 100% black to white); on the
  demo base, the demo judge's colour / shape / position score before and after.
- **Chinese CLIP score** (``evaluation.clip_score``) on the validation prompts and the outside
  prompts, before and after, where the CLIP weights are already on this machine (never downloaded
  at the end of a run); else one bilingual line says it was not computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..paths import DEMO_MODEL_DIR
from .run_files import OUTSIDE_DIR, SAMPLES_DIR, RunFiles, read_comparison, step_folder, step_folders

JUDGED = ("colour", "shape", "position")


def judge_applies(base_folder: Path) -> bool:
    """The demo judge knows only the demo world: the shipped demo model is the base."""
    return Path(base_folder).resolve() == Path(DEMO_MODEL_DIR).resolve()


def images_of(folder: Path) -> list[Image.Image]:
    paths = sorted(Path(folder).glob("*.png"), key=lambda p: int(p.stem)) if Path(folder).is_dir() else []
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def pixel_change(before: list[Image.Image], after: list[Image.Image]) -> float:
    """Mean absolute difference of same-seed images, in % of the full scale."""
    pairs = [(np.asarray(b, dtype=np.float32), np.asarray(a, dtype=np.float32)) for b, a in zip(before, after)]
    return float(np.mean([np.abs(b - a).mean() / 255 * 100 for b, a in pairs]))


def judged_score(images: list[Image.Image], prompts: list[str]) -> float:
    """The demo judge's mean colour / shape / position score (what the fine-tune benchmark reports)."""
    from ..demo.judge import judge

    scores = [judge(image, prompt) for image, prompt in zip(images, prompts)]
    return float(np.mean([np.mean([s[k] for k in JUDGED if k in s]) for s in scores]))


def clip_figures(validation_prompts: list[str], outside_prompts: list[str], folders: dict[str, tuple[Path, Path]]) -> dict:
    """CLIP scores before/after, or ``{"clip_unavailable": True}`` when no weights are here."""
    clip = local_clip()
    if clip is None:
        return {"clip_unavailable": True}
    from ..evaluation.clip_score import clip_score

    figures = {}
    for name, prompts in (("held_out", validation_prompts), ("outside", outside_prompts)):
        if not prompts:
            continue
        before, after = folders[name]
        figures[f"{name}_before"] = clip_score(clip, list(zip(prompts, images_of(before))))
        figures[f"{name}_after"] = clip_score(clip, list(zip(prompts, images_of(after))))
    return {"clip": figures}


def local_clip():
    """The default Chinese CLIP model from the hub cache, or None: nothing is downloaded here."""
    from huggingface_hub import snapshot_download

    from ..evaluation.clip_score import DEFAULT_CLIP_MODEL, ChineseClip
    from ..evaluation.weights import WeightsUnavailable

    try:
        return ChineseClip.load(snapshot_download(DEFAULT_CLIP_MODEL, local_files_only=True))
    except (OSError, ValueError, WeightsUnavailable):
        return None


def finish_comparison(files: RunFiles, base_folder: Path, validation_prompts: list[str], outside_prompts: list[str],
                      fit_loss_after: float | None, final_step: int) -> dict:
    """Measure the "after" figures against the "before" ones recorded at step 0; write and return them all."""
    samples, outside = step_folders(files.folder / SAMPLES_DIR), step_folders(files.folder / OUTSIDE_DIR)
    before_outside, after_outside = step_folder(files.folder / OUTSIDE_DIR, 0), step_folder(files.folder / OUTSIDE_DIR, final_step)
    figures: dict = {"outside_prompts": outside_prompts}
    if fit_loss_after is not None:
        figures["fit_loss_after"] = fit_loss_after
    before_images, after_images = images_of(before_outside), images_of(after_outside)
    if outside and before_outside != after_outside and before_images and len(before_images) == len(after_images):
        figures["outside_changed"] = pixel_change(before_images, after_images)
        if judge_applies(base_folder):
            figures["judge_before"] = judged_score(before_images, outside_prompts)
            figures["judge_after"] = judged_score(after_images, outside_prompts)
        held_out = (samples[0], step_folder(files.folder / SAMPLES_DIR, final_step)) if samples else (None, None)
        figures.update(clip_figures(validation_prompts if samples else [], outside_prompts,
                                    {"held_out": held_out, "outside": (before_outside, after_outside)}))
    files.update_comparison(**figures)
    return read_comparison(files.folder)
