"""Prompt-adherence evaluation: generate held-out-combination prompts through ``generate()``,
judge every image, write ``report.json`` and ``contact_sheet.png``.

    rapid-diffusion eval --domain demo --out eval-out
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..pipeline import GenerationRequest, generate
from . import judge, world

CJK_FONT_DIRS = (Path("/usr/share/fonts/opentype/noto"), Path("/usr/share/fonts/truetype/noto"), Path("/usr/share/fonts"))
CJK_FONT_NAMES = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSerifCJK-Regular.ttc", "wqy-microhei.ttc", "wqy-zenhei.ttc")
TILE = 128
LABEL_HEIGHT = 44
COLUMNS = 6
METRICS = ("colour", "shape", "size", "position", "count")


def held_out_prompts(num_prompts: int | None = None) -> list[tuple[str, world.Scene]]:
    """Canonical captions of every held-out combination, sizes alternating big/small, in a fixed
    shuffled order (seed 0) so that the first few prompts already mix colours, shapes and positions."""
    big, small = world.held_out_scenes("大"), world.held_out_scenes("小")
    scenes = [big[i] if i % 2 == 0 else small[i] for i in range(len(big))]
    order = np.random.default_rng(0).permutation(len(scenes))
    prompts = [(world.canonical_caption(scenes[i]), scenes[i]) for i in order]
    return prompts[:num_prompts] if num_prompts else prompts


def find_cjk_font(size: int = 13) -> ImageFont.FreeTypeFont | None:
    """A system CJK font (fonts-noto-cjk, WenQuanYi), or None."""
    for folder in CJK_FONT_DIRS:
        if not folder.is_dir():
            continue
        for name in CJK_FONT_NAMES:
            for path in sorted(folder.rglob(name))[:1]:
                return ImageFont.truetype(str(path), size)
    return None


def contact_sheet(items: list[dict], images: list[Image.Image]) -> Image.Image:
    """Images with their prompts (or the prompt index when no CJK font is installed); green = all met."""
    font = find_cjk_font()
    rows = (len(images) + COLUMNS - 1) // COLUMNS
    sheet = Image.new("RGB", (COLUMNS * TILE, rows * (TILE + LABEL_HEIGHT)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (item, image) in enumerate(zip(items, images)):
        x, y = (i % COLUMNS) * TILE, (i // COLUMNS) * (TILE + LABEL_HEIGHT)
        sheet.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
        ok = all(v == 1.0 for v in item["scores"].values())
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=(0, 160, 0) if ok else (200, 0, 0), width=2)
        prompt = item["prompt"]
        lines = [prompt[:9], prompt[9:18]] if font else [f"#{i}"]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + TILE + 3 + 16 * k), line, fill="black", font=font)
    return sheet


def evaluate(spec, registry=None, out: Path | None = None, num_prompts: int | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0, images_per_prompt: int = 3) -> dict:
    """Adherence of ``spec``'s model on held-out prompts; writes the report and sheet into ``out``.

    Prompt ``i`` is drawn ``images_per_prompt`` times in one request (seeds ``seed + i * k`` onwards,
    so no two images share a seed); every image is judged and counts alike.
    """
    items, images = [], []
    start = time.time()
    prompts = held_out_prompts(num_prompts)
    for i, (prompt, scene) in enumerate(prompts):
        first_seed = seed + i * images_per_prompt
        request = GenerationRequest(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, seed=first_seed, num_images=images_per_prompt)
        result = generate(request, spec, registry=registry)
        expected = judge.parse_caption(prompt)
        for image_seed, image in zip(result.seeds, result.images):
            detected = judge.judge_image(image)
            items.append({
                "prompt": prompt,
                "seed": image_seed,
                "expected": [asdict(e) for e in expected],
                "detected": [asdict(d) for d in detected],
                "scores": judge.score(expected, detected),
            })
            images.append(image)
    accuracy = {m: sum(item["scores"].get(m, 0.0) for item in items) / max(len(items), 1) for m in METRICS}
    report = {
        "domain": spec.id,
        "num_prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "num_images": len(items),
        "num_inference_steps": steps if steps is not None else spec.num_inference_steps,
        "guidance_scale": guidance if guidance is not None else spec.guidance_scale,
        "seed": seed,
        "seconds": round(time.time() - start, 2),
        "accuracy": accuracy,
        "items": items,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        contact_sheet(items, images).save(out / "contact_sheet.png")
    return report
