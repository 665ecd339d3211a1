"""The "模型 / Models" tab: every model with what it is and costs; load, unload, rename, delete, export, import.

``build_models_tab(service, demo, tab)`` is called inside a ``gr.Tab`` context by ``ui.py``. Every
event calls one :class:`~rapid_diffusion.service.models.ModelsService` method (which checks who may
act) and turns its answer into widget values: a refusal is a toast and a status line, and the table
stays. On a public host without a password no action is built at all, so a stranger has no event
to call. None of the tab's events is in the public API.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable

import gradio as gr
import torch

from ..errors import UserFacingError
from ..messages import say
from ..service.app import AppService
from ..service.models import ModelInfo, admin_access
from .ui_common import GPU_GROUP, STATE_LABELS, acceleration_label

log = logging.getLogger(__name__)

COLUMNS = [
    "名称 / Name", "来源 / Origin", "基础模型 / Base", "步数 / Steps", "日期 / Date", "大小 / Size",
    "状态 / State", "内存 / Memory", "加速 / Acceleration",
]
ORIGIN_LABELS = {
    "shipped": "内置 / shipped",
    "configured": "本机配置 / configured",
    "imported": "导入 / imported",
    "finetuned": "微调 / fine-tuned",
}
OUTCOME_LABELS = {
    "done": "完成 / done",
    "stopped": "提前停止 / stopped early",
    "failed": "失败 / failed",
    "training": "训练中 / training",
}
COLUMN_WIDTHS = ["190px", "170px", "120px", "70px", "120px", "80px", "130px", "120px", "130px"]  # pixels: a phone scrolls the table sideways
PRIVATE = dict(api_visibility="private")


def build_models_tab(service: AppService, demo: gr.Blocks, tab: gr.Tab) -> dict[str, gr.components.Component]:
    """Lay out the tab; returns ``changed`` (a hidden box that changes whenever a model is added,
    renamed or deleted, so the other tabs refresh their pickers) and ``picker`` where actions exist."""
    table = gr.Dataframe(headers=COLUMNS, value=models_table(service), datatype="markdown", interactive=False, wrap=True,
                         column_widths=COLUMN_WIDTHS, label="模型 / Models", elem_id="models-table")
    memory = gr.Markdown(device_memory_markdown())
    gr.Markdown(domain_errors_markdown(service), elem_id="domain-errors")
    access = admin_access()
    if access == "off":
        gr.Markdown(say("admin_off"), elem_id="models-status")
        refresh = gr.Button("刷新 / Refresh", size="sm")
        refresh.click(lambda: (models_table(service), device_memory_markdown()), None, [table, memory], **PRIVATE)
        for shown in (demo.load, tab.select):
            shown(lambda: models_table(service), None, table, **PRIVATE)
        return {}
    with gr.Row():
        picker = gr.Dropdown(service.models.choices(), value=None, label="模型 / Model", scale=3, elem_id="models-picker")
        password = gr.Textbox(label="密码 / Password", type="password", scale=2, visible=access == "password")
    with gr.Row():
        load_btn = gr.Button("加载 / Load", variant="primary")
        unload_btn = gr.Button("卸载 / Unload")
        export_btn = gr.Button("导出 zip / Export zip")
        delete_btn = gr.Button("删除 / Delete", variant="stop", elem_id="models-delete")
    with gr.Row(visible=False, elem_id="models-confirm") as confirm_row:
        confirm_text = gr.Markdown()
        confirm_btn = gr.Button("确认删除 / Yes, delete", variant="stop")
        cancel_btn = gr.Button("取消 / Cancel")
    status = gr.Markdown(elem_id="models-status")
    with gr.Row():
        new_name = gr.Textbox(label="新名字 / New name", max_lines=1, max_length=40, scale=3)
        rename_btn = gr.Button("改名 / Rename", scale=1, elem_id="models-rename")
    download = gr.File(label="导出的模型 / Exported model", visible=False, interactive=False, elem_id="models-export")
    gr.Markdown("#### 导入模型 / Import a model")
    with gr.Group():
        upload = gr.File(label="本页导出的 zip / a zip exported here", file_types=[".zip"], type="filepath", height=120,
                         elem_id="models-upload")
        folder = gr.Textbox(label="或：服务器上的模型文件夹（diffusers、EasyNLP）/ or: a model folder on the server (diffusers, EasyNLP)",
                            max_lines=1, elem_id="models-folder")
        import_name = gr.Textbox(label="新模型的名字（可用中文）/ name of the new model", max_lines=1, max_length=40)
        import_btn = gr.Button("导入 / Import", variant="primary", elem_id="models-import")
    refresh = gr.Button("刷新 / Refresh", size="sm")
    changed = gr.Textbox(visible="hidden")  # rendered (so its change event fires), never shown

    views = [table, memory, status, picker, changed]
    models = service.models
    load_btn.click(lambda m, pw: act(service, models.load, m, pw), [picker, password], views,
                   concurrency_id=GPU_GROUP, concurrency_limit=service.gate.slots, **PRIVATE)
    unload_btn.click(lambda m, pw: act(service, models.unload, m, pw), [picker, password], views, **PRIVATE)
    rename_btn.click(lambda m, name, pw: act(service, models.rename, m, name, pw, changes=True), [picker, new_name, password], views, **PRIVATE)
    export_btn.click(lambda m, pw: export(service, m, pw), [picker, password], [status, download], **PRIVATE)
    delete_btn.click(lambda m: ask_to_delete(service, m), picker, [confirm_row, confirm_text, status], **PRIVATE)
    cancel_btn.click(lambda: (gr.update(visible=False), ""), None, [confirm_row, status], **PRIVATE)
    confirm_btn.click(lambda m, pw: (gr.update(visible=False), *act(service, models.delete, m, pw, changes=True)),
                      [picker, password], [confirm_row, *views], **PRIVATE)
    import_btn.click(lambda up, path, name, pw: import_action(service, up, path, name, pw),
                     [upload, folder, import_name, password], views, concurrency_id=GPU_GROUP, concurrency_limit=service.gate.slots, **PRIVATE)
    refresh.click(lambda m: view(service, "", m), picker, views, **PRIVATE)
    picker.change(lambda: (gr.update(visible=False), gr.update(value=None, visible=False)), None, [confirm_row, download], **PRIVATE)
    for shown in (demo.load, tab.select):  # a model loaded by a generation, or a fine-tune just done, shows when the tab opens
        shown(lambda m: view(service, gr.skip(), m), picker, views, **PRIVATE)
    return {"changed": changed, "picker": picker}


# ----------------------------------------------------------------------------- widget values


def act(service: AppService, action: Callable[..., str], *args, changes: bool = False):
    """One service action; its sentence in the status line and a toast (seen wherever the page is scrolled to), the
    table and picker fresh; a refusal the same way, as a warning.

    ``changes``: the action adds, renames or removes a model, so ``changed`` tells the other tabs."""
    picked = args[0] if args else None  # the model acted on (kept picked while it exists)
    try:
        message = action(*args)
    except UserFacingError as exc:
        log.info("model action refused: %s", exc.message)
        gr.Warning(exc.message, title=say("error_title"))
        return view(service, f"**{exc.message}**", picked)
    gr.Info(message)
    return view(service, message, picked, changed=uuid.uuid4().hex if changes else gr.skip())


def import_action(service: AppService, upload: str | None, folder: str | None, name: str | None, password: str | None):
    """Import, then pick the new model, ready for the buttons."""
    before = set(service.domains)
    *shown, picker, changed = act(service, service.models.import_model, upload, folder, name, password, changes=True)
    added = sorted(set(service.domains) - before)
    return (*shown, gr.update(choices=service.models.choices(), value=added[0]) if added else picker, changed)


def view(service: AppService, message, picked: str | None, changed=None):
    choices = service.models.choices()
    keep = picked if picked in {model_id for _, model_id in choices} else None
    return (models_table(service), device_memory_markdown(), message, gr.update(choices=choices, value=keep),
            gr.skip() if changed is None else changed)


def export(service: AppService, model_id: str | None, password: str | None):
    try:
        path = service.models.export(model_id, password)
    except UserFacingError as exc:
        gr.Warning(exc.message, title=say("error_title"))
        return f"**{exc.message}**", gr.update(value=None, visible=False)
    name = service.models.spec(model_id).title_zh
    return say("model_exported", name=name), gr.update(value=str(path), visible=True)


def ask_to_delete(service: AppService, model_id: str | None):
    """The confirmation row, or at once the reason there is nothing to confirm (no model picked, a shipped one)."""
    try:
        spec = service.models.owned_spec(model_id)
    except UserFacingError as exc:
        return gr.update(visible=False), "", f"**{exc.message}**"
    return gr.update(visible=True), f"**{say('confirm_delete', name=spec.title_zh)}**", ""


def models_table(service: AppService) -> list[list[Any]]:
    """The owner's models first, newest first; then the shipped and configured ones by id."""
    rows = sorted(service.models.rows(), key=lambda info: (not info.owned, -(info.created or 0), info.id))
    return [table_row(info) for info in rows]


