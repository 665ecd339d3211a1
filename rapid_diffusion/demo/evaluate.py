"""Prompt-adherence evaluation: generate the prompts of one evaluation set through the registry's model,
judge every image, write ``report.json`` and ``contact_sheet.png``; and the VAE's colour round trip.

Evaluation sets (``world.EVAL_SETS``): ``test`` (the world's test combinations: what the README
reports, never used to choose anything), ``validation`` (to choose training steps and guidance)
and ``unseen`` (16 prompts in phrasings no training caption uses, every colour twice).

    rapid-diffusion eval --domain demo --out eval-out                      # test split
    rapid-diffusion eval --domain demo --set unseen --images-per-prompt 2  # unseen phrasings
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..generation.request import GenerationRequest
from . import judge, world

CJK_FONT_DIRS = (Path("/usr/share/fonts/opentype/noto"), Path("/usr/share/fonts/truetype/noto"), Path("/usr/share/fonts"))
CJK_FONT_NAMES = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSerifCJK-Regular.ttc", "wqy-microhei.ttc", "wqy-zenhei.ttc")
TILE = 128
LABEL_HEIGHT = 44
COLUMNS = 6
METRICS = ("colour", "shape", "size", "position", "count")


UNSEEN_PROMPTS = 16


def split_prompts(split: str) -> list[tuple[str, world.Scene]]:
    """Canonical captions of every combination of ``split``, sizes alternating big/small, in a fixed
    shuffled order (seed 0) so that the first few prompts already mix colours, shapes and positions."""
    big, small = world.split_scenes(split, "大"), world.split_scenes(split, "小")
    scenes = [big[i] if i % 2 == 0 else small[i] for i in range(len(big))]
    order = np.random.default_rng(0).permutation(len(scenes))
    return [(world.canonical_caption(scenes[i]), scenes[i]) for i in order]


def unseen_prompts() -> list[tuple[str, world.Scene]]:
    """``UNSEEN_PROMPTS`` prompts in ``world.UNSEEN_FRAMES`` (each frame twice), every colour twice;
    shapes and positions drawn with seed 0."""
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(UNSEEN_PROMPTS):
        obj = world.SceneObject(
            world.COLOUR_NAMES[i % len(world.COLOUR_NAMES)],
            world.SHAPES[rng.integers(len(world.SHAPES))],
            world.SIZES[i % 2],
            world.POSITIONS[rng.integers(len(world.POSITIONS))],
        )
        frame = world.UNSEEN_FRAMES[(i // 2) % len(world.UNSEEN_FRAMES)]
        prompts.append((world.unseen_phrasing(obj, frame), world.Scene((obj,))))
    return prompts


def eval_prompts(eval_set: str = "test", num_prompts: int | None = None) -> list[tuple[str, world.Scene]]:
    if eval_set not in world.EVAL_SETS:
        raise ValueError(f"eval set must be one of {world.EVAL_SETS}, got {eval_set!r}")
    prompts = unseen_prompts() if eval_set == "unseen" else split_prompts(eval_set)
    return prompts[:num_prompts] if num_prompts else prompts


@torch.no_grad()
def vae_colour_error(vae, num_objects: int = 100, seed: int = 0) -> float:
    """The VAE's round trip on objects in random off-palette colours: per object, the mean absolute
    RGB error (0-255) over the pixels the object fully covers; the median over objects."""
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(num_objects):
        background = int(rng.integers(*world.BACKGROUND_RANGE))
        rgb = None
        while rgb is None:  # at least half the world's contrast from the background and every named colour
            rgb = world.random_rgb(rng, [(background,) * 3] + list(world.COLOURS.values()), world.MIN_CONTRAST / 2)
        size = world.SIZES[rng.integers(len(world.SIZES))]
        obj = world.SceneObject(None, world.SHAPES[rng.integers(len(world.SHAPES))], size, world.POSITIONS[rng.integers(len(world.POSITIONS))], rgb=rgb)
        image = np.asarray(world.render(world.Scene((obj,), background)), dtype=np.float32)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].div(127.5).sub(1.0).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample[0].float().clamp(-1, 1).add(1).mul(127.5)
        decoded = decoded.permute(1, 2, 0).cpu().numpy()
        inside = world.render_mask(obj) >= 0.999
        errors.append(float(np.abs(decoded[inside] - np.array(obj.fill, dtype=np.float32)).mean()))
    return float(np.median(errors))


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


def evaluate(spec, registry, out: Path | None = None, num_prompts: int | None = None, steps: int | None = None, guidance: float | None = None, seed: int = 0, images_per_prompt: int = 3, eval_set: str = "test") -> dict:
    """Adherence of ``spec``'s model on the prompts of ``eval_set``; writes the report and sheet into ``out``.

    Prompt ``i`` is drawn ``images_per_prompt`` times in one request (seeds ``seed + i * k`` onwards,
    so no two images share a seed); every image is judged and counts alike.
    """
    items, images = [], []
    start = time.time()
    prompts = eval_prompts(eval_set, num_prompts)
    for i, (prompt, scene) in enumerate(prompts):
        first_seed = seed + i * images_per_prompt
        request = GenerationRequest(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, seed=first_seed, num_images=images_per_prompt)
        [result] = registry.get(spec).run(spec, [request])
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
    model = registry.get(spec)
    with model.lock:
        colour_error = vae_colour_error(model.pipe.vae)
    report = {
        "domain": spec.id,
        "eval_set": eval_set,
        "num_prompts": len(prompts),
        "images_per_prompt": images_per_prompt,
        "num_images": len(items),
        "num_inference_steps": steps if steps is not None else spec.num_inference_steps,
        "guidance_scale": guidance if guidance is not None else spec.guidance_scale,
        "seed": seed,
        "seconds": round(time.time() - start, 2),
        "accuracy": accuracy,
        "vae_colour_error": round(colour_error, 2),
        "items": items,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        contact_sheet(items, images).save(out / "contact_sheet.png")
    return report
