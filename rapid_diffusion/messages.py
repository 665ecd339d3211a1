"""What users are told, in one table: a Chinese sentence first, the English one beside it.

``say(key, **values)`` formats both halves; faces never compose user-facing sentences of
their own. Request-field reasons (``RequestError``) come with both halves from the core.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

MESSAGES: dict[str, tuple[str, str]] = {
    "invalid_field": ("「{field_zh}」无效：{reason_zh}", "Invalid {field_en}: {reason_en}"),
    "unknown_domain": ("未知领域「{domain}」，可用：{known}", "Unknown domain '{domain}'; known: {known}"),
    "no_domain": ("请先选择领域", "Pick a domain first"),
    "queue_full": ("队列已满，请稍后再试。", "The queue is full; please try again shortly."),
    "out_of_memory": ("显存不足：请减少图片数量或缩小尺寸后重试。", "Out of GPU memory: try fewer images or a smaller size."),
    "gpu_unavailable": ("暂时没有可用的 GPU，请稍后再试（{reason}）。", "No GPU is available right now; please try again later ({reason})."),
    "internal_error": ("服务器内部错误，请稍后再试。", "Internal server error; please try again later."),
    "stopped": ("已停止生成", "Generation stopped"),
    "body_not_json": ("请求体不是合法 JSON", "The body is not valid JSON"),
    "body_too_large": ("请求体超过 {limit} 字节", "The body exceeds {limit} bytes"),
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
    "prompt_not_chinese": (
        "本模型读中文提示词：英文等其他文字它没学过，画出的多半与之无关。请用中文描述。",
        "This model reads Chinese prompts: it has not learnt English, so such words draw little of what they say. Describe the picture in Chinese.",
    ),
    "prompt_truncated": (
        "提示词超出文本编码器的 {window} 个 token 窗口，末尾 {count} 个字符被忽略：「{dropped}」",
        "The prompt exceeds the text encoder's {window}-token window; the last {count} characters are dropped.",
    ),
    "model_files_missing": ("领域「{title}」的模型文件缺失。{offline_zh}", "Domain '{domain}': the model {model} is missing.{offline_en}"),
    "model_not_downloaded": (
        "领域「{title}」的模型尚未下载，且现在无法连接 Hugging Face Hub（离线）。{offline_zh}",
        "Domain '{domain}' needs {model}, which is not downloaded yet, and the hub cannot be reached.{offline_en}",
    ),
    "model_incomplete": (
        "模型 {model} 的本地缓存不完整（下载未完成），缺少：{missing}。联网后重新加载即可补全。",
        "The cached snapshot of {model} is incomplete (an interrupted download); missing: {missing}. "
        "Load it again with the hub reachable to complete it.",
    ),
    "offline_domains": ("可离线使用的领域：{domains}。", " Domains that work offline: {domains}."),
    "no_offline_domain": ("本机没有可离线使用的领域。", " No domain works offline here."),
    "model_just_unloaded": ("领域「{title}」的模型刚被卸载，请重试。", "The model of domain '{domain}' was unloaded; try again."),
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
    "invalid_body": ("请求体无效：{reason_zh}", "Invalid body: {reason_en}"),
    "api_token_missing": ("此接口需要令牌（Authorization 请求头）", "This API needs a token (the Authorization header)"),
    "api_token_wrong": ("令牌或签名不正确", "Wrong token or signature"),
    "api_token_date": (
        "签名请求须带 Date 请求头，且与当前时间相差不远", "A signed request needs a Date header close to the current time"
    ),
    "no_job_yet": ("还没有训练任务", "no training job yet"),
    "unknown_base": ("未知的基础模型", "unknown base model {base!r}"),
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
    "no_model_picked": ("请先选择一个模型", "pick a model first"),
    "model_protected": (
        "「{name}」不是你微调或导入的模型，受保护：不能删除、改名或导出",
        "'{name}' is not a model you fine-tuned or imported: it is protected from deleting, renaming and exporting",
    ),
    "model_renamed": ("已将「{old}」改名为「{new}」", "renamed '{old}' to '{new}'"),
    "model_imported": ("已导入新模型「{name}」，可在「文生图」中选用", "imported '{name}'; pick it in the Text to image tab"),
    "model_run_unreadable": ("「{name}」的训练记录 run.json 无法读取，名字未改（详见服务器日志）",
                             "the run record run.json of '{name}' cannot be read; the name is unchanged (see the server log)"),
    "model_exported": ("已打包「{name}」，请点击下方文件下载", "'{name}' is packed: download the file below"),
    "model_files_missing_short": ("「{name}」的模型文件缺失", "the model files of '{name}' are missing"),
    "confirm_delete": ("确定删除「{name}」吗？模型文件会被删除，无法恢复。", "Delete '{name}'? Its files are removed for good."),
    "import_one_source": ("请上传一个 zip，或填写服务器上的文件夹路径（二选一）", "upload a zip or give a folder path on the server (one of the two)"),
    "import_zip_refused": ("zip 中的「{entry}」被拒绝：{reason_zh}；未导入任何内容", "'{entry}' in the zip is refused: {reason_en}; nothing was imported"),
    "import_zip_no_model": (
        "{zip} 中没有 diffusers 模型（model_index.json 须在最外层或唯一的文件夹里）",
        "{zip} holds no diffusers model (model_index.json must be at the top or in its one folder)",
    ),
    "duration_after_start": ("{steps} 步；开始后几步内显示剩余时间", "{steps} steps; the time left shows after the first steps"),
    "job_process_exited": (
        "训练进程已退出（详见服务器上该任务的 log.txt）：{tail}", "the training process exited (see the job's log.txt on the server): {tail}"
    ),
    "training_busy": ("已有训练任务在运行，请等待或停止它", "a job is already training on this device"),
    "steps_capped": ("本机最多训练 {limit} 步（RAPID_DIFFUSION_FINETUNE_MAX_STEPS），已从 {asked} 步减为 {limit} 步",
                     "this host trains at most {limit} steps (RAPID_DIFFUSION_FINETUNE_MAX_STEPS): {asked} steps cut to {limit}"),
    "duration_measured": ("预计用时约 {time_zh}（本机实测）", "about {time_en} on this machine (measured)"),
    "time_left": ("剩余约 {time_zh}", "about {time_en} left"),
    "compare_closer_held_out": (
        "与你的图片的接近程度：留出图片上的损失 {before:.4f} → {after:.4f}（{change:+.1f}%，越低越接近）",
        "how close to your pictures: loss on the held-out pictures {before:.4f} → {after:.4f} ({change:+.1f}%; lower is closer)",
    ),
    "compare_closer_training": (
        "与你的图片的接近程度：训练图片上的损失 {before:.4f} → {after:.4f}（{change:+.1f}%，越低越接近；图片太少，没有留出）",
        "how close to your pictures: loss on training pictures {before:.4f} → {after:.4f} ({change:+.1f}%; lower is closer; too few pictures to hold any out)",
    ),
    "compare_outside_changed": (
        "上传以外的 {count} 个提示词：同一种子的图片平均变化 {changed:.1f}%（0 = 没变）",
        "{count} prompts from outside the upload: their same-seed images changed {changed:.1f}% on average (0 = unchanged)",
    ),
    "compare_outside_judge": (
        "上传以外的提示词，演示评分（颜色/形状/位置）：{before:.2f} → {after:.2f}（保留 {kept:.0f}%）",
        "prompts from outside the upload, demo judge (colour/shape/position): {before:.2f} → {after:.2f} ({kept:.0f}% kept)",
    ),
    "compare_clip": (
        "中文 CLIP 分数：留出描述 {held_out_before:.1f} → {held_out_after:.1f}，上传以外 {outside_before:.1f} → {outside_after:.1f}",
        "Chinese CLIP score: held-out captions {held_out_before:.1f} → {held_out_after:.1f}, outside prompts {outside_before:.1f} → {outside_after:.1f}",
    ),
    "compare_clip_outside": (
        "中文 CLIP 分数：上传以外 {outside_before:.1f} → {outside_after:.1f}",
        "Chinese CLIP score: outside prompts {outside_before:.1f} → {outside_after:.1f}",
    ),
    "compare_clip_unavailable": (
        "中文 CLIP 分数：本机没有 CLIP 权重（离线），未计算",
        "Chinese CLIP score: no CLIP weights on this machine (offline), not computed",
    ),
    "prior_generating": (
        "保留原有能力：基础模型正在生成上传以外的图片 {done}/{total}",
        "keeping what the model knew: the base model is drawing pictures from outside the upload, {done}/{total}",
    ),
    "import_bad_settings": (
        "模型附带的设置文件 {file} 中「{field}」不可用（{problem}）；未导入任何内容",
        "the settings file {file} that came with the model is refused at '{field}': {problem}; nothing was imported",
    ),
    "import_bad_knowledge": (
        "模型附带的知识图谱文件夹 {folder}/ 无法读取（{problem}）；未导入任何内容",
        "the model's knowledge folder {folder}/ cannot be read ({problem}); nothing was imported",
    ),
    "import_no_such_path": ("找不到 {path}", "{path} does not exist"),
    "import_bad_name": (
        "名称只能用小写字母、数字、- 或 _（最多 64 个，字母或数字开头）：「{name}」",
        "the name must be lowercase letters, digits, '-' or '_' (at most 64, starting with a letter or digit): '{name}'",
    ),
    "import_name_taken": ("名称「{name}」已是一个领域（或已有同名模型文件夹），请换一个", "'{name}' is already a domain (or a model folder of that name exists); choose another name"),
    "import_unknown_layout": (
        "无法识别的模型格式：{path} 中有 {found}；可导入：EasyNLP/CompVis 微调文件夹（config.json 含 model.params.first_stage_config 与 cond_stage_config，另有 pytorch_model.bin），或单文件 Stable Diffusion 权重（.safetensors / .ckpt）",
        "unknown layout: {path} holds {found}; importable are an EasyNLP/CompVis fine-tune folder (config.json with model.params.first_stage_config and cond_stage_config, plus pytorch_model.bin) or a single-file Stable Diffusion checkpoint (.safetensors / .ckpt)",
    ),
    "import_zip": ("zip 文件不会被解压：请先解压，再导入其中的模型文件夹（{path}）", "zip files are not extracted: unpack it yourself and import the model folder inside ({path})"),
    "import_unreadable_pipeline": (
        "{path} 有 model_index.json，但其中的模型文件无法读取（详见服务器日志）",
        "{path} has a model_index.json, but its model files cannot be read (see the server log)",
    ),
    "import_unreadable": ("无法安全读取 {file}：{reason}", "{file} cannot be read safely: {reason}"),
    "import_other_format": (
        "{role_zh}：有文件 {file}，但该格式不能读取（{why_zh}）；可读取 {accepted}",
        "{role_en}: {file} is there, in a format this importer does not read ({why_en}); it reads {accepted}",
    ),
    "import_missing": ("缺少{role_zh}：需要 {expected}", "no {role_en}: expected {expected}"),
    "import_component_mismatch": (
        "{source} 中的 {component} 不完整或与结构不符：{detail}",
        "the {component} in {source} is incomplete or does not match its architecture: {detail}",
    ),
    "import_bad_config": ("{file} 的字段 {field} 无效：{problem}", "{file}: field '{field}': {problem}"),
    "import_not_stable_diffusion": (
        "{file} 不像 Stable Diffusion 权重：其中有 {found}；需要 model.diffusion_model.*、first_stage_model.* 和 cond_stage_model.*",
        "{file} does not look like a Stable Diffusion checkpoint: it holds {found}; expected model.diffusion_model.*, first_stage_model.* and cond_stage_model.*",
    ),
    "import_needs_config": (
        "单文件权重不含模型结构与词表：请用 --config 指定同结构的 diffusers 模型文件夹（只需各组件的 config.json 与 tokenizer/）或一个领域 id",
        "a single-file checkpoint holds weights but neither the architecture nor the vocabulary: pass --config with a diffusers model folder of the same architecture (its component config.json files and tokenizer/ suffice) or a domain id",
    ),
    "import_config_unavailable": (
        "领域「{domain}」的模型不在本机（尚未下载），不能作为 --config：请先联网生成一次，或给出文件夹",
        "the model of domain '{domain}' is not on this machine (not downloaded yet), so it cannot serve as --config: generate with it once online, or give a folder",
    ),
    "import_config_not_found": ("--config「{value}」既不是文件夹，也不是领域 id", "--config '{value}' is neither a folder nor a domain id"),
    "import_note_ema": ("使用 EMA 权重（EasyNLP 生成时所用）", "the EMA weights (what EasyNLP samples with)"),
    "import_note_no_ema": ("没有 EMA 权重，使用训练权重", "no EMA weights: the trained weights"),
    "import_note_single_file_ema": (
        "文件中另有 EMA 权重；与 diffusers 和 CompVis 推理一样，使用训练权重",
        "the file also holds EMA weights; the trained weights were used, as diffusers and CompVis inference do",
    ),
    "import_note_from": ("{component} 取自 {file}", "{component} from {file}"),
    "import_note_no_sr": ("没有超分辨率权重 {file}", "no super-resolution weights {file}"),
    "import_note_sr_unread": ("超分辨率权重 {file} 的格式不能读取，未导入", "the super-resolution weights {file} are in a format not read; not imported"),
    "finetune_pooled_base": (
        "「{base}」以单个句向量为条件（从 EasyNLP 悟空潜扩散模型导入），暂不支持在其上微调",
        "'{base}' conditions on one sentence vector (imported from EasyNLP's Wukong latent diffusion); fine-tuning it is not supported yet",
    ),
    "import_not_a_config": ("{path} 不是 diffusers 模型文件夹（缺少 {missing}）", "{path} is not a diffusers model folder (it lacks {missing})"),
    "fid_weights_offline": (
        "缺少 FID 的 Inception 权重 {file}（离线模式，无法下载）。请在能联网的机器上下载 {url}（sha256 {sha256}），"
        "放到 {folder}，或用 --fid-weights 指定该文件",
        "The Inception weights for FID, {file}, are missing (offline: cannot download). On a machine with internet "
        "access download {url} (sha256 {sha256}) and put it into {folder}, or pass --fid-weights PATH",
    ),
    "fid_weights_download_failed": (
        "下载 FID 的 Inception 权重 {file} 失败（{error}）。请手动下载 {url}（sha256 {sha256}），放到 {folder}，"
        "或用 --fid-weights 指定该文件",
        "Downloading the Inception weights for FID, {file}, failed ({error}). Download {url} (sha256 {sha256}) "
        "yourself and put it into {folder}, or pass --fid-weights PATH",
    ),
    "fid_weights_not_found": ("FID 权重文件 {path} 不存在", "The FID weights file {path} does not exist"),
    "fid_weights_mismatch": (
        "{path} 不是标准的 FID Inception 权重（sha256 为 {actual}，应为 {expected}），已拒绝",
        "{path} is not the standard FID Inception weights file (sha256 {actual}, expected {expected}); refused",
    ),
    "clip_model_offline": (
        "中文 CLIP 模型 {model} 既不是本地文件夹，也不在 Hugging Face 缓存 {cache} 中（离线模式，无法下载）。"
        "请在联网的机器上运行 hf download {model} 并把缓存复制过来，或用 --clip-model 指定本地模型文件夹",
        "The Chinese CLIP model {model} is neither a local folder nor in the Hugging Face cache {cache} (offline: "
        "cannot download). Run `hf download {model}` on a connected machine and copy the cache here, or pass "
        "--clip-model with a local model folder",
    ),
    "clip_model_unavailable": (
        "中文 CLIP 模型 {model} 无法加载（{reason}）。首次使用会下载到 Hugging Face 缓存，需要联网；"
        "也可用 --clip-model 指定本地模型文件夹",
        "The Chinese CLIP model {model} could not be loaded ({reason}). The first use downloads it into the Hugging "
        "Face cache, which needs internet access; or pass --clip-model with a local model folder",
    ),
    "fid_too_few": ("计算 FID 每组至少需要 2 张图片（收到 {count} 张）", "FID needs at least 2 images per set, got {count}"),
    "no_eval_pairs": ("{path} 中没有可用的图文对", "No usable image-text pairs in {path}"),
    "nothing_to_measure": ("没有可以计算的指标，未生成任何图片", "No metric can be computed; nothing was generated"),
    "eval_needs_data": ("{flags} 只用于带 --data 的评测（FID / CLIP 分数）", "{flags} only apply with --data (FID / CLIP score)"),
    "eval_demo_only": ("{flags} 只用于演示域的遵循度评测（不带 --data）", "{flags} only apply to the demo adherence eval (without --data)"),
    "stand_in_features": (
        "替代特征：随机权重（种子 {seed}）的 FID Inception，不是标准 FID，不能与论文或其他已发表的数值比较",
        "stand-in features: the FID Inception with seeded random weights (seed {seed}); not standard FID, "
        "not comparable with the paper's or any published figures",
    ),
}


# pydantic's validation error types -> the reason shown beside the field, Chinese and English: the
# one translation of every pydantic model's refusals. Values come from the error's ``ctx``, plus
# {got} (the value sent, shortened), {length} (of a sent string or list), {msg} (pydantic's own
# sentence) and whatever the caller adds (e.g. {known}).
VALIDATION_REASONS: dict[str, tuple[str, str]] = {
    "missing": ("缺少此字段", "this field is required"),
    "extra_forbidden": ("未知字段，可用：{known}", "unknown field; known: {known}"),
    "string_type": ("须为文本（收到 {got}）", "must be a string, got {got}"),
    "int_type": ("须为整数（收到 {got}）", "must be an integer, got {got}"),
    "float_type": ("须为数（收到 {got}）", "must be a number, got {got}"),
    "bool_type": ("须为 true 或 false（收到 {got}）", "must be true or false, got {got}"),
    "finite_number": ("须为有限的数（收到 {got}）", "must be a finite number, got {got}"),
    "greater_than_equal": ("须不小于 {ge}（收到 {got}）", "must be at least {ge}, got {got}"),
    "less_than_equal": ("须不大于 {le}（收到 {got}）", "must be at most {le}, got {got}"),
    "string_too_short": ("不能为空", "must not be empty"),
    "string_too_long": ("最多 {max_length} 个字符（收到 {length} 个）", "must be at most {max_length} characters, got {length}"),
    "too_short": ("至少须有 {min_length} 项", "must hold at least {min_length} items"),
    "too_long": ("最多 {max_length} 项（收到 {length} 项）", "may hold at most {max_length} items, got {length}"),
    "model_attributes_type": ("须为 JSON 对象（收到 {got}）", "must be a JSON object, got {got}"),
    "model_type": ("须为 JSON 对象（收到 {got}）", "must be a JSON object, got {got}"),
    "list_type": ("须为列表（收到 {got}）", "must be a list, got {got}"),
    "int_from_float": ("须为整数（收到 {got}）", "must be a whole number, got {got}"),
    "int_parsing": ("须为整数（收到 {got}）", "must be a whole number, got {got}"),
    "float_parsing": ("须为数，例如 1e-5（收到 {got}）", "must be a number such as 1e-5, got {got}"),
    "bool_parsing": ("须为 true 或 false（收到 {got}）", "must be true or false, got {got}"),
    "greater_than": ("须大于 {gt}（收到 {got}）", "must be greater than {gt}, got {got}"),
    "multiple_of": ("须为 {multiple_of} 的倍数（收到 {got}）", "must be a multiple of {multiple_of}, got {got}"),
    "literal_error": ("只能是 {expected}（收到 {got}）", "must be one of {expected}, got {got}"),
    "string_pattern_mismatch": ("格式不符，须匹配 {pattern}（收到 {got}）", "must match {pattern}, got {got}"),
    "path_type": ("须为路径文本（收到 {got}）", "must be a path, got {got}"),
    "json_invalid": ("不是合法的 JSON（{error}）", "is not valid JSON: {error}"),
    "blank_text": ("不能为空白", "must not be blank"),
    "name_blank": ("请给新模型起个名字", "give the new model a name"),
    "name_too_long": ("名字最多 {max_length} 个字", "the name has at most {max_length} characters"),
    "name_characters": ("名字不能含控制字符或 / \\ < >", "the name cannot contain control characters or / \\ < >"),
}
VALIDATION_FALLBACK = ("无效（{msg}）", "{msg}")


def validation_reason(error: Mapping[str, Any], **values: Any) -> tuple[str, str]:
    """(Chinese, English) reason for one pydantic error (an item of ``ValidationError.errors()``)."""
    zh, en = VALIDATION_REASONS.get(error["type"], VALIDATION_FALLBACK)
    sent = error.get("input")
    filled = {
        "got": repr(sent) if len(repr(sent)) <= 40 else repr(sent)[:37] + "...",
        "length": len(sent) if isinstance(sent, (str, list, dict)) else "?",
        "msg": error.get("msg", ""),
        "known": "-",
        **error.get("ctx", {}),
        **values,
    }
    return zh.format(**filled), en.format(**filled)


def field_refusals(errors: list[Mapping[str, Any]], names: Mapping[str, tuple[str, str]] | None = None, **values: Any) -> str:
    """Every pydantic error of one input as ``invalid_field``: all the Chinese sentences first, the English
    ones beside. ``names`` maps a field (the first part of an error's ``loc``; "" for the input as a
    whole) to the (Chinese, English) name its face shows; by default the field's own name."""
    template_zh, template_en = MESSAGES["invalid_field"]
    chinese, english = [], []
    for error in errors:
        place = [str(part) for part in error["loc"]]
        own = ".".join(place) or "-"
        name_zh, name_en = (names or {}).get(place[0] if place else "", (own, own))
        reason_zh, reason_en = validation_reason(error, **values)
        chinese.append(template_zh.format(field_zh=name_zh, reason_zh=reason_zh))
        english.append(template_en.format(field_en=name_en, reason_en=reason_en))
    return f"{'；'.join(chinese)} / {'; '.join(english)}"


def say(key: str, **values) -> str:
    """``"中文 / English"`` for ``key``, with ``values`` filled into both halves."""
    zh, en = MESSAGES[key]
    return f"{zh.format(**values)} / {en.format(**values)}"


_SERVER_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/'\"`<>]+/)+([^\s/'\"`<>]*)")


def without_paths(text: str) -> str:
    """``text`` with every absolute server path cut to ``…/<last part>``: what a page may show of
    a log line or an exception (a stranger learns no user name, home or install folder)."""
    return _SERVER_PATH.sub(lambda match: f"…/{match.group(1)}", text)
