"""Fine-tuning measurement: teach the demo model a concept it has never seen, keep the old ones.

Two concepts (``--concept``):

- ``shape``: 半圆形 (a half disc, flat side down): neither the word's first character nor the
  shape occur in the demo world. Hit: the largest object fits a half disc better than every world
  shape (the judge's own template fitting, one template more).
- ``colour``: 粉色 (RGB 255, 120, 190): the world never names it (its random off-palette objects
  are never called anything). Hit: the largest object's median colour is nearer pink than every
  one of the world's eight colours.

24 pairs of the new concept (in the world's own phrasings; ``--num-old N`` mixes in N pairs of the
old world, as the README's older runs did) go through the trainer (the code path of ``rapid-diffusion
train`` and the Fine-tune tab), with prior preservation as the tab's default or ``--prior-preservation``.
Before and after, through the registry's model (``LoadedModel.run``) with the domain's defaults (2 seeds per prompt): the
new-concept rate on 12 prompts naming it, and the judge's colour / shape / position scores on 12
ordinary world prompts (every palette colour at least once); "kept" is the after score in % of the base's.

    python -m rapid_diffusion_dev.bench.finetune_concept --concept colour --out runs/pink --preset quick --threads 2 --before runs/before-colour.json
    python -m rapid_diffusion_dev.bench.finetune_concept --concept shape --out runs/half-disc --preset quick --threads 2 --prior-preservation off
    python -m rapid_diffusion_dev.bench.finetune_concept --concept shape --out runs/custom --steps 300 --lr 2e-4

Every image measured lands in ``before.png`` and ``after.png`` (a column per prompt, a row per
seed, the world's prompts in the upper block). ``--grey-world-pairs`` draws the mixed-in world pairs
on grey backgrounds only: a diagnostic (the fine-tuned model memorises the few coloured backgrounds
and guidance amplifies them, see benchmarks/README.md), not the measurement. ``--unet-max-timestep
1000`` trains as the trainer did before it kept small bases' UNet off the noisiest timesteps.

``--preset`` trains exactly what the Fine-tune tab starts on its defaults (the preset's steps, rate
and batch, pairs held out for validation, samples and a checkpoint every fifth of the run); the
wall time it prints is what ``training.options.SECONDS_PER_STEP`` (prior preservation off) and
``PRIOR_STEP_COST`` / ``PRIOR_IMAGE_COST`` (on, as ratios to off in the same session) store for the tab's estimate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from rapid_diffusion.training.options import PRIOR_PRESERVATION, defaults
from rapid_diffusion.training.run_files import comparison_lines, read_comparison, read_status

NEW_SHAPE = "半圆形"
NEW_COLOUR, PINK = "粉色", (255, 120, 190)
POSITIONS = ("左", "中", "右", "上", "下")
SEEDS = (0, 1)
SCALES = (0.92, 1.0, 1.08)


def half_disc(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A half disc with its flat side down, inside the box [cx-r, cx+r] x [cy-r/2, cy+r/2]."""
    return [(cx + r * math.cos(t), cy + r * (0.5 - math.sin(t))) for t in np.linspace(0, math.pi, 32)]


def render_half_disc(world, fill, cx: float, cy: float, r: float, background: int) -> Image.Image:
    big = world.IMAGE_SIZE * world.SUPERSAMPLE
    image = Image.new("RGB", (big, big), (background,) * 3)
    s = world.SUPERSAMPLE
    ImageDraw.Draw(image).polygon([(x * s, y * s) for x, y in half_disc(cx, cy, r)], fill=fill)
    return image.reduce(s)


def half_disc_mask(cx: float, cy: float, r: float, size: int = 64) -> np.ndarray:
    image = Image.new("L", (size * 4, size * 4), 0)
    ImageDraw.Draw(image).polygon([(x * 4, y * 4) for x, y in half_disc(cx, cy, r)], fill=255)
    return np.asarray(image.reduce(4), dtype=np.float32) / 255.0


def largest_object(judge, image) -> tuple[np.ndarray, np.ndarray] | None:
    """The largest object the judge segments: its coverage map (0/1) and its median RGB; or None."""
    pixels = judge._as_array(image)
    distance = np.sqrt(((pixels - judge.estimate_background(pixels)) ** 2).sum(axis=2))
    labels, count = judge.label_components(distance > judge.FOREGROUND_DISTANCE)
    if count == 0:
        return None
    component = labels == 1 + int(np.argmax([(labels == i).sum() for i in range(1, count + 1)]))
    if component.sum() < judge.MIN_AREA:
        return None
    return component.astype(np.float32), np.median(pixels[component], axis=0)


