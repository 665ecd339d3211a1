"""What a face received -> a :class:`GenerationRequest`: the one rule for every face.

The web UI, the named ``/generate`` API, the JSON API and the CLI all call
:func:`request_from_inputs`; validation stays in the core (``GenerationRequest.validate``), which
refuses with a reason in Chinese and English. The rule:

* ``None`` means "the domain's default", for every field.
* ``""``: an empty sampler or size means the default; an empty negative prompt means none.
* ``seed``: ``None`` or ``-1`` draws a random seed.
* Numbers: a whole float (Gradio sends ``20.0``) becomes an int; anything else (``1.5``, NaN,
  Infinity, ``"abc"``, ``true``) is passed on unchanged, so the core refuses it rather than a face
  rounding or guessing.
* ``size``: ``"WxH"`` (also ``×``/``*``) or a ``(width, height)`` pair; text that is not a size is
  passed on as is, so the core refuses it naming the size.
"""

from __future__ import annotations

import math
from typing import Any

from ..generation.request import GenerationRequest

RANDOM_SEED = -1


def request_from_inputs(
    prompt: Any,
    *,
    negative_prompt: Any = None,
    num_inference_steps: Any = None,
    guidance_scale: Any = None,
    seed: Any = None,
    num_images: Any = None,
    size: Any = None,
    sampler: Any = None,
    super_resolution: Any = None,
) -> GenerationRequest:
    width, height = split_size(size)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=whole(num_inference_steps),
        guidance_scale=guidance_scale,
        seed=None if seed is None or whole(seed) == RANDOM_SEED else whole(seed),
        num_images=1 if num_images is None else whole(num_images),
        height=height,
        width=width,
        sampler=sampler or None,
        super_resolution=super_resolution,
    )


def whole(value: Any) -> Any:
    """``20.0`` -> ``20``; every other value unchanged (the core judges it)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def split_size(size: Any) -> tuple[Any, Any]:
    """``"512x768"`` -> ``(512, 768)`` as (width, height); empty -> the defaults; else ``(size, size)``,
    which the core refuses as a width that is not a whole number."""
    if size is None or size == "":
        return None, None
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return whole(size[0]), whole(size[1])
    if isinstance(size, str):
        parts = size.lower().replace("×", "x").replace("*", "x").split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            return int(parts[0]), int(parts[1])
    return size, size
