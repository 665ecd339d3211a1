"""EasyNLP's ``RRDB_ESRGAN_x4.pth`` -> the RGB x4 model :mod:`..upscale` runs.

The original ESRGAN (and EasyNLP's ``ESRGAN.super_resolution``, which flips its input to BGR and
its output back) works in BGR channel order; the upscaler feeds RGB. Permuting the input
channels of ``conv_first`` and the output channels of ``conv_last`` makes the same network in RGB,
exactly. The layout is read and checked by :mod:`..upscale` (any of its known layouts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..messages import say
from ..upscaling.esrgan import UnknownCheckpointError, model_from_state_dict, read_state_dict, to_basicsr_layout
from .checkpoints import ImportFailed

BGR = [2, 1, 0]


def esrgan_rgb_state(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint in basicsr's layout, converted from BGR to RGB order and checked to build."""
    try:
        state = to_basicsr_layout(read_state_dict(path))
        kind = model_from_state_dict(state, source=path.name).architecture.kind
    except UnknownCheckpointError as exc:
        raise ImportFailed(say("import_component_mismatch", source=path.name, component="ESRGAN", detail=str(exc))) from exc
    if kind != "rrdb":
        raise ImportFailed(say("import_component_mismatch", source=path.name, component="ESRGAN", detail=f"an {kind} network, not ESRGAN's RRDBNet"))
    state["conv_first.weight"] = state["conv_first.weight"][:, BGR].contiguous()
    state["conv_last.weight"] = state["conv_last.weight"][BGR].contiguous()
    state["conv_last.bias"] = state["conv_last.bias"][BGR].contiguous()
    return state
