"""Reading weight files safely, and naming what a file or folder holds when it is not what we need.

Weights are read as safetensors or through ``torch.load(weights_only=True)``, which unpickles
tensors and plain containers only, never code. Lightning/CompVis checkpoints wrap their tensors
in ``{"state_dict": ...}`` (EasyNLP's ``pytorch_model.bin`` too); the wrapper is taken off here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..messages import say

TORCH_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
# Formats a checkpoint is sometimes found in that are not read here, and why (Chinese, English).
UNREAD_FORMATS = {
    ".pkl": ("原始 pickle，加载时可能执行代码", "raw pickle, which can run code when loaded"),
    ".pickle": ("原始 pickle，加载时可能执行代码", "raw pickle, which can run code when loaded"),
    ".msgpack": ("Flax 权重", "Flax weights"),
    ".h5": ("TensorFlow/Keras 权重", "TensorFlow/Keras weights"),
    ".onnx": ("导出的 ONNX 计算图", "an exported ONNX graph"),
    ".zip": ("压缩包，不会被解压", "an archive, never extracted here"),
    ".gguf": ("GGUF 文件", "a GGUF file"),
}
UNKNOWN_FORMAT = ("未知格式", "unknown format")

class ImportFailed(ValueError):
    """The import cannot go on; the message (Chinese first) names what was found and what is expected."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, unwrapped from any ``{"state_dict": ...}`` nesting."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated archives, refused pickles, bad headers: all mean "not readable"
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ImportFailed(say("import_unreadable", file=path.name, reason=reason)) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ImportFailed(say("import_unreadable", file=path.name, reason="no tensors / 没有张量"))
    return tensors


def find_weights(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` in a readable weight format (``.safetensors`` first), or None."""
    return next((folder / f"{stem}{s}" for s in WEIGHT_SUFFIXES if (folder / f"{stem}{s}").is_file()), None)


def require_weights(folder: Path, stem: str, role: tuple[str, str]) -> Path:
    """:func:`find_weights`, or a message: a file of that name in another format is named as
    such (and why it is not read), never called missing. ``role`` is (Chinese, English)."""
    found = find_weights(folder, stem)
    if found is not None:
        return found
    other = unread_weights(folder, stem)
    if other is not None:
        why_zh, why_en = UNREAD_FORMATS.get(other.suffix, UNKNOWN_FORMAT)
        raise ImportFailed(say("import_other_format", role_zh=role[0], role_en=role[1], file=other.name,
                               why_zh=why_zh, why_en=why_en, accepted=_accepted(stem)))
    raise ImportFailed(say("import_missing", role_zh=role[0], role_en=role[1], expected=_accepted(stem)))


def unread_weights(folder: Path, stem: str) -> Path | None:
    """A file named ``stem.*`` in a format not read here (the first, by name), or None."""
    return next((p for p in sorted(folder.glob(f"{stem}.*")) if p.is_file() and p.suffix not in WEIGHT_SUFFIXES), None)


def _accepted(stem: str) -> str:
    return " / ".join(f"{stem}{suffix}" for suffix in WEIGHT_SUFFIXES)


def key_summary(state: dict[str, torch.Tensor], most: int = 6) -> str:
    """``"model.diffusion_model.* (686), first_stage_model.* (248)"``: what a state dict holds, for messages."""
    groups = Counter(_group(key) for key in state)
    shown = [f"{name}* ({count})" for name, count in groups.most_common(most)]
    return ", ".join(shown) + (f", … ({len(groups) - most} more)" if len(groups) > most else "")


def _group(key: str) -> str:
    """The key up to its first numbered part or its last dot: ``cond_stage_model.model.transformer.``."""
    parts = key.split(".")
    head = []
    for part in parts[:-1]:
        if part.isdigit() or len(head) == 2:
            break
        head.append(part)
    return ".".join(head) + "." if head else key


@dataclass
class Converted:
    """A checkpoint read in any layout: the diffusers pipeline it becomes, plus what its domain needs."""

    pipe: object  # StableDiffusionPipeline
    layout: str
    guidance_scale: float
    sr_weights: Path | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # an exported model's domain settings (checked), over the defaults
    knowledge: Path | None = None  # a knowledge/ folder to copy beside the pipeline (checked)
