"""What the UI tabs and the named API share: the GPU group, the error toast, the words for a model's state,
and a generation through the service with its PNGs written for Gradio to serve.

Every label is Chinese first with the English beside it; no tab shows a raw code (``eager``, ``auto``).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Mapping

import gradio as gr

from ..domains import DomainSpec
from ..errors import UserFacingError
from ..generation.pipeline import GenerationCancelled, GenerationResult
from ..generation.request import GenerationRequest
from ..messages import say
from ..models.registry import Acceleration
from ..service.app import AppService

log = logging.getLogger(__name__)

GPU_GROUP = "gpu"
STATE_LABELS = {
    "loaded": "已加载 loaded",
    "offline-ready": "本地可用 offline-ready",
    "cached": "已缓存 cached",
    "needs-download": "需下载 needs-download",
    "incomplete": "下载未完成 incomplete",
    "missing": "缺失 missing",
}
LEVEL_LABELS = {
    "none": "不加速 / none",
    "flash": "Flash Attention",
    "compile": "torch.compile",
    "openvino": "OpenVINO",
    "auto": "自动 / auto",
    "aot": "提前编译 / ahead-of-time",  # what compile and auto apply on ZeroGPU (speed.ahead_of_time)
}
ACCELERATION_LABELS = {
    "eager": "未加速 / not accelerated",
    "compiling": "编译中 / compiling",
    "compiled": "已加速 / accelerated",
    "failed": "未加速（加速失败）/ not accelerated (acceleration failed)",
}


def level_label(level: str) -> str:
    return LEVEL_LABELS.get(level, level)


def acceleration_label(acceleration: Acceleration) -> str:
    """What a loaded model runs on: "已加速 / accelerated · OpenVINO", with what ``auto`` chose."""
    label = ACCELERATION_LABELS.get(acceleration.state, acceleration.state)
    if acceleration.level == "none" and acceleration.state == "eager":
        return label
    applied = acceleration.applied if acceleration.applied not in ("", "none") else None
    how = level_label(acceleration.level)
    if acceleration.level == "auto" and applied:
        how = f"{how} → {level_label(applied)}"
    return f"{label} · {how}"


def ui_error(message: str) -> gr.Error:
    """The error toast: the service's bilingual sentence under a bilingual title.

    No traceback in the server log (Gradio prints one per ``gr.Error`` by default): a refused
    input is logged as one line where it is refused.
    """
    return gr.Error(message, title=say("error_title"), print_exception=False)


def spec_or_error(service: AppService, domain_id: str | None) -> DomainSpec:
    try:
        return service.spec(domain_id)
    except UserFacingError as exc:
        log.info("refused: %s", exc.message)
        raise ui_error(exc.message) from exc


def generate_on_gpu(
    service: AppService, request: GenerationRequest, domain_id: str, optimization: str | None, progress, should_stop, preview,
    field_names: Mapping[str, tuple[str, str]],
) -> GenerationResult:
    """A UI request through the service (whose GPU part is ``spaces.GPU``'s on ZeroGPU); errors -> ``gr.Error``."""
    try:
        return service.generate(request, domain_id, optimization=optimization, progress=progress, should_stop=should_stop,
                                preview=preview, field_names=field_names)
    except UserFacingError as exc:
        log.info("generation refused for domain %s: %s", domain_id, exc.message)
        raise ui_error(exc.message) from exc
    except GenerationCancelled:
        raise
    except Exception as exc:
        log.exception("generation failed for domain %s", domain_id)
        raise ui_error(say("internal_error")) from exc


OUTPUT_LIFETIME_S = 3600  # as long as Gradio keeps its cached copies (delete_cache below)


def save_pngs(result: GenerationResult) -> list[Path]:
    """Write the PNGs (settings embedded) to a temp folder; Gradio serves them from copies in its cache.

    Files older than ``OUTPUT_LIFETIME_S`` are removed first, so the folder stays small.
    """
    folder = Path(tempfile.gettempdir()) / "rapid-diffusion-outputs"
    cutoff = time.time() - OUTPUT_LIFETIME_S
    for old in folder.glob("*.png") if folder.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            if old.stat().st_mtime < cutoff:
                old.unlink()
    return result.save(folder)