def half_disc_fit(alpha: np.ndarray) -> float:
    """Best soft IoU of a half-disc template over the coverage map's bounding box (as ``judge.fit_shape``)."""
    ys, xs = np.nonzero(alpha >= 0.5)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    best = 0.0
    for scale in SCALES:
        r = ((x1 - x0) / 2 + (y1 - y0)) / 2 * scale
        template = half_disc_mask((x0 + x1) / 2, (y0 + y1) / 2, r)
        best = max(best, float(np.minimum(alpha, template).sum() / max(np.maximum(alpha, template).sum(), 1e-6)))
    return best


def is_half_disc(judge, image) -> bool:
    """True when the largest object fits a half disc better than every world shape (same map, same fitting)."""
    found = largest_object(judge, image)
    return found is not None and half_disc_fit(found[0]) > judge.fit_shape(found[0])[1]


def is_pink(judge, image) -> bool:
    """True when the largest object's median colour is nearer pink than every world colour."""
    found = largest_object(judge, image)
    if found is None:
        return False
    distances = ((np.vstack([judge.PALETTE, np.array(PINK, dtype=np.float32)]) - found[1]) ** 2).sum(axis=1)
    return int(np.argmin(distances)) == len(judge.PALETTE)


def new_concept_pairs(world, concept: str, rng) -> list[tuple[Image.Image, str]]:
    """24 images of the new concept with captions in the world's phrasings."""
    pairs = []
    for i in range(24):
        size, position = world.SIZES[i % 2], POSITIONS[i % len(POSITIONS)]
        radius = float(rng.uniform(*world.RADII[size]))
        background = int(rng.integers(*world.BACKGROUND_RANGE))
        if concept == "shape":
            colour = world.COLOUR_NAMES[i // 3]
            obj = world.SceneObject(colour, "圆形", size, position, *rng.uniform(-2, 2, 2), radius=radius)
            image = render_half_disc(world, obj.fill, *obj.centre, obj.extent, background)
            pairs.append((image, world.describe_object(obj, rng, shape_word=NEW_SHAPE)))
        else:
            shape = world.SHAPES[i % len(world.SHAPES)]
            obj = world.SceneObject(NEW_COLOUR, shape, size, position, *rng.uniform(-2, 2, 2), radius=radius, rgb=PINK)
            pairs.append((world.render(world.Scene((obj,), background)), world.describe_object(obj, rng)))
    return pairs


def write_pairs(world, concept: str, folder: Path, num_old: int, grey_world: bool = False) -> int:
    """24 new-concept pairs + ``num_old`` world pairs in a ``metadata.jsonl`` folder; the world pairs'
    backgrounds as in the world (a fifth coloured), or all grey with ``grey_world``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (image, text) in enumerate(new_concept_pairs(world, concept, rng)):
        image.save(folder / f"new{i}.png")
        rows.append({"file_name": f"new{i}.png", "text": text})
    for i in range(num_old):
        scene = world.sample_scene(rng, max_objects=1, coloured_background_rate=0.0 if grey_world else world.COLOURED_BACKGROUND_RATE)
        world.render(scene).save(folder / f"old{i}.png")
        rows.append({"file_name": f"old{i}.png", "text": world.caption(scene, rng)})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def new_prompts(world, concept: str) -> list[str]:
    """12 canonical prompts naming the new concept: positions, sizes and the other attribute mixed."""
    prompts = []
    for i in range(12):
        where, size = world.POSITION_WORDS[POSITIONS[i % 5]][0], world.SIZES[i % 2]
        if concept == "shape":
            prompts.append(f"{where}有一个{size}的{world.COLOUR_NAMES[i % 8]}{NEW_SHAPE}")
        else:
            prompts.append(f"{where}有一个{size}的{NEW_COLOUR}{world.SHAPES[i % 6]}")
    return prompts


def old_prompts(world) -> list[str]:
    """12 canonical world prompts, every palette colour at least once (shapes, positions seeded)."""
    rng = np.random.default_rng(100)
    return [
        world.canonical_caption(world.Scene((world.SceneObject(
            world.COLOUR_NAMES[i % 8], world.SHAPES[rng.integers(6)], world.SIZES[i % 2], POSITIONS[rng.integers(5)]),)))
        for i in range(12)
    ]


def measure(spec, registry, concept: str, judge, world, GenerationRequest, sheet: Path) -> dict:
    """The rates, and every image in ``sheet``: a column per prompt, a row per seed, the world's prompts above."""
    hit = is_half_disc if concept == "shape" else is_pink

    def images_of(prompts: list[str]) -> list[list[Image.Image]]:
        model = registry.get(spec)
        return [model.run(spec, [GenerationRequest(prompt=p, seed=SEEDS[0], num_images=len(SEEDS))])[0].images for p in prompts]

    old, new = images_of(old_prompts(world)), images_of(new_prompts(world, concept))
    contact_sheet(old + new, len(SEEDS)).save(sheet)
    new_hits = [hit(judge, image) for images in new for image in images]
    scores = [judge.judge(image, prompt) for prompt, images in zip(old_prompts(world), old) for image in images]
    old_scores = {k: float(np.mean([s.get(k, 0.0) for s in scores])) for k in ("colour", "shape", "position")}
    return {"new_concept_rate": float(np.mean(new_hits)), "new_concept_hits": [bool(h) for h in new_hits], "old": old_scores}


def contact_sheet(per_prompt: list[list[Image.Image]], rows_per_block: int, columns: int = 12) -> Image.Image:
    """Prompts' images side by side, ``columns`` prompts per block, enlarged 2x for the eye."""
    side = per_prompt[0][0].width
    blocks = math.ceil(len(per_prompt) / columns)
    sheet = Image.new("RGB", (columns * side, blocks * rows_per_block * side), "white")
    for index, images in enumerate(per_prompt):
        block, column = divmod(index, columns)
        for row, image in enumerate(images):
            sheet.paste(image, (column * side, (block * rows_per_block + row) * side))
    return sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST)


