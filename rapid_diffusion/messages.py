"""What users are told, in one table: a Chinese sentence first, the English one beside it.

``say(key, **values)`` formats both halves; faces never compose user-facing sentences of
their own. Request-field reasons (``RequestError``) come with both halves from the core.
"""

from __future__ import annotations

MESSAGES: dict[str, tuple[str, str]] = {
    "invalid_field": ("参数 {field} 无效：{reason_zh}", "Invalid {field}: {reason_en}"),
    "unknown_domain": ("未知领域「{domain}」，可用：{known}", "Unknown domain '{domain}'; known: {known}"),
    "no_domain": ("请先选择领域", "Pick a domain first"),
    "queue_full": ("队列已满，请稍后再试。", "The queue is full; please try again shortly."),
    "out_of_memory": ("显存不足：请减少图片数量或缩小尺寸后重试。", "Out of GPU memory: try fewer images or a smaller size."),
    "internal_error": ("服务器内部错误，请稍后再试。", "Internal server error; please try again later."),
    "model_unavailable": ("模型暂不可用：{reason}", "The model is unavailable: {reason}"),
    "stopped": ("已停止生成", "Generation stopped"),
    "bad_size": ("尺寸格式应为 宽x高，例如 512x512（收到「{size}」）", "Size must look like 512x512, got '{size}'"),
    "bad_seed": ("种子须为整数（收到 {seed}）", "The seed must be a whole number, got {seed}"),
    "body_not_json": ("请求体不是合法 JSON", "The body is not valid JSON"),
    "body_not_object": ("请求体须为 JSON 对象", "The body must be a JSON object"),
    "body_too_large": ("请求体超过 {limit} 字节", "The body exceeds {limit} bytes"),
    "unknown_field": ("未知字段「{field}」，可用：{known}", "Unknown field '{field}'; known: {known}"),
    "wrong_type": ("字段「{field}」类型应为 {expected}", "'{field}' must be {expected}, got {value}"),
    "missing_text": ("缺少字段 text（提示词）", "Missing field 'text' (the prompt)"),
    "loaded": ("已加载 {domain}（{seconds:.1f} 秒）", "Loaded {domain} in {seconds:.1f}s"),
    "unloaded": ("已卸载 {domain}", "Unloaded {domain}"),
    "not_loaded": ("{domain} 未加载", "{domain} was not loaded"),
}


def say(key: str, **values) -> str:
    """``"中文 / English"`` for ``key``, with ``values`` filled into both halves."""
    zh, en = MESSAGES[key]
    return f"{zh.format(**values)} / {en.format(**values)}"
