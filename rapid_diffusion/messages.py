"""What users are told, in one table: a Chinese sentence first, the English one beside it.

``say(key, **values)`` formats both halves; faces never compose user-facing sentences of
their own. Request-field reasons (``RequestError``) come with both halves from the core.
"""

from __future__ import annotations

import re

MESSAGES: dict[str, tuple[str, str]] = {
    "invalid_field": ("「{field_zh}」无效：{reason_zh}", "Invalid {field_en}: {reason_en}"),
    "unknown_domain": ("未知领域「{domain}」，可用：{known}", "Unknown domain '{domain}'; known: {known}"),
    "no_domain": ("请先选择领域", "Pick a domain first"),
    "queue_full": ("队列已满，请稍后再试。", "The queue is full; please try again shortly."),
    "out_of_memory": ("显存不足：请减少图片数量或缩小尺寸后重试。", "Out of GPU memory: try fewer images or a smaller size."),
    "internal_error": ("服务器内部错误，请稍后再试。", "Internal server error; please try again later."),
    "stopped": ("已停止生成", "Generation stopped"),
    "body_not_json": ("请求体不是合法 JSON", "The body is not valid JSON"),
    "body_not_object": ("请求体须为 JSON 对象", "The body must be a JSON object"),
    "body_too_large": ("请求体超过 {limit} 字节", "The body exceeds {limit} bytes"),
    "unknown_field": ("未知字段「{field}」，可用：{known}", "Unknown field '{field}'; known: {known}"),
    "wrong_type": ("字段「{field}」类型应为 {expected}", "'{field}' must be {expected}, got {value}"),
    "missing_text": ("缺少字段 text（提示词）", "Missing field 'text' (the prompt)"),
    "loaded": ("已加载 {domain}（{seconds:.1f} 秒）", "Loaded {domain} in {seconds:.1f}s"),
    "unloaded": ("已卸载 {domain}", "Unloaded {domain}"),
    "not_loaded": ("{domain} 未加载", "{domain} was not loaded"),
    "error_title": ("出错了", "Error"),
    "admin_off": ("公开部署未设置密码，此操作已关闭。", "This action is off on a public host without a password."),
    "wrong_password": ("密码错误。", "Wrong password."),
    "finetune_off": (
        "本服务未开放微调（公开部署须设置 RAPID_DIFFUSION_FINETUNE_PASSWORD）。",
        "Fine-tuning is off here (a public host needs RAPID_DIFFUSION_FINETUNE_PASSWORD).",
    ),
    "stopped_title": ("已停止", "Stopped"),
    "model_missing": ("模型文件缺失：不可用", "model files missing: unavailable"),
    "offline_unavailable": ("离线：不可用（模型尚未下载）", "offline: unavailable (the model is not downloaded)"),
    "offline_incomplete": ("离线：不可用（模型下载未完成）", "offline: unavailable (the model download is incomplete)"),
    "skipped_domain_files": ("已跳过的领域文件", "Skipped domain files"),
    "will_download": ("首次生成会先下载模型 {model}，可能需要几分钟", "the first generation downloads {model} first, which can take minutes"),
    "upload_too_large": ("上传总量超过 {limit}", "The upload exceeds {limit} in total"),
    "file_not_uploaded": ("只能使用你在本次会话中上传的文件", "Only files you uploaded in this session can be used"),
    "not_a_proxy": ("本服务不代取其他网站的文件", "This server does not fetch files from other sites"),
    "body_timeout": ("请求体发送过慢，已超时", "The request body arrived too slowly"),
    "json_content_type": (
        "请以 JSON 发送请求（Content-Type: application/json），收到 {got}", "Send the body as JSON (Content-Type: application/json), got {got}"
    ),
    "cross_origin": ("不接受其他网站页面发来的请求（{origin}）", "Requests from other sites' pages are refused ({origin})"),
    "method_not_allowed": ("不支持此方法（{method}），请用 {allowed}", "Method {method} not allowed; use {allowed}"),
    "no_such_api": ("没有这个接口：{path}", "No such API path: {path}"),
    "no_job_yet": ("还没有训练任务", "no training job yet"),
    "unknown_base": ("未知的基础模型", "unknown base model {base!r}"),
    "bad_learning_rate": ("学习率应是一个数，例如 1e-5", "the learning rate must be a number such as 1e-5: {value!r}"),
    "too_many_steps": ("本服务器每次最多训练 {limit} 步", "this server allows at most {limit} steps per job"),
    "job_running": ("已有训练任务在运行，请等待或停止它", "a job is already training"),
    "job_too_big": (
        "上传文件共 {total:.0f} MB，超过每个训练任务 {limit:.0f} MB 的上限",
        "the uploads ({total:.0f} MB) exceed a job's budget of {limit:.0f} MB",
    ),
    "no_pairs": ("没有可用的图文对：请上传图片和描述", "no usable image-text pairs: upload images with captions"),
    "job_started": ("已开始训练「{name}」", "started training '{name}'"),
    "no_running_job": ("没有正在运行的任务", "no job is running"),
    "job_stopping": ("正在保存当前模型并停止…", "saving the model so far, then stopping…"),
    "nothing_to_resume": ("没有可继续的任务（只能继续已停止或失败的任务）", "nothing to resume (only a stopped or failed job)"),
    "job_resuming": ("正在从最近的检查点继续训练…", "resuming from the last checkpoint…"),
    "no_model_picked": ("请先选择要删除的模型", "pick a model to delete first"),
    "duration_after_start": ("{steps} 步；开始后几步内显示剩余时间", "{steps} steps; the time left shows after the first steps"),
    "job_process_exited": (
        "训练进程已退出（详见服务器上该任务的 log.txt）：{tail}", "the training process exited (see the job's log.txt on the server): {tail}"
    ),
    "bad_whole_number": ("「{field}」须为整数（收到 {value}）", "'{field}' must be a whole number, got {value}"),
    "duration_measured": ("预计用时约 {time}（本机实测）", "about {time} on this machine (measured)"),
}


def say(key: str, **values) -> str:
    """``"中文 / English"`` for ``key``, with ``values`` filled into both halves."""
    zh, en = MESSAGES[key]
    return f"{zh.format(**values)} / {en.format(**values)}"


_SERVER_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/'\"`<>]+/)+([^\s/'\"`<>]*)")


def without_paths(text: str) -> str:
    """``text`` with every absolute server path cut to ``…/<last part>``: what a page may show of
    a log line or an exception (a stranger learns no user name, home or install folder)."""
    return _SERVER_PATH.sub(lambda match: f"…/{match.group(1)}", text)