def table_row(info: ModelInfo) -> list[Any]:
    origin = ORIGIN_LABELS.get(info.kind, info.kind)
    if info.outcome:
        origin = f"{origin} · {OUTCOME_LABELS.get(info.outcome, info.outcome)}"
    return [
        f"**{escape_markdown(info.name)}**<br><small>`{info.id}`</small>",
        origin,
        info.base or "—",
        "—" if info.steps is None else str(info.steps),
        "—" if info.created is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(info.created)),
        "—" if info.size_bytes is None else human_size(info.size_bytes),
        STATE_LABELS.get(info.state, info.state),
        "" if info.memory_mb is None else f"{info.memory_mb:g} MB · {info.load_seconds:g} s",
        acceleration_label(info.acceleration) if info.acceleration else "",
    ]


def escape_markdown(text: str) -> str:
    return "".join(f"\\{c}" if c in "\\`*_[]<>#|" else c for c in text)


def human_size(size: int) -> str:
    if size < 2**20:
        return f"{size / 2**10:.0f} KB"
    return f"{size / 2**20:.1f} MB" if size < 2**30 else f"{size / 2**30:.2f} GB"


def domain_errors_markdown(service: AppService) -> str:
    """The domain files skipped at start-up (file name and field, never a path), so the owner sees why one is missing."""
    errors = service.skipped_domain_files()
    if not errors:
        return ""
    lines = [f"- `{e['file']}` · {e['field']}: {e['problem']}" for e in errors]
    return f"**⚠️ {say('skipped_domain_files')}**\n\n" + "\n".join(lines)


def device_memory_markdown() -> str:
    if not torch.cuda.is_available():
        return "设备 / Device: CPU（无 CUDA / no CUDA）"
    used = torch.cuda.memory_allocated() / 2**30
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"设备 / Device: {torch.cuda.get_device_name(0)} · 显存 / GPU memory {used:.1f} / {total:.1f} GiB"