def vae_round_trips(judge, world, vae) -> dict:
    """What the frozen VAE makes of the new concepts: a half disc (still fits one?) and a pink object (still pink?)."""
    from ..recipes.train_demo import to_tensor

    def round_trip(image: Image.Image) -> Image.Image:
        with torch.no_grad():
            y = vae.decode(vae.encode(to_tensor(np.array(image)[None])).latent_dist.mean).sample[0]
        return Image.fromarray(y.clamp(-1, 1).add(1).mul(127.5).round().permute(1, 2, 0).byte().numpy())

    discs = [is_half_disc(judge, round_trip(render_half_disc(world, world.COLOURS[c], 32, 32, r, 130))) for c in world.COLOUR_NAMES for r in (7.0, 12.0)]
    pinks = [
        is_pink(judge, round_trip(world.render(world.Scene((world.SceneObject(NEW_COLOUR, shape, size, "中", rgb=PINK),), 130))))
        for shape in world.SHAPES for size in world.SIZES
    ]
    return {"half_disc_kept": float(np.mean(discs)), "pink_kept": float(np.mean(pinks))}


def old_score(measured: dict) -> float:
    """The judge's mean colour / shape / position score on the world's prompts (the tab's judge figure, on more prompts)."""
    return float(np.mean([measured["old"][k] for k in ("colour", "shape", "position")]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concept", choices=("colour", "shape"), default="colour", help="teach 粉色 (pink) or 半圆形 (a half disc)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-old", type=int, default=0,
                        help="world pairs mixed into the upload (0: an upload of only new-concept pictures, as a user's is; "
                             "the README's older runs mixed in 24 to keep the old words)")
    parser.add_argument("--prior-preservation", choices=PRIOR_PRESERVATION, default=defaults()["prior_preservation"],
                        help="the trainer's option (the tab's 保留原有能力 / keep what the model knew); default: the tab's")
    parser.add_argument("--before", type=Path, default=None,
                        help="a JSON file with the base model's measurement: read when it exists, else measured and written "
                             "(the base does not change between runs)")
    parser.add_argument("--grey-world-pairs", action="store_true",
                        help="the world pairs on grey backgrounds only (a diagnostic; by default a fifth are coloured, as in the world)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the training run's seed (the data and the measurement stay fixed)")
    parser.add_argument("--embedding-lr-scale", type=float, default=None, help="token embeddings' rate / the rate (default: the trainer's, 3 on the demo base)")
    parser.add_argument("--snr-gamma", type=float, default=0.0, help="min-SNR loss weighting (the trainer's --snr-gamma; 0 = off, its default)")
    parser.add_argument("--unet-max-timestep", type=int, default=None,
                        help="the UNet learns from timesteps below this one (the trainer's option; default: the trainer's, 700 on the demo base; 1000 = all)")
    parser.add_argument("--preset", choices=("quick", "standard", "thorough"), default=None,
                        help="train as the Fine-tune tab does on this preset (overrides --steps/--lr/--batch-size)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["RAPID_DIFFUSION_HOME"] = str((args.out / "home").resolve())
    torch.set_num_threads(args.threads)

    from rapid_diffusion.demo import judge, world
    from rapid_diffusion.generation.request import GenerationRequest
    from rapid_diffusion.models.registry import ModelRegistry
    from rapid_diffusion.training.options import preset_config, preset_for
    from rapid_diffusion.training.options import TrainConfig
    from rapid_diffusion.training.trainer import train

    cpu = dict(device=torch.device("cpu"), dtype=torch.float32)
    registry = ModelRegistry(**cpu)
    spec = registry.spec("demo")
    round_trips = vae_round_trips(judge, world, registry.get(spec).pipe.vae)
    print(f"frozen VAE round trips: half disc kept {round_trips['half_disc_kept']:.0%}, pink kept {round_trips['pink_kept']:.0%}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.before is not None and args.before.is_file():
        before = json.loads(args.before.read_text(encoding="utf-8"))
    else:
        before = measure(spec, registry, args.concept, judge, world, GenerationRequest, args.out / "before.png")
        if args.before is not None:
            args.before.write_text(json.dumps(before, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"before: new-{args.concept} rate {before['new_concept_rate']:.0%}, old {before['old']}", flush=True)

    word = NEW_SHAPE if args.concept == "shape" else NEW_COLOUR
    domain_id = f"demo-new-{args.concept}"
    pairs = write_pairs(world, args.concept, args.out / "data", args.num_old, args.grey_world_pairs)
    if args.preset:
        preset = preset_for(args.preset, spec.height)
        args.steps, args.lr, args.batch_size = preset.max_steps, preset.learning_rate, preset.batch_size
        config = preset_config(preset, base="demo", data=args.out / "data", output=args.out / "run", name=word, domain_id=domain_id, seed=args.seed,
                               embedding_lr_scale=args.embedding_lr_scale, snr_gamma=args.snr_gamma, unet_max_timestep=args.unet_max_timestep,
                               prior_preservation=args.prior_preservation)
    else:
        config = TrainConfig(
            base="demo", data=args.out / "data", output=args.out / "run", max_steps=args.steps, learning_rate=args.lr,
            batch_size=args.batch_size, gradient_accumulation_steps=1, checkpoint_every=0, validation_every=0,
            lr_warmup_steps=10, domain_id=domain_id, random_flip=False, holdout=0, seed=args.seed,
            embedding_lr_scale=args.embedding_lr_scale, snr_gamma=args.snr_gamma, unet_max_timestep=args.unet_max_timestep,
            prior_preservation=args.prior_preservation,
        )
    start = time.time()
    result = train(config, log=lambda line: None)
    seconds = time.time() - start
    losses = result.losses
    print(f"train: {result.state}, {pairs} pairs, {args.steps} steps, {seconds:.0f} s, loss {np.mean(losses[:10]):.4f} -> {np.mean(losses[-10:]):.4f}", flush=True)

    tuned_registry = ModelRegistry(**cpu)
    after = measure(tuned_registry.spec(domain_id), tuned_registry, args.concept, judge, world, GenerationRequest, args.out / "after.png")
    print(f"after: new-{args.concept} rate {after['new_concept_rate']:.0%}, old {after['old']}", flush=True)
    kept = 100 * old_score(after) / old_score(before)
    status, comparison = read_status(config.output), read_comparison(config.output)
    print(f"prior preservation {args.prior_preservation}: outside prompts kept {kept:.1f}% of the base's judged score "
          f"({old_score(before):.3f} -> {old_score(after):.3f}), new {args.concept} {after['new_concept_rate']:.0%}; "
          f"prior pairs drawn in {status.get('prior_seconds', 0):.0f} s", flush=True)
    for line in comparison_lines(comparison):
        print(f"tab: {line}", flush=True)
    report = {
        "concept": args.concept, "new_word": word, "vae_round_trips": round_trips, "pairs": pairs, "steps": args.steps, "lr": args.lr,
        "batch_size": args.batch_size, "preset": args.preset, "train_seconds": round(seconds, 1), "torch_threads": args.threads, "seed": args.seed,
        "embedding_lr_scale": args.embedding_lr_scale, "num_old": args.num_old, "grey_world_pairs": args.grey_world_pairs, "snr_gamma": args.snr_gamma, "unet_max_timestep": args.unet_max_timestep,
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "before": before, "after": after, "prior_preservation": args.prior_preservation, "old_kept_percent": kept,
        "prior_seconds": status.get("prior_seconds"), "seconds_per_step": status.get("seconds_per_step"), "tab_comparison": comparison,
    }
    (args.out / "result.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"report: {args.out / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
