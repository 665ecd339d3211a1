"""Where a run starts and ends: the base model resolved and loaded, the result saved as a pipeline and registered as a domain."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from ..domains import DomainSpec, ModelSource, write_domain_yaml
from ..models.registry import load_pipeline
from .core import plain_text_encoder
from .options import TrainConfig, TrainingError, derived_domain_id
from .run_files import MODEL_TMP, read_losses, read_status, recorded_name


def resolve_base(base: str) -> tuple[Path, DomainSpec | None]:
    """A domain id, a local diffusers folder or a hub id -> the local folder (+ the domain, if any)."""
    from ..models.registry import ModelRegistry, adhoc_spec

    registry = ModelRegistry(device=torch.device("cpu"), dtype=torch.float32)
    if base in registry.domains:
        spec = registry.spec(base)
        return registry.resolve_folder(spec), spec
    return registry.resolve_folder(adhoc_spec(ModelSource.parse(base))), None



def load_fp32_pipeline(folder: Path):
    """The base as fp32 master weights on the CPU whatever the checkpoint's dtype (accelerate moves
    what trains), through the one loader the registry uses: safetensors or ``weights_only``."""
    return load_pipeline(folder, torch.device("cpu"), torch.float32)



def save_result(config, accelerator, base_folder: Path, unet, text_encoder, ema, resolution, base_spec, knowledge=None, stopped=False) -> tuple[Path | None, str | None]:
    """Save the pipeline into ``--output`` itself and register a domain.

    The pipeline is written to ``model.tmp`` first, then its folders are moved into the output,
    ``model_index.json`` last (a folder without it is not a model yet); ``model.tmp`` never
    survives, whatever fails. Frozen components are taken from the base folder again, so a
    mixed-precision run does not round them through fp16/bf16.
    """
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None, None
    result = load_fp32_pipeline(base_folder)
    result.unet = accelerator.unwrap_model(unet).to("cpu")
    if ema is not None:
        ema.copy_to(result.unet.parameters())
    if config.train_text_encoder:
        result.text_encoder = plain_text_encoder(accelerator.unwrap_model(text_encoder)).to("cpu")
    output = Path(config.output)
    tmp = output / MODEL_TMP
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer_for_transformers_4(result.tokenizer, tmp / "tokenizer")
        if knowledge is not None:
            from ..knowledge import KNOWLEDGE_DIR

            knowledge.save(tmp / KNOWLEDGE_DIR)
        publish_pipeline(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    domain_id = register_domain(config, output, resolution, base_spec, with_knowledge=knowledge is not None, stopped=stopped)
    return output, domain_id


def save_tokenizer_for_transformers_4(tokenizer, folder: Path) -> None:
    """``vocab.txt`` + ``special_tokens_map.json`` beside transformers 5's ``tokenizer.json``:
    transformers 4.x's BertTokenizer (EasyNLP, diffusers < 0.36 users) loads only from those."""
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, ensure_ascii=False, indent=1), encoding="utf-8")


def publish_pipeline(tmp: Path, output: Path) -> None:
    """Move a saved pipeline's entries into ``output``; ``model_index.json`` goes first out, last in."""
    (output / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = output / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)


def claim_domain_id(config: TrainConfig) -> str:
    """The new domain's id, checked before any training: it never replaces another domain.

    An id the user chose that is taken (by a shipped, configured or earlier fine-tuned domain)
    is refused; a derived id (from the model's name) gets a numeric suffix. Re-running or
    resuming the same output folder keeps the id its own earlier run registered.
    """
    from ..domains import load_domains, user_domains_dir

    taken = {
        spec.id for spec in load_domains().values()
        if not (spec.source_file and spec.source_file.parent == user_domains_dir() and _registered_by(spec, config))
    }
    if config.domain_id is not None:
        if config.domain_id in taken:
            raise TrainingError(
                f"领域 id「{config.domain_id}」已被占用，请换一个 / domain id '{config.domain_id}' is already taken; choose another"
            )
        return config.domain_id
    base = derived_domain_id(config.name, config.output)
    candidates = [base] + [f"{base[:60]}-{n}" for n in range(2, 1000)]
    return next(c for c in candidates if c not in taken)


def _registered_by(spec: DomainSpec, config: TrainConfig) -> bool:
    return spec.model.is_local and Path(config.output).resolve() == spec.model.path


def register_domain(config: TrainConfig, model_dir: Path, resolution: int, base_spec: DomainSpec | None,
                    with_knowledge: bool = False, stopped: bool = False) -> str:
    """The new model's domain YAML, under the name in the run folder's ``run.json`` when it has one (where
    the Models tab records a rename), else the config's; the picker shows :func:`finetune_title`."""
    domain_id = config.domain_id or claim_domain_id(config)
    examples = list(dict.fromkeys([*config.validation_prompts, *read_status_prompts(config), *(base_spec.examples if base_spec else ())]))
    examples += ["一只猫", "一幅山水画", "一碗面条"][: max(0, 3 - len(examples))]
    name = (recorded_name(config.output) or config.name or Path(config.output).name).strip()
    base_zh, base_en = base_titles(base_spec, config.base)
    data = {
        "title": finetune_title(name, base_spec, config.base, stopped),
        "description": finetune_description(base_zh, base_en, len(read_losses(config.output)), stopped),
        "model": {"path": str(Path(model_dir).resolve())},
        "examples": examples,
        "height": max(64, resolution // 8 * 8),
        "width": max(64, resolution // 8 * 8),
        "offline_ready": True,
    }
    if with_knowledge:
        data["knowledge_graph"] = str((Path(model_dir) / "knowledge").resolve())
    if base_spec:
        data.update(
            num_inference_steps=base_spec.num_inference_steps,
            guidance_scale=base_spec.guidance_scale,
            sampler=base_spec.sampler,
            negative_prompt=base_spec.negative_prompt,
        )
    write_domain_yaml(domain_id, data)
    return domain_id


def finetune_title(name: str, base_spec: DomainSpec | None, base: str, stopped: bool) -> dict[str, str]:
    """A fine-tuned model's title, the one rule for publishing and renaming: "<name>（基于 <base>）",
    with "·提前停止" while its last published result stopped early."""
    base_zh, base_en = base_titles(base_spec, base)
    return {"zh": f"{name}（基于 {base_zh}）" + ("·提前停止" if stopped else ""),
            "en": f"{name} (based on {base_en})" + (" · stopped early" if stopped else "")}


def base_titles(base_spec: DomainSpec | None, base: str) -> tuple[str, str]:
    return (short_title(base_spec.title_zh), short_title(base_spec.title_en)) if base_spec else (base, base)


def finetune_description(base_zh: str, base_en: str, steps: int, stopped: bool) -> str:
    """The model card's line, Chinese first: what it was tuned from and for how long."""
    zh = f"在「{base_zh}」上用你的图文对完整微调 {steps} 步" + ("（提前停止）" if stopped else "")
    en = f"full fine-tune of {base_en} on {steps} steps of your pairs" + (" (stopped early)" if stopped else "")
    return f"{zh} / {en}"


def short_title(title: str) -> str:
    """"演示（几何图形）" -> "演示", "Demo (shapes)" -> "Demo": no brackets inside the new title's brackets."""
    return re.sub(r"\s*[（(][^（）()]*[）)]$", "", title) or title


def read_status_prompts(config: TrainConfig) -> list[str]:
    """The validation prompts the run used (the held-out captions, when none were given)."""
    return [p for p in read_status(config.output).get("validation_prompts", []) if p.strip()]

